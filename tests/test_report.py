"""The report: built from a finished run, parsed as HTML, and opened in real headless Chromium through
chromedriver (the page has no script of its own: everything is observed from outside, tests/browser.py)."""

import io
import json
import re
import shutil
import time
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tests.browser as browser
import tests.run_factory as run_factory
from cli.main import main
from datagen.manifests.tables import (
    SAMPLES_TABLE,
    SHARDS_TABLE,
    SUMMARY,
    random_weights,
    write_manifest_tables,
)
from datagen.record.schema import Phrase
from datagen.report.charts import NOT_NUMBERS, histogram_chart, value_counts_chart
from datagen.report.gallery import GALLERY_MAX, select_gallery
from datagen.report.page import build_report
from tests.browser import Chromium, require_chromium
from tests.run_factory import make_run

RANDOM_WEIGHTS_LINE = ("Made with random weights (profile tiny): captions, segments and matches are meaningless; "
                       "this run shows only the plumbing.")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-run")
    plan = [["w", "w", "f", "w", "w"], ["w", "d", "w", "w", "f", "w"], ["w", "w"]]
    expected = make_run(root, plan=plan, long_side=320, failed_shards=(2,))
    return expected, build_report(expected["run_dir"])


@pytest.fixture(scope="module")
def chromium():
    require_chromium()
    browser = Chromium()
    yield browser
    browser.close()


# what the page's own markup is made of; anything else (script, iframe, object, ...) came from a value
PAGE_TAGS = {"html", "head", "meta", "link", "title", "style", "body", "p", "h1", "h2", "h3", "code", "section",
             "div", "figure", "figcaption", "svg", "line", "text", "rect", "table", "tr", "th", "td", "span", "sup",
             "ul", "li", "b", "br", "img", "details", "summary", "pre"}


