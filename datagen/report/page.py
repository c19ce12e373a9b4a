"""The match-quality report: one self-contained static ``report.html`` per run.

Built from the run's tables (:mod:`datagen.manifests.tables`, built first when missing or stale)
and, for the gallery only, the few samples it shows, read from the shards by member name.

Self-contained: no network, no server, no external script, stylesheet, font or image. Charts are
inline SVG; gallery thumbnails are base64 JPEGs drawn by :func:`datagen.report.record_figure.overlay`;
the one inline script only marks, on ``<body>``, how many images loaded (for checks).

Bounded at any run size: every table and chart has a fixed number of rows / bars (failure kinds
top 50, slowest shards top 20, count histograms up to :data:`MAX_BARS` bars plus an overflow bar),
and the gallery is capped both by count (``gallery_max``, default 240) and by encoded size
(``gallery_budget``, default 8 MiB of base64 thumbnails). The page outside the gallery stays well
under 1 MiB, so a report is at most about ``gallery_budget`` + 1 MiB, whether the run has 10 or
70 000 samples.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from datagen.files import atomic_write
from datagen.manifests.run_manifest import load_run_manifest
from datagen.manifests.tables import ensure_tables
from datagen.record.quality import FLAG_NAMES
from datagen.report.record_figure import caption_runs, hex_colour, overlay, segment_styles
from datagen.shards.reader import iter_samples

REPORT = "report.html"
MAX_BARS = 50
GALLERY_MAX = 240
THUMB_SIDE = 256
THUMB_QUALITY = 70
GALLERY_BUDGET = 8 << 20

FLAG_TITLES = {
    "unmatched_person_segment": "unmatched person segment",
    "unmatched_subject_phrase": "unmatched subject phrase",
    "ambiguous_match": "ambiguous match",
    "no_person": "no person",
    "no_match": "no match",
}


@dataclass
class GalleryPick:
    row: dict
    section: str
    tags: list[str] = field(default_factory=list)


def select_gallery(rows: list[dict], gallery_max: int = GALLERY_MAX) -> list[GalleryPick]:
    """Which written samples the gallery shows, in sections, each sample once.

    Half the places go to the lowest weakest-match scores, then a fifth to the smallest margins
    (near ties), the rest round-robin over the flags (images with no match at all, unmatched person
    segment, unmatched subject phrase, no person), each flag's samples weakest first.
    """
    written = [r for r in rows if r["status"] == "written"]
    for r in written:
        r["no_match"] = r["n_matched"] == 0

    def weakest_first(r):
        return (r["min_match_score"] if r["min_match_score"] is not None else -math.inf, r["source_id"])

    picked: dict[str, GalleryPick] = {}

    def take(candidates, section, limit):
        n = 0
        for r in candidates:
            if n >= limit or len(picked) >= gallery_max:
                break
            if r["key"] not in picked:
                picked[r["key"]] = GalleryPick(r, section)
                n += 1

    matched = sorted((r for r in written if r["n_matched"]), key=weakest_first)
    take(matched, "Weakest matches", gallery_max // 2)
    near_ties = sorted((r for r in written if r["min_margin"] is not None and r["ambiguous_match"]),
                       key=lambda r: (r["min_margin"], r["source_id"]))
    take(near_ties, "Near ties (ambiguous matches)", gallery_max // 5)
    queues = {f: sorted((r for r in written if r[f]), key=weakest_first)
              for f in ("no_match", "unmatched_person_segment", "unmatched_subject_phrase", "no_person")}
    positions = dict.fromkeys(queues, 0)
    while len(picked) < gallery_max and any(positions[f] < len(q) for f, q in queues.items()):
        for f, q in queues.items():
            while positions[f] < len(q) and q[positions[f]]["key"] in picked:
                positions[f] += 1
            if positions[f] < len(q) and len(picked) < gallery_max:
                r = q[positions[f]]
                picked[r["key"]] = GalleryPick(r, f"Flagged: {FLAG_TITLES[f]}")
                positions[f] += 1
    for p in picked.values():
        p.tags = [FLAG_TITLES[f] for f in ("no_match", *FLAG_NAMES) if p.row.get(f)]
    return list(picked.values())


def build_report(
    run_dir: str | Path,
    shards_dir: str | Path | None = None,
    gallery_max: int = GALLERY_MAX,
    thumb_side: int = THUMB_SIDE,
    gallery_budget: int = GALLERY_BUDGET,
    rebuild_tables: bool = False,
) -> Path:
    """Write ``report.html`` into the run folder (atomically) and return its path."""
    run_dir = Path(run_dir)
    tables = ensure_tables(run_dir, shards_dir, rebuild=rebuild_tables)
    summary = json.loads(tables.summary.read_text(encoding="utf-8"))
    rows = pq.read_table(tables.samples).to_pylist()
    shards = pq.read_table(tables.shards).to_pylist()
    run = load_run_manifest(run_dir)
    picks = select_gallery(rows, gallery_max)
    cards, dropped = _gallery_cards(picks, shards, thumb_side, gallery_budget, run_dir.name)
    page = _page(run_dir, run, summary, shards, picks, cards, dropped, gallery_max)
    return atomic_write(run_dir / REPORT, page)


# ---- gallery ---------------------------------------------------------------------------------


def _gallery_cards(picks, shards, thumb_side, budget, run_name) -> tuple[dict[str, str], int]:
    """Render the picked samples (HTML per key), stopping when the thumbnail budget is spent."""
    tar_of = {s["shard"]: Path(s["tar"]) for s in shards if s["tar"]}
    by_shard: dict[int, list[str]] = defaultdict(list)
    for p in picks:
        by_shard[p.row["shard"]].append(p.row["key"])
    pick_of = {p.row["key"]: p for p in picks}
    rendered: dict[str, tuple[str, int]] = {}  # key -> (card html, base64 length)
    for shard, keys in by_shard.items():  # one shard at a time: only its few samples are decoded
        for key, sample in iter_samples(tar_of[shard], keys):
            img = overlay(sample.image, sample.segment_map, sample.record, max_side=thumb_side)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=THUMB_QUALITY, optimize=True)
            b64 = base64.b64encode(buf.getvalue()).decode("ascii")
            rendered[key] = (_card(pick_of[key], sample.record, b64, img.size, run_name), len(b64))
    cards, spent, dropped = {}, 0, 0
    for p in picks:  # the budget is spent in gallery order: the weakest samples come first
        card, size = rendered[p.row["key"]]
        if spent + size > budget:
            dropped += 1
            continue
        spent += size
        cards[p.row["key"]] = card
    return cards, dropped


def _card(pick: GalleryPick, record, b64: str, size: tuple[int, int], run_name: str) -> str:
    r = pick.row
    styles = segment_styles(record)
    cap = []
    for text, kind, badge in caption_runs(record):
        if kind == "matched":
            colour = next(st.colour for st in styles.values() if st.badge == badge)
            cap.append(f'<span class="m" style="background:{hex_colour(colour)}">{_e(text)}<sup>{badge}</sup></span>')
        elif kind == "unmatched":
            cap.append(f'<span class="u" title="unmatched phrase">{_e(text)}</span>')
        else:
            cap.append(_e(text))
    legend = []
    margins = dict(zip(r["matched_segment_ids"] or [], r["match_margins"] or [], strict=False))
    for sid, st in styles.items():
        if not st.badge:
            continue
        margin = margins.get(sid)
        extra = f" <span class=dim>margin {margin:.3f}</span>" if margin is not None else ""
        legend.append(f'<li><span class="b" style="background:{hex_colour(st.colour)}">{_e(st.badge)}</span>'
                      f"{_e(st.label)}{extra}</li>")
    tags = "".join(f'<span class="tag">{_e(t)}</span>' for t in pick.tags)
    weakest = "—" if r["min_match_score"] is None else f"{r['min_match_score']:.3f}"
    w, h = size
    return (
        f'<div class="card" id="s{_e(r["key"])}" title="subject-ffhq inspect {_e(run_name)} {_e(r["source_id"])}">'
        f'<img alt="sample {_e(r["key"])}" width="{w}" height="{h}" src="data:image/jpeg;base64,{b64}">'
        f'<div class="meta"><b>source {_e(r["source_id"])}</b> · key {_e(r["key"])} · {_e(r["split"])} · '
        f'{_e(r["shard_name"])}<br>weakest <b>{weakest}</b> · {r["n_matched"]} matched of {r["n_phrases"]} phrases, '
        f'{r["n_person_segments"]} person segment(s)</div>'
        f'<div class="cap">{"".join(cap)}</div><ul class="legend">{"".join(legend)}</ul>'
        f"<div>{tags}</div></div>"
    )


# ---- charts ----------------------------------------------------------------------------------


def svg_histogram(edges: list[float], counts: list[int], title: str, xlabel: str, log: bool = False) -> str:
    """Equal-width bins as an inline SVG bar chart."""
    if not counts:
        return f'<figure class="chart"><figcaption>{_e(title)}</figcaption><p class="dim">no values</p></figure>'
    labels = [f"{edges[i]:.3f}–{edges[i + 1]:.3f}" for i in range(len(counts))]
    ticks = {0: f"{edges[0]:.3f}", len(counts) // 2: f"{edges[len(counts) // 2]:.3f}", len(counts): f"{edges[-1]:.3f}"}
    return _svg_bars(labels, counts, title, xlabel, log, ticks, show_values=False)


def svg_value_counts(value_counts: dict[str, int], title: str, xlabel: str, log: bool = True) -> str:
    """Integer values 0..max as bars (one per value; beyond :data:`MAX_BARS` one overflow bar)."""
    if not value_counts:
        return f'<figure class="chart"><figcaption>{_e(title)}</figcaption><p class="dim">no values</p></figure>'
    items = sorted(((int(k), v) for k, v in value_counts.items()))
    if len(items) > MAX_BARS:
        head, tail = items[: MAX_BARS - 1], items[MAX_BARS - 1 :]
        items = [(str(k), v) for k, v in head] + [(f"≥{tail[0][0]}", sum(v for _, v in tail))]
    else:
        items = [(str(k), v) for k, v in items]
    labels = [k for k, _ in items]
    counts = [v for _, v in items]
    step = max(1, math.ceil(len(labels) / 12))
    ticks = {i + 0.5: labels[i] for i in range(0, len(labels), step)}
    return _svg_bars(labels, counts, title, xlabel, log, ticks, show_values=True)


def _svg_bars(labels, counts, title, xlabel, log, ticks, show_values) -> str:
    width, height, left, bottom, top = 560, 230, 52, 40, 14
    pw, ph = width - left - 24, height - bottom - top
    peak = max(counts) or 1

    def scale(v: float) -> float:
        if log:
            return math.log10(1 + v) / math.log10(1 + peak)
        return v / peak

    bw = pw / len(counts)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="{_e(title)}">',
             f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#444"/>']
    if log:
        marks = sorted({0, peak, *(10**k for k in range(0, 8) if 10**k < peak * 0.7)})
    else:
        marks = [0, peak / 2, peak]
    for v in marks:
        y = top + ph - scale(v) * ph
        parts.append(f'<line x1="{left - 3}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#444"/>'
                     f'<text x="{left - 5}" y="{y + 3.5:.1f}" text-anchor="end" class="ax">{_num(v)}</text>')
    for i, (lab, c) in enumerate(zip(labels, counts, strict=True)):
        h = scale(c) * ph
        x = left + i * bw
        parts.append(f'<rect x="{x + 0.5:.1f}" y="{top + ph - h:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                     f'height="{h:.1f}" fill="#4878a8"><title>{_e(lab)}: {c}</title></rect>')
        if show_values and c and bw >= 9:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{top + ph - h - 2:.1f}" text-anchor="middle" '
                         f'class="val">{c}</text>')
    for pos, lab in ticks.items():
        parts.append(f'<text x="{left + pos * bw:.1f}" y="{top + ph + 14}" text-anchor="middle" class="ax">{_e(lab)}</text>')
    scale_note = " (log scale)" if log else ""
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" class="ax">{_e(xlabel)}</text>')
    parts.append("</svg>")
    return f'<figure class="chart"><figcaption>{_e(title)}{scale_note}</figcaption>{"".join(parts)}</figure>'


# ---- page ------------------------------------------------------------------------------------


def _page(run_dir, run, summary, shards, picks, cards, dropped, gallery_max) -> str:
    c = summary["counts"]
    q = summary["quantiles"]
    hist = summary["histograms"]
    per = summary["per_image"]
    written = c["written"] or 0

    def pct(n):
        return f"{100 * n / written:.1f}%" if written else "—"

    headline = [
        ("source images", c["sources"], f"{c['shards']} shard(s), {c['shards_failed']} failed"),
        ("written", written, f"train {c['train']} · test {c['test']}"),
        ("duplicates skipped", c["duplicate"], ""),
        ("failed", c["failed"], f"{len(summary['failures_by_reason'])} reason kind(s)"),
        ("with a matched person", c["with_matched_person"], pct(c["with_matched_person"])),
        ("matched subjects", c["matches"], f"{c['matches'] / written:.2f} per image" if written else ""),
        ("weakest match, median", _fmt(q["min_match_score"].get("median")),
         f"p05 {_fmt(q['min_match_score'].get('p05'))}"),
        ("flagged images", c["flagged"], pct(c["flagged"])),
    ]
    cards_html = "".join(
        f'<div class="stat"><div class="n">{_e(str(v))}</div><div>{_e(k)}</div><div class="dim">{_e(s)}</div></div>'
        for k, v, s in headline
    )
    flags = "".join(f"<tr><td>{_e(FLAG_TITLES[f])}</td><td>{c[f]}</td><td>{pct(c[f])}</td></tr>" for f in FLAG_NAMES)
    failures = "".join(
        f"<tr><td>{_e(kind)}</td><td>{v['count']}</td><td>{_e(', '.join(x['source_id'] for x in v['examples']))}</td>"
        f"<td class=reason>{_e(v['examples'][0]['reason'] if v['examples'] else '')}</td></tr>"
        for kind, v in list(summary["failures_by_reason"].items())[:50]
    ) or '<tr><td colspan="4" class="dim">no failures</td></tr>'
    slow = sorted(shards, key=lambda s: (s["status"] == "done", -s["seconds"]))[:20]  # failed shards first
    shard_rows = "".join(
        f"<tr><td>{_e(s['name'])}</td><td>{_e(s['status'])}</td><td>{s['samples']}</td><td>{s['written']}</td><td>{s['skipped']}</td>"
        f"<td>{s['failed']}</td><td>{s['bytes'] / 2**20:.1f}</td><td>{s['seconds']:.1f}</td></tr>" for s in slow
    )
    run_json = json.dumps(run, indent=1, ensure_ascii=False, default=str)
    if len(run_json) > 20000:
        run_json = run_json[:20000] + "\n… (truncated; see run.json)"

    charts = "".join([
        svg_histogram(hist["match_score"]["edges"], hist["match_score"]["counts"],
                      "Match scores (every match)", "CLIP × SBERT score"),
        svg_histogram(hist["min_match_score"]["edges"], hist["min_match_score"]["counts"],
                      "Weakest match per image", "lowest match score of the image"),
        svg_histogram(hist["min_margin"]["edges"], hist["min_margin"]["counts"],
                      f"Margin to the runner-up (ambiguous below {summary['thresholds']['ambiguous_margin']})",
                      "smallest margin of the image"),
        svg_value_counts(per.get("n_matched", {}), "Matched subjects per image", "matched subjects"),
        svg_value_counts(per.get("n_matched_person", {}), "Matched people per image", "matched person segments"),
        svg_value_counts(per.get("n_person_segments", {}), "Person segments per image", "person segments"),
        svg_value_counts(per.get("n_segments", {}), "Segments per image", "panoptic segments"),
        svg_value_counts(per.get("n_phrases", {}), "Noun phrases per caption", "phrases"),
    ])

    sections: dict[str, list[str]] = {}
    for p in picks:
        if p.row["key"] in cards:
            sections.setdefault(p.section, []).append(cards[p.row["key"]])
    gallery = "".join(
        f'<h3>{_e(name)} <span class="dim">({len(items)})</span></h3><div class="grid">{"".join(items)}</div>'
        for name, items in sections.items()
    ) or '<p class="dim">nothing to show: no written samples</p>'
    note = (f"Showing {len(cards)} samples (cap {gallery_max}"
            + (f"; {dropped} more left out to keep the file small" if dropped else "") + "). "
            "Hover a card for the command that draws it in full.")
    models = run.get("models") if isinstance(run.get("models"), dict) else {}
    model_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(str(v))}</td></tr>" for k, v in models.items())
    generated = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>subject-ffhq report · {_e(run_dir.name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>subject-ffhq · run <code>{_e(run_dir.name)}</code></h1>
<p class="dim">{_e(str(run_dir))} · generated {generated} · {_e(_run_state(run, c))} · shards
{summary['shard_bytes'] / 2**20:.1f} MiB, {summary['shard_seconds']:.0f} shard-seconds</p>
<section><div class="stats">{cards_html}</div></section>
<section><h2>Distributions</h2><div class="charts">{charts}</div></section>
<section class="cols">
<div><h2>Flags</h2><table><tr><th>flag</th><th>images</th><th>of written</th></tr>{flags}</table>
<p class="dim">ambiguous = smallest margin to the runner-up below {summary['thresholds']['ambiguous_margin']};
margin of a match = its score minus the best alternative the greedy matcher had when it picked it
(the same phrase with a still-free segment, or the same segment with a still-free phrase).</p></div>
<div><h2>Failures by reason</h2><table><tr><th>reason</th><th>count</th><th>source ids (first 5)</th>
<th>example</th></tr>{failures}</table></div>
</section>
<section><h2>Gallery: where matching is weakest</h2><p class="dim">{_e(note)}</p>{gallery}</section>
<section class="cols">
<div><h2>Failed and slowest shards</h2><table><tr><th>shard</th><th>status</th><th>sources</th><th>written</th><th>dup.</th><th>failed</th>
<th>MiB</th><th>s</th></tr>{shard_rows}</table></div>
<div><h2>Models</h2><table>{model_rows or '<tr><td class="dim">run.json names no models</td></tr>'}</table>
<details><summary>run.json</summary><pre>{_e(run_json)}</pre></details></div>
</section>
<script>{_JS}</script>
</body></html>
"""


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:24px 0 8px} h3{font-size:15px;margin:18px 0 6px}
.dim{color:#777;font-size:12px} code{font-size:90%}
.stats{display:flex;flex-wrap:wrap;gap:10px}
.stat{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:130px}
.stat .n{font-size:22px;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:12px}
figure.chart{background:#fff;border:1px solid #ddd;border-radius:6px;margin:0;padding:6px}
figure.chart figcaption{font-size:13px;font-weight:600;margin:2px 4px}
svg .ax{font-size:10px;fill:#444} svg .val{font-size:8px;fill:#333}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.reason{max-width:420px;overflow-wrap:anywhere;font-size:12px}
.cols{display:flex;flex-wrap:wrap;gap:32px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;width:260px;font-size:12px}
.card img{display:block;max-width:256px;height:auto;margin:0 auto 4px}
.cap{margin:4px 0;font-size:13px;line-height:1.6}
.cap .m{color:#fff;padding:1px 3px;border-radius:3px} .cap .u{border:1px dashed #999;padding:0 2px}
.legend{list-style:none;padding:0;margin:2px 0}
.b{display:inline-block;min-width:15px;text-align:center;border-radius:8px;color:#fff;margin-right:4px;font-size:11px}
.tag{display:inline-block;background:#fde2c8;border-radius:3px;padding:0 4px;margin:2px 3px 0 0;font-size:11px}
pre{max-height:320px;overflow:auto;background:#fff;border:1px solid #ddd;padding:6px;font-size:11px}
"""

_JS = """
(function () {
  function mark() {
    var imgs = document.images, ok = 0;
    for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
    document.body.setAttribute("data-images-total", String(imgs.length));
    document.body.setAttribute("data-images-loaded", String(ok));
  }
  window.addEventListener("load", mark);
})();
"""


def _run_state(run: dict, counts: dict) -> str:
    """What run.json says about the run as a whole (status, planned shards, pending images), if anything."""
    parts = []
    if run.get("status"):
        parts.append(f"run status {run['status']}")
    plan = run.get("plan") if isinstance(run.get("plan"), dict) else {}
    if isinstance(plan.get("shards"), int):
        parts.append(f"{counts['shards']} of {plan['shards']} planned shards have entries")
    run_counts = run.get("counts") if isinstance(run.get("counts"), dict) else {}
    if run_counts.get("pending"):
        parts.append(f"{run_counts['pending']} source images pending")
    return " · ".join(parts) or "no run.json"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:.1f}"
