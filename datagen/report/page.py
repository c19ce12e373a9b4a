"""The match-quality report: one self-contained static ``report.html`` per run.

Built from the run's tables (:mod:`datagen.manifests.tables`, built first when missing or stale),
``run.json`` and, for the gallery only, the few samples it shows, read from the shards by member
name. This module gathers the values; ``templates/report.html.j2`` lays them out. Jinja2 escapes
every value the page shows (autoescape), whatever file it came from, so an edited table or a
caption with markup in it is shown as text.

Self-contained and script-free: no network, no server, no script, no external stylesheet, font or
image. Charts are inline SVG (:mod:`datagen.report.charts`); gallery thumbnails are base64 JPEGs
(:mod:`datagen.report.gallery`).

Bounded at any run size: every table and chart has a fixed number of rows / bars (failure kinds
top 50, slowest shards top 20, count histograms up to :data:`~datagen.report.charts.MAX_BARS`
bars plus an overflow bar), and the gallery is capped both by count (``gallery_max``, default 240)
and by encoded size (``gallery_budget``, default 8 MiB of base64 thumbnails). The page outside the
gallery stays well under 1 MiB, so a report is at most about ``gallery_budget`` + 1 MiB, whether
the run has 10 or 70 000 samples.

A run made with random weights (:func:`datagen.manifests.tables.random_weights`) says so on the
page's first line.

**Object types.** Besides the person figures (FastComposer's default subjects), the page shows, for
each object type of the run's ``subjects.object_types`` (``summary.json``'s; or, for ``object_types``
given, summed up from the same tables without touching ``summary.json``), a table row
(images with such a subject, subjects, unmatched segments, median score) and a histogram of its
subjects' match scores: the summary's ``by_object_type``.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import jinja2

from datagen import storage
from datagen.files import atomic_write
from datagen.manifests.run_manifest import load_run_manifest
from datagen.manifests.tables import (
    build_summary,
    ensure_tables,
    random_weights,
    random_weights_note,
    read_table,
)
from datagen.record.quality import AMBIGUOUS_MARGIN, FLAG_NAMES
from datagen.record.schema import FACE_FLAG_NAMES
from datagen.report.charts import Chart, histogram_chart, value_counts_chart
from datagen.report.gallery import (
    FLAG_TITLES,
    GALLERY_BUDGET,
    GALLERY_MAX,
    THUMB_SIDE,
    draw_cards,
    sections,
    select_gallery,
)
from datagen.report.identities import IdentitySection, identity_section
from datagen.report.values import as_dict, as_number, fixed, mib, percent_of, ratio, show

__all__ = ["GALLERY_BUDGET", "GALLERY_MAX", "REPORT", "THUMB_SIDE", "build_report", "render_page"]

REPORT = "report.html"
TEMPLATE = "report.html.j2"
RUN_JSON_SHOWN = 20000  # characters of run.json shown on the page

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("datagen.report", "templates"),
    autoescape=True,  # every value, from every file, is escaped here and nowhere else
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def build_report(
    run_dir: str | Path,
    shards_dir: str | Path | None = None,
    gallery_max: int = GALLERY_MAX,
    thumb_side: int = THUMB_SIDE,
    gallery_budget: int = GALLERY_BUDGET,
    rebuild_tables: bool = False,
    object_types: tuple[str, ...] | None = None,
) -> Path:
    """Write ``report.html`` into the run folder (atomically) and return its path. ``object_types``:
    the labels of the per-type figures (default: the run's ``subjects.object_types``)."""
    run_dir = storage.path(run_dir)
    tables = ensure_tables(run_dir, shards_dir, rebuild=rebuild_tables)
    summary = json.loads(tables.summary.read_text(encoding="utf-8"))
    samples_table, shards_table = read_table(tables.samples), read_table(tables.shards)
    if object_types and as_dict(summary).get("object_types") != list(object_types):
        # other object types than the run's: the same tables, summed up for them (summary.json stays the run's)
        margin = as_number(as_dict(as_dict(summary).get("thresholds")).get("ambiguous_margin"))
        summary = build_summary(run_dir, shards_table, samples_table,
                                AMBIGUOUS_MARGIN if margin is None else margin, tuple(object_types))
    rows = samples_table.to_pylist()
    shards = shards_table.to_pylist()
    run = load_run_manifest(run_dir)
    picks = select_gallery(rows, gallery_max)
    cards, dropped = draw_cards(picks, shards, thumb_side, gallery_budget, run_dir.name)
    page = render_page(run_dir, run, as_dict(summary), shards, cards, dropped, gallery_max,
                       identity_section(run_dir, shards, rows))
    return atomic_write(run_dir / REPORT, page)


def render_page(run_dir: Path, run: dict, summary: dict, shards: list[dict], cards, dropped: int,
                gallery_max: int, identities: IdentitySection | None = None) -> str:
    """The page's HTML from the run's values (see :func:`build_report`)."""
    c = as_dict(summary.get("counts"))
    thresholds = as_dict(summary.get("thresholds"))
    weakest = as_dict(as_dict(summary.get("quantiles")).get("min_match_score"))
    failures = as_dict(summary.get("failures_by_reason"))
    written = c.get("written")
    note = f"Showing {len(cards)} samples (cap {gallery_max}"
    note += f"; {dropped} more left out to keep the file small" if dropped else ""
    note += "). Hover a card for the command that draws it in full."
    run_json = json.dumps(run, indent=1, ensure_ascii=False, default=str)
    if len(run_json) > RUN_JSON_SHOWN:
        run_json = run_json[:RUN_JSON_SHOWN] + "\n… (truncated; see run.json)"
    return _env.get_template(TEMPLATE).render(
        run_name=run_dir.name,
        run_dir=str(run_dir),
        random_weights_note=random_weights_note(run) if random_weights(run) else None,
        generated=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        run_state=_run_state(run, c),
        shard_mib=mib(summary.get("shard_bytes")),
        shard_seconds=fixed(summary.get("shard_seconds"), 0),
        ambiguous_margin=show(thresholds.get("ambiguous_margin")),
        headline=[
            ("source images", show(c.get("sources")),
             f"{show(c.get('shards'))} shard(s), {show(c.get('shards_failed'))} failed"),
            ("written", show(written), f"train {show(c.get('train'))} · test {show(c.get('test'))}"),
            ("duplicates skipped", show(c.get("duplicate")), ""),
            ("failed", show(c.get("failed")), f"{len(failures)} reason kind(s)"),
            ("with a matched person", show(c.get("with_matched_person")),
             percent_of(c.get("with_matched_person"), written)),
            ("matched subjects", show(c.get("matches")),
             f"{ratio(c.get('matches'), written)} per image" if ratio(c.get("matches"), written) else ""),
            ("weakest match, median", fixed(weakest.get("median")), f"p05 {fixed(weakest.get('p05'))}"),
            ("flagged images", show(c.get("flagged")), percent_of(c.get("flagged"), written)),
            ("face-flagged images", show(c.get("face_flagged")),
             f"{percent_of(c.get('face_flagged'), c.get('faces_checked'))} of {show(c.get('faces_checked'))} face-checked"),
        ],
        charts=_charts(summary, thresholds),
        object_types=_object_type_rows(summary),
        grounding=_grounding(summary),
        object_type_charts=_object_type_charts(summary),
        flags=[(FLAG_TITLES[f], show(c.get(f)), percent_of(c.get(f), written)) for f in FLAG_NAMES],
        face_flags=[(FLAG_TITLES[f], show(c.get(f)), percent_of(c.get(f), c.get("faces_checked"))) for f in FACE_FLAG_NAMES],
        face_note=_face_note(run, c),
        failures=[_failure_row(kind, v) for kind, v in list(failures.items())[:50]],
        shards=[_shard_row(s) for s in _failed_and_slowest(shards, 20)],
        gallery=sections(cards),
        identities=identities,
        gallery_note=note,
        models=list(as_dict(run.get("models")).items()),
        run_json=run_json,
    )


def _charts(summary: dict, thresholds: dict) -> list[Chart]:
    hist = as_dict(summary.get("histograms"))
    per = as_dict(summary.get("per_image"))

    def histogram(name, title, xlabel):
        h = as_dict(hist.get(name))
        return histogram_chart(h.get("edges"), h.get("counts"), title, xlabel)

    return [
        histogram("match_score", "Match scores (every match)", "CLIP × SBERT score"),
        histogram("min_match_score", "Weakest match per image", "lowest match score of the image"),
        histogram("min_margin", f"Margin to the runner-up (ambiguous below {show(thresholds.get('ambiguous_margin'))})",
                  "smallest margin of the image"),
        value_counts_chart(per.get("n_matched"), "Matched subjects per image", "matched subjects"),
        value_counts_chart(per.get("n_matched_person"), "Matched people per image", "matched person segments"),
        value_counts_chart(per.get("n_person_segments"), "Person segments per image", "person segments"),
        value_counts_chart(per.get("n_segments"), "Segments per image", "panoptic segments"),
        value_counts_chart(per.get("n_phrases"), "Noun phrases per caption", "phrases"),
        value_counts_chart(as_dict(summary.get("per_person_segment")).get("n_faces"), "Faces per person segment",
                           "faces the detector found inside the segment (2+: merged persons)"),
        histogram("matched_face_size", "Face size of matched people", "largest face of a matched person segment, px"),
    ]


def _by_type(summary: dict) -> list[tuple[str, dict]]:
    by_type = as_dict(summary.get("by_object_type"))
    return [(show(t), as_dict(v)) for t, v in by_type.items()]


def _object_type_rows(summary: dict) -> list[list[str]]:
    """Per object type: label, images with a subject (and share of written), subjects, images with a
    segment, unmatched segments, median subject score."""
    written = as_dict(summary.get("counts")).get("written")
    return [[label, show(v.get("images_with_subject")), percent_of(v.get("images_with_subject"), written),
             show(v.get("subjects")), show(v.get("images_with_segment")), show(v.get("unmatched_segments")),
             fixed(as_dict(v.get("match_score_quantiles")).get("median"))]
            for label, v in _by_type(summary)]


def _grounding(summary: dict) -> dict:
    """The run's grounding and, per matched label, its vocabulary and score quantiles."""
    g = as_dict(summary.get("grounding"))
    rows = []
    for label, v in as_dict(g.get("by_label")).items():
        v, q = as_dict(v), as_dict(as_dict(v).get("quantiles"))
        rows.append([label, show(v.get("vocabulary")), show(v.get("subjects")),
                     *(fixed(q.get(k)) for k in ("min", "p25", "median", "p75", "max"))])
    return {"method": show(g.get("method") or "panoptic"), "score": show(g.get("score") or "CLIP × SBERT score"),
            "rows": rows}


def _object_type_charts(summary: dict) -> list[Chart]:
    charts = []
    for label, v in _by_type(summary):
        h = as_dict(v.get("match_score"))
        charts.append(histogram_chart(h.get("edges"), h.get("counts"), f"Match scores of {label} subjects",
                                      "CLIP × SBERT score"))
        charts.append(value_counts_chart(v.get("subjects_per_image"), f"{label.capitalize()} subjects per image",
                                         f"matched {label} segments"))
    return charts


def _face_note(run: dict, counts: dict) -> str:
    """How many images the face checks covered, and under which thresholds (the run's config)."""
    faces = as_dict(as_dict(run.get("config")).get("faces"))
    where = (f"detector {show(faces.get('detector'))}, faces scoring at least {show(faces.get('min_score'))}, "
             f"small face below {show(faces.get('small_face_px'))} px, face rect covered when a person segment "
             f"holds at least {show(faces.get('primary_min_overlap'))} of it" if faces else "run.json names no face settings")
    return (f"Face checks ran on {show(counts.get('faces_checked'))} of {show(counts.get('written'))} written images "
            f"({show(counts.get('with_face_rect'))} with a face rect from the source; faces found in person "
            f"segments: {show(counts.get('faces'))}); {where}. Shares are of the face-checked images.")


def _failure_row(kind, v) -> tuple[str, str, str, str]:
    v = as_dict(v)
    examples = [as_dict(x) for x in v.get("examples")] if isinstance(v.get("examples"), list) else []
    ids = ", ".join(show(x.get("source_id")) for x in examples)
    return show(kind), show(v.get("count")), ids, show(examples[0].get("reason")) if examples else ""


def _failed_and_slowest(shards: list[dict], n: int) -> list[dict]:
    def order(s):
        seconds = as_number(s.get("seconds"))
        return (s.get("status") == "done", -(seconds if seconds is not None else 0.0))

    return sorted(shards, key=order)[:n]  # failed shards first


def _shard_row(s: dict) -> list[str]:
    return [show(s.get("name")), show(s.get("status")), show(s.get("samples")), show(s.get("written")),
            show(s.get("skipped")), show(s.get("failed")), mib(s.get("bytes")), fixed(s.get("seconds"), 1)]


def _run_state(run: dict, counts: dict) -> str:
    """What run.json says about the run as a whole (status, planned shards, pending images), if anything."""
    parts = []
    if run.get("status"):
        parts.append(f"run status {show(run['status'])}")
    plan = as_dict(run.get("plan"))
    if isinstance(plan.get("shards"), int):
        parts.append(f"{show(counts.get('shards'))} of {plan['shards']} planned shards have entries")
    if as_dict(run.get("counts")).get("pending"):
        parts.append(f"{show(run['counts']['pending'])} source images pending")
    return " · ".join(parts) or "no run.json"