class PageParser(HTMLParser):
    """Every element with its attributes, and the page's text (entities decoded)."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.elements, self.data = [], []
        self.feed(text)
        self.close()
        self.text = "".join(self.data)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.data.append(data)

    def tags(self, name):
        return [a for t, a in self.elements if t == name]


def check_markup_is_the_pages_own(text, n_cards, n_object_types=1):
    """Only the page's own elements and attributes: no script, no event handler, one image per card."""
    n_charts = 8 + 2 * n_object_types  # the distributions, and two per object type
    page = PageParser(text)
    assert {t for t, _ in page.elements} <= PAGE_TAGS, {t for t, _ in page.elements} - PAGE_TAGS
    handlers = [(t, n) for t, a in page.elements for n in a if n.lower().startswith("on")]
    assert handlers == []
    images = page.tags("img")
    assert len(images) == n_cards and all(set(a) == {"alt", "width", "height", "src"} for a in images)
    assert all(a["src"].startswith("data:image/jpeg;base64,") for a in images)
    assert all(re.fullmatch(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", a["src"]) for a in images)
    assert len(page.tags("svg")) <= n_charts and len(page.tags("style")) == 1
    assert len(page.tags("title")) <= 1 + n_charts * 50
    assert len(page.tags("body")) == 1 and len(page.tags("pre")) == 1
    return page


def test_report_opens_in_chromium_without_errors_and_every_image_loads(report, chromium):
    expected, path = report
    page = chromium.visit(path.resolve().as_uri())
    assert page.scripts == []  # read before any evaluate below (those run scripts of their own)
    state = chromium.evaluate(
        "({total: document.images.length,"
        " ok: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length,"
        " scripts: document.scripts.length, first: document.body.innerText.split('\\n')[0],"
        " title: document.title, cards: document.querySelectorAll('.card').length})",
    )
    shot = chromium.screenshot()

    assert page.errors == []
    requested = page.requests
    assert requested and all(u.startswith(("file:", "data:")) for u in requested), requested

    n_written = len(expected["written"])
    assert state["cards"] == n_written  # a small run: every written sample is in the gallery
    assert state["total"] == n_written and state["ok"] == state["total"]
    assert state["scripts"] == 0
    assert "test-run" in state["title"] and state["title"].startswith("[random weights]")
    assert state["first"] == RANDOM_WEIGHTS_LINE  # the tiny profile: the first visible line says so

    image = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    assert image.shape[:2] == (1600, 1280)
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 200


def test_report_is_self_contained_and_shows_the_run(report):
    expected, path = report
    text = path.read_text(encoding="utf-8")
    check_markup_is_the_pages_own(text, len(expected["written"]))
    # nothing fetched from anywhere: every src/href is a data: URI or an in-page anchor
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), refs
    assert not re.search(r"@import|url\(\s*['\"]?(?:https?:)?//", text)
    assert "<script" not in text and "<link rel=\"stylesheet\"" not in text
    for key in expected["written"]:
        assert f'id="s{key}"' in text
    assert text.count("<img ") == len(expected["written"])
    # headline counts and the failure table
    assert re.search(r'<div class="n">13</div><div>source images</div><div class="dim">3 shard\(s\), 1 failed', text)
    assert re.search(r'<div class="n">8</div><div>written</div>', text)
    assert "<td>image</td><td>2</td>" in text and "<td>shard failed after # attempt(s)</td><td>2</td>" in text
    assert "run status incomplete · 3 of 3 planned shards have entries" in text
    # the weakest sample comes first in the gallery, with its phrase and score in the legend
    first = text.index('class="card"')
    assert text.index('id="s00004"', first - 200) == min(text.index(f'id="s{k}"') for k in expected["written"])
    assert "a man → person 0.240" in text
    assert "unmatched subject phrase" in text
    assert "in-the-wild-images/00000/00004.png" in text and "someone · Attribution License" in text
    # the random-weights line comes before anything else in the body
    body = text[text.index("<body>") + len("<body>"):].lstrip()
    assert body.startswith(f'<p class="warn" id="random-weights">{RANDOM_WEIGHTS_LINE}</p>')


def test_summary_says_first_whether_the_run_used_random_weights(report, tmp_path):
    expected, _ = report
    summary = json.loads((expected["run_dir"] / SUMMARY).read_text(encoding="utf-8"))
    assert list(summary)[:2] == ["note", "random_weights"]
    assert summary["note"] == RANDOM_WEIGHTS_LINE and summary["random_weights"] is True

    real = make_run(tmp_path, run="real-run", plan=[["w", "f"]])
    run_json = real["run_dir"] / "run.json"
    run = json.loads(run_json.read_text())
    run.update(profile="paper", config={"name": "paper"})
    run_json.write_text(json.dumps(run))
    page = build_report(real["run_dir"]).read_text(encoding="utf-8")
    summary = json.loads((real["run_dir"] / SUMMARY).read_text(encoding="utf-8"))
    assert list(summary)[:2] == ["note", "random_weights"] and summary["random_weights"] is False
    assert summary["note"].startswith("Counts and distributions of run real-run")
    assert "random weights" not in page and 'class="warn"' not in page

    # a profile of one's own that carries random_weights: true is flagged as well; a non-true value is not
    assert random_weights({"profile": "mine", "config": {"random_weights": True}})
    assert not random_weights({"profile": "mine", "config": {"random_weights": "<b>yes</b>"}})
    assert not random_weights({})


def test_the_tiny_profile_says_it_has_random_weights():
    from datagen.config import load_profile

    profile = load_profile("tiny")
    assert profile.random_weights is True
    assert random_weights({"profile": "renamed", "config": profile.to_dict()})
    assert not random_weights({"profile": "paper", "config": load_profile("paper").to_dict()})


def test_report_command_prints_the_report_path(report, capsys):
    expected, path = report
    assert main(["report", str(expected["run_dir"])]) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert out[-1] == str(path)
    assert re.fullmatch(r"subject-ffhq report: \d+\.\d\d MiB\n", captured.err), captured.err  # its size
    assert main(["report", str(expected["run_dir"] / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and err.startswith("subject-ffhq report: error: ") and len(err.splitlines()) == 1


def test_figures_per_object_type_follow_the_runs_setting_or_the_option(report, tmp_path, capsys):
    expected, _ = report
    records = [r for _, r in expected["written"].values()]
    summary = json.loads((expected["run_dir"] / SUMMARY).read_text(encoding="utf-8"))
    # a run.json without the setting (made before it existed): the default, people, whose figures match the person ones
    assert summary["object_types"] == ["person"] and list(summary["by_object_type"]) == ["person"]
    person = summary["by_object_type"]["person"]
    assert person["subjects"] == summary["counts"]["matched_persons"]
    assert person["segments"] == summary["counts"]["person_segments"]
    assert person["images_with_subject"] == summary["counts"]["with_matched_person"]
    assert person["subjects_per_image"] == summary["per_image"]["n_matched_person"]

    run_dir = tmp_path / "copy"
    shutil.copytree(expected["run_dir"], run_dir)
    cats = [s for r in records for s in r.segments if s.coco_label == "cat"]
    page = build_report(run_dir, object_types=("person", "cat")).read_text(encoding="utf-8")
    assert "Match scores of cat subjects" in page and "Cat subjects per image" in page
    assert f"<td>cat</td><td>{len(cats)}</td>" in page
    check_markup_is_the_pages_own(page, len(expected["written"]), n_object_types=2)
    assert json.loads((run_dir / SUMMARY).read_text(encoding="utf-8")) == summary  # summary.json stays the run's

    # the run's own setting (run.json keeps the profile) decides when no option is given
    run = json.loads((run_dir / "run.json").read_text())
    run["config"] = {"subjects": {"object_types": ["cat", "couch"]}}
    (run_dir / "run.json").write_text(json.dumps(run))
    page = build_report(run_dir).read_text(encoding="utf-8")
    summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
    assert summary["object_types"] == ["cat", "couch"]
    assert summary["by_object_type"]["cat"]["subjects"] == sum(1 for s in cats if s.matched) == len(cats)
    assert summary["by_object_type"]["cat"]["match_score_quantiles"]["max"] == max(s.match_score for s in cats)
    assert "Match scores of couch subjects" in page and "Match scores of person subjects" not in page
    assert main(["report", str(run_dir), "--object-types", "person,dgo"]) == 2
    assert "did you mean 'dog'?" in capsys.readouterr().err


def test_gallery_budget_bounds_the_file(report):
    expected, _ = report
    small = build_report(expected["run_dir"], gallery_budget=30_000)
    text = small.read_text(encoding="utf-8")
    n = text.count("<img ")
    assert 0 < n < len(expected["written"])
    assert f"{len(expected['written']) - n} more left out to keep the file small" in text
    capped = build_report(expected["run_dir"], gallery_max=3).read_text(encoding="utf-8")
    assert capped.count("<img ") == 3 and "Showing 3 samples (cap 3)" in capped
    build_report(expected["run_dir"])  # leave the full report for the other tests


def _synthetic_rows(n, rng):
    rows = []
    for i in range(n):
        m = int(rng.integers(0, 6))
        scores = sorted(rng.uniform(0.05, 0.35, size=m).tolist())
        rows.append({
            "source_id": str(i), "key": f"{i:05d}", "shard": i // 1000, "status": "written",
            "n_matched": m, "min_match_score": scores[0] if m else None,
            "min_margin": float(rng.uniform(0, 0.1)) if m > 1 else None,
            "ambiguous_match": False, "unmatched_person_segment": bool(rng.random() < 0.1),
            "unmatched_subject_phrase": bool(rng.random() < 0.05), "no_person": bool(rng.random() < 0.02),
        })
        rows[-1]["ambiguous_match"] = rows[-1]["min_margin"] is not None and rows[-1]["min_margin"] < 0.01
    return rows


def test_gallery_selection_is_capped_at_70k_samples():
    rows = _synthetic_rows(70_000, np.random.default_rng(0))
    picks = select_gallery(rows, GALLERY_MAX)
    assert len(picks) == GALLERY_MAX and len({p.row["key"] for p in picks}) == GALLERY_MAX
    weakest = [p for p in picks if p.section == "Weakest matches"]
    assert len(weakest) == GALLERY_MAX // 2
    cutoff = max(p.row["min_match_score"] for p in weakest)
    assert sum(1 for r in rows if r["n_matched"] and r["min_match_score"] < cutoff) == len(weakest) - 1
    sections = {p.section for p in picks}
    assert {"Near ties (ambiguous matches)", "Flagged: no match", "Flagged: unmatched person segment",
            "Flagged: no person", "Flagged: unmatched subject phrase"} <= sections


def test_count_histograms_keep_the_long_tail_in_a_bounded_chart():
    counts = {str(k): (1000 // (k + 1)) for k in range(120)}
    chart = value_counts_chart(counts, "people", "people")
    assert len(chart.bars) == 50  # 49 single values + one overflow bar
    assert [b.label for b in chart.bars[:3]] == ["0", "1", "2"] and chart.bars[-1].label == "≥49"
    assert chart.bars[-1].count == sum(1000 // (k + 1) for k in range(49, 120))
    # log scale: the tallest bar fills the plot, a bar of count c stands log(1+c)/log(1+peak) of it
    assert chart.bars[0].height == chart.plot_h
    assert chart.bars[9].height == pytest.approx(chart.plot_h * np.log10(101) / np.log10(1001), abs=0.05)


def test_histogram_geometry():
    # two bins of width 0.1 from 0.1; linear scale: heights 1/4 and 4/4 of the plot
    chart = histogram_chart([0.1, 0.2, 0.3], [1, 4], "scores", "score")
    assert [b.label for b in chart.bars] == ["0.100–0.200", "0.200–0.300"]
    assert [b.height for b in chart.bars] == [chart.plot_h / 4, chart.plot_h]
    assert [b.x for b in chart.bars] == [chart.left + 0.5, chart.left + chart.plot_w / 2 + 0.5]
    assert [t.label for t in chart.ticks] == ["0.100", "0.200", "0.300"]
    assert [m.label for m in chart.marks] == ["0", "2", "4"]
    assert histogram_chart([], [], "t", "x").problem == "no values"
    assert histogram_chart([0, "<b>1</b>"], [3], "t", "x").problem == NOT_NUMBERS
    assert value_counts_chart({"<b>": 1}, "t", "x").problem == NOT_NUMBERS


def test_a_run_without_written_samples_still_gets_a_report(tmp_path):
    expected = make_run(tmp_path, plan=[["f", "f", "d"]])
    text = build_report(expected["run_dir"]).read_text(encoding="utf-8")
    assert "nothing to show: no written samples" in text
    assert re.search(r'<div class="n">2</div><div>failed</div>', text)
    assert "<img " not in text


@pytest.mark.parametrize("missing, why", [
    ({"CHROMIUM": None}, "Debian's chromium is not installed"),
    ({"CHROMEDRIVER": None}, "Debian's chromium-driver is not installed"),
    ({"CHROMIUM": None, "CHROMEDRIVER": None}, "Debian's chromium and chromium-driver are not installed"),
    ({"SELENIUM": False}, "selenium is not installed"),
])
def test_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch, missing, why):
    for name, value in missing.items():
        monkeypatch.setattr(browser, name, value)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="refusing to skip the browser tests in CI") as failed:
        require_chromium()
    assert str(failed.value).startswith(why)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=why):
        require_chromium()


# ---- markup in every value the report reads ------------------------------------------------------

PAYLOADS = [
    "<img src=x onerror=alert({n})>",
    "<svg onload=alert({n})>",
    "\"'><script>alert({n})</script>",
    "</pre></td></div><script>alert({n})</script>",
    "<iframe srcdoc=\"<script>alert({n})</script>\"></iframe>",
    "</title></style><body onload=alert({n})>",
    "<a href=javascript:alert({n})>x</a>",
    "<details open ontoggle=alert({n})>",
]


class Markup:
    """Hands out payloads numbered by field, and remembers which field got which."""

    def __init__(self):
        self.fields = {}

    def __call__(self, field):
        n = len(self.fields)
        self.fields[field] = PAYLOADS[n % len(PAYLOADS)].format(n=n)
        return self.fields[field]


def _inject_record(record, markup):
    """Markup in the record's caption (before it, and as an unmatched phrase after it), raw caption,
    segment labels, model ids and provenance; spans shifted so that the record stays valid."""
    key = record.key
    head, tail = markup(f"record {key} caption"), markup(f"record {key} phrase")
    shift = len(head) + 1
    for ph in record.phrases:
        ph.start, ph.end = ph.start + shift, ph.end + shift
    for s in record.segments:
        if s.start is not None:
            s.start, s.end = s.start + shift, s.end + shift
        s.coco_label = markup(f"record {key} segment {s.id} label")
    record.caption = f"{head} {record.caption} {tail}"
    record.phrases.append(Phrase(tail, len(record.caption) - len(tail), len(record.caption), segment_id=None))
    record.unmatched_phrases.append(len(record.phrases) - 1)
    for m in (record.scores.clip, record.scores.sbert, record.scores.product):
        m.append([0.0] * len(record.scores.segment_ids))
    record.caption_raw = markup(f"record {key} caption_raw")
    record.models = {stage: markup(f"record {key} model {stage}") for stage in record.models}
    pv = record.provenance
    pv.path, pv.license, pv.author = (markup(f"record {key} provenance {f}") for f in ("path", "license", "author"))
    pv.photo_title, pv.photo_url = markup(f"record {key} photo_title"), markup(f"record {key} photo_url")
    return record.validate()


def _inject_json(value, markup, path, keys_of=()):
    """Every leaf replaced by markup; dict keys too under the paths in ``keys_of`` (keys that are data)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            name = markup(f"{path}.{k} (key)") if path in keys_of else k
            out[name] = _inject_json(v, markup, f"{path}.{k}", keys_of)
        return out
    if isinstance(value, list):
        return [_inject_json(v, markup, f"{path}[{i}]", keys_of) for i, v in enumerate(value)]
    return markup(path)


def _inject_table(path, markup, keep):
    """Rewrite a parquet table with markup in every column but ``keep`` (those stay as they are)."""
    rows = pq.read_table(path).to_pylist()
    out = [{c: v if c in keep else markup(f"{path.name} row {i} {c}") for c, v in r.items()} for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(out), path)


@pytest.fixture(scope="module")
def injected(tmp_path_factory):
    """A run with markup in every value the report reads: records, shard entries, run.json, the tables."""
    root = tmp_path_factory.mktemp("markup-run")
    markup = Markup()
    run_name = markup("run folder name")  # the run's folder name is shown too
    real_make_sample = run_factory.make_sample

    def make_sample(*args, **kwargs):
        image, seg, record = real_make_sample(*args, **kwargs)
        return image, seg, _inject_record(record, markup)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_factory, "make_sample", make_sample)
        expected = make_run(root, run=run_name, plan=[["w", "w", "f", "w"], ["w", "d", "f"], ["w", "f"]],
                            failed_shards=(2,))
    run_dir = expected["run_dir"]
    run = json.loads((run_dir / "run.json").read_text())
    run = _inject_json(run, markup, "run.json", keys_of=("run.json.models",))
    run[markup("run.json extra key")] = markup("run.json extra value")
    (run_dir / "run.json").write_text(json.dumps(run))
    for entry_path in sorted((run_dir / "shards").glob("*.json")):  # file names and reasons, as a job writes them
        entry = json.loads(entry_path.read_text())
        for s in entry["samples"]:
            s["rel_path"] = markup(f"{entry_path.name} {s['key']} rel_path")
            if s["reason"] is not None:
                s["reason"] = markup(f"{entry_path.name} {s['key']} reason")
        if entry["error"] is not None:
            entry["error"] = markup(f"{entry_path.name} error")
        entry_path.write_text(json.dumps(entry))
    tables = write_manifest_tables(run_dir)
    time.sleep(0.01)  # the edited tables stay newer than the manifests: the report reads them as they are
    summary = json.loads(tables.summary.read_text())
    version = summary.pop("tables_version")  # an edited version would only make the report rebuild the tables
    summary = _inject_json(summary, markup, "summary.json",
                           keys_of=("summary.json.failures_by_reason", "summary.json.matched_labels",
                                    *(f"summary.json.per_image.{k}" for k in summary["per_image"])))
    tables.summary.write_text(json.dumps({**summary, "tables_version": version}))
    _inject_table(tables.shards, markup, keep={"shard", "tar"})
    _inject_table(tables.samples, markup, keep={"key", "shard", "status"})
    page = build_report(run_dir)
    assert json.loads(tables.summary.read_text())["counts"]["written"] == markup.fields["summary.json.counts.written"]
    return expected, markup, page


def test_markup_in_every_value_is_shown_as_text(injected):
    expected, markup, path = injected
    text = path.read_text(encoding="utf-8")
    assert len(markup.fields) > 400

    # no payload got into the page as markup: not even its opening tag appears unescaped
    for payload in PAYLOADS:
        opening = payload.split("{n}")[0].split("alert(")[0]
        assert opening not in text, opening
    for tag in ("<script", "<iframe", "<a ", "<details open", "<body onload", "<svg onload"):
        assert tag not in text, tag
    page = check_markup_is_the_pages_own(text, len(expected["written"]))

    # ... and the values are on the page as text, one field each: from every file the report reads
    shown = {field for field, payload in markup.fields.items()  # run.json is also shown as JSON: " as \"
             if payload in page.text or json.dumps(payload, ensure_ascii=False)[1:-1] in page.text}
    must_show = [
        "run folder name",
        "run.json.status", "run.json.profile", "run.json.models.clip (key)", "run.json.models.clip",
        "run.json extra key", "run.json extra value",
        "summary.json.thresholds.ambiguous_margin", "summary.json.counts.written", "summary.json.counts.failed",
        "summary.json.counts.sources", "summary.json.counts.shards", "summary.json.counts.with_matched_person",
        "summary.json.counts.no_person", "summary.json.shard_bytes", "summary.json.shard_seconds",
        "summary.json.quantiles.min_match_score.median",
        *[f"summary.json.by_object_type.person.{f}" for f in (
            "images_with_subject", "subjects", "images_with_segment", "unmatched_segments")],
        *[f for f in markup.fields if f.startswith("summary.json.failures_by_reason.") and f.endswith((
            "(key)", ".count", "examples[0].reason", "examples[0].source_id"))],
        *[f"shards.parquet row {i} {c}" for i in range(3)
          for c in ("name", "status", "samples", "written", "skipped", "failed", "bytes", "seconds")],
        *[f"samples.parquet row {i} {c}" for i in (0, 1, 3) for c in (
            "source_id", "rel_path", "split", "shard_name", "min_match_score", "n_matched", "n_phrases")],
        *[f"record {key} {f}" for key in expected["written"] for f in (
            "caption", "phrase", "segment 1 label", "provenance author", "provenance license")],
    ]
    assert sum(f.startswith("summary.json.failures_by_reason.") for f in must_show) >= 8
    assert [f for f in must_show if f not in shown] == []
    # values that are not numbers are not charted; the charts say so (+ people per image: the records'
    # labels are markup, so no person subject has a score to chart)
    assert page.text.count(NOT_NUMBERS) == 8 + 1


def test_markup_in_every_value_runs_no_script_in_chromium(injected, chromium):
    expected, markup, path = injected
    page = chromium.visit(path.resolve().as_uri())
    assert page.scripts == []  # no script ran while the page loaded and settled
    state = chromium.evaluate(
        "({scripts: document.scripts.length,"
        " frames: document.querySelectorAll('iframe, object, embed, a, details[open]').length,"
        " handlers: Array.from(document.querySelectorAll('*')).flatMap(e => Array.from(e.attributes))"
        "   .filter(a => a.name.startsWith('on')).length,"
        " images: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length,"
        " text: document.body.innerText})",
    )
    assert page.errors == []
    requested = page.requests
    assert all(u.startswith(("file:", "data:")) for u in requested), requested
    assert (state["scripts"], state["frames"], state["handlers"]) == (0, 0, 0)
    assert state["images"] == len(expected["written"])
    for field in ("summary.json.thresholds.ambiguous_margin", "summary.json.counts.failed",
                  "shards.parquet row 0 samples", "record 00000 caption"):
        assert markup.fields[field] in state["text"], field


def test_the_browser_check_sees_markup_that_runs(chromium, tmp_path):
    """The checks above can fail: the same observation of a page with unescaped markup sees it run."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><title>t</title><body><p>x</p>"
                   "<img src=x onerror=\"document.title='ran'\"><svg onload=\"document.body.dataset.svg=1\"></svg>")
    page = chromium.visit(bad.as_uri())
    assert len(page.scripts) >= 2
    assert [e["source"] for e in page.errors] == ["network"]  # the image x that is not there
    assert chromium.evaluate("[document.title, document.body.dataset.svg]") == ["ran", "1"]
    bad.write_text("<!doctype html><body><img src=x onerror=alert(1)>")
    with pytest.raises(AssertionError, match="a script ran in the report and opened a dialog"):
        chromium.visit(bad.as_uri())
    assert chromium.last_dialog["params"]["message"] == "1"
    chromium.driver.switch_to.alert.accept()


@pytest.mark.parametrize("table, column, payload, message", [
    (SHARDS_TABLE, "tar", PAYLOADS[0], "shard not found: <img src=x onerror=alert(0)>"),
    (SHARDS_TABLE, "shard", PAYLOADS[1],
     "in shard 0, for which shards.parquet names no tar; rebuild the tables with --rebuild-tables"),
    (SAMPLES_TABLE, "key", PAYLOADS[2], "sample(s) ['\"\\'><script>alert(0)</script>'] not found"),
])
def test_markup_where_the_report_looks_up_shards_is_refused_with_one_line(report, tmp_path, capsys, table, column,
                                                                          payload, message):
    expected, _ = report
    run_dir = tmp_path / "copy"
    shutil.copytree(expected["run_dir"], run_dir)
    (run_dir / "report.html").unlink()
    rows = pq.read_table(run_dir / table).to_pylist()
    rows = [{**r, column: payload.format(n=0)} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), run_dir / table)
    assert main(["report", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("subject-ffhq report: ") and message in err, err
    assert not (run_dir / "report.html").exists()
