"""Draw one sample: its segments overlaid in colour and labelled, for the report gallery and ``inspect``.

Colours: each *matched* segment gets its own colour (in phrase order, the same colour in the
overlay, the caption and the tables); an *unmatched person* segment is filled grey with a white
outline and a "?" badge; other unmatched segments are only outlined, in light grey. Matched
segments carry a numbered badge (1 = first match in caption order) at their most interior pixel.
A face-checked record also shows the faces found in its person segments (yellow boxes) and the
source's face rect (cyan box), when it has one.

* :func:`overlay` — a PIL image (any size; the report uses small thumbnails), drawn with PIL + numpy.
* :func:`sample_figure` — the full ``inspect`` figure (matplotlib): the overlay with text labels,
  the caption with matched spans marked, the match table and the phrase × segment score matrix,
  under a red first line when the run used random weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from datagen.record.quality import MatchQuality, match_margins, match_quality
from datagen.record.schema import PERSON_LABEL, Record

# tab10 without its grey, then a few more distinct colours
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (0, 0, 139), (255, 215, 0), (0, 128, 128),
]
UNMATCHED_PERSON = (128, 128, 128)
UNMATCHED_OUTLINE = (220, 220, 220)
WARNING_COLOUR = "#b00020"
FACE_BOX = (255, 221, 0)
PRIMARY_FACE_BOX = (0, 229, 255)


@dataclass
class SegmentStyle:
    segment_id: int
    colour: tuple[int, int, int]
    badge: str | None  # "1", "2", … for matches, "?" for unmatched persons, None otherwise
    label: str  # what a legend says about the segment
    fill: bool


def segment_styles(record: Record) -> dict[int, SegmentStyle]:
    """Colour, badge and legend text of every segment of the record."""
    seg_by_id = {s.id: s for s in record.segments}
    styles: dict[int, SegmentStyle] = {}
    n = 0
    for ph in record.phrases:
        if ph.segment_id is None:
            continue
        s = seg_by_id[ph.segment_id]
        styles[s.id] = SegmentStyle(
            s.id, PALETTE[n % len(PALETTE)], str(n + 1), f"{ph.text} → {s.coco_label} {s.match_score:.3f}", True
        )
        n += 1
    for s in record.segments:
        if s.id in styles:
            continue
        if s.coco_label == PERSON_LABEL:
            styles[s.id] = SegmentStyle(s.id, UNMATCHED_PERSON, "?", f"unmatched {s.coco_label} (segment {s.id})", True)
        else:
            styles[s.id] = SegmentStyle(s.id, UNMATCHED_OUTLINE, None, f"unmatched {s.coco_label}", False)
    return styles


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def label_points(segment_map: np.ndarray, segment_ids: list[int]) -> dict[int, tuple[int, int]]:
    """For each segment id present, its most interior pixel (x, y) (farthest from the mask's border)."""
    points = {}
    for sid in segment_ids:
        mask = segment_map == sid
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        dist = ndimage.distance_transform_edt(np.pad(mask[y0:y1, x0:x1], 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        points[sid] = (int(x + x0), int(y + y0))
    return points


def overlay(
    image: Image.Image,
    segment_map: np.ndarray,
    record: Record,
    max_side: int | None = None,
    alpha: float = 0.45,
    badges: bool = True,
) -> Image.Image:
    """The image with segments filled / outlined in their colours and numbered badges (RGB)."""
    image = image.convert("RGB")
    seg = np.asarray(segment_map)
    scale = 1.0
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.LANCZOS)
        seg = np.asarray(Image.fromarray(seg.astype(np.int32)).resize(size, Image.NEAREST))
    styles = segment_styles(record)
    n_ids = max([int(seg.max()), *styles]) + 1 if styles else int(seg.max()) + 1
    fill_lut = np.zeros((n_ids, 4), dtype=np.float32)
    line_lut = np.zeros((n_ids, 4), dtype=np.float32)
    for sid, st in styles.items():
        c = np.asarray(st.colour, dtype=np.float32)
        if st.fill:
            fill_lut[sid] = (*c, alpha)
        line_lut[sid] = (*(c if st.colour != UNMATCHED_PERSON else np.full(3, 255.0)), 1.0)
    out = np.asarray(image, dtype=np.float32)
    fill = fill_lut[seg]
    out = out * (1 - fill[..., 3:]) + fill[..., :3] * fill[..., 3:]
    edge = np.zeros(seg.shape, dtype=bool)
    edge[:, 1:] |= seg[:, 1:] != seg[:, :-1]
    edge[:, :-1] |= seg[:, 1:] != seg[:, :-1]
    edge[1:, :] |= seg[1:, :] != seg[:-1, :]
    edge[:-1, :] |= seg[1:, :] != seg[:-1, :]
    edge &= seg > 0
    thickness = max(1, round(max(seg.shape) / 400))
    if thickness > 1:
        edge = ndimage.binary_dilation(edge, iterations=thickness - 1) & (seg > 0)
    line = line_lut[seg]
    use = edge & (line[..., 3] > 0)
    out[use] = line[use][:, :3]
    result = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    if badges:
        badged = [sid for sid, st in styles.items() if st.badge]
        draw = ImageDraw.Draw(result)
        radius = max(6, round(max(seg.shape) / 40))
        font = _font(round(radius * 1.4))
        for sid, (x, y) in label_points(seg, badged).items():
            st = styles[sid]
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=st.colour, outline=(255, 255, 255))
            draw.text((x, y), st.badge, fill=(255, 255, 255), font=font, anchor="mm")
    _draw_faces(result, record, scale, thickness)
    return result


def _draw_faces(image: Image.Image, record: Record, scale: float, width: int) -> None:
    """Faces found in person segments (yellow) and the source's face rect (cyan), scaled to ``image``."""
    fc = record.face_checks
    if fc is None:
        return
    draw = ImageDraw.Draw(image)
    width = max(2, width + 1)
    for s in record.segments:
        for f in s.faces or []:
            draw.rectangle([v * scale for v in f.box], outline=FACE_BOX, width=width)
    if fc.primary_face is not None:
        draw.rectangle([v * scale for v in fc.primary_face.rect], outline=PRIMARY_FACE_BOX, width=max(1, width - 1))


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def caption_runs(record: Record) -> list[tuple[str, str | None, str | None]]:
    """The caption cut into runs ``(text, kind, badge)``: kind ``None`` (plain), ``"matched"`` or ``"unmatched"``."""
    styles = segment_styles(record)
    marks = []
    for ph in record.phrases:
        if ph.segment_id is not None:
            marks.append((ph.start, ph.end, "matched", styles[ph.segment_id].badge))
        else:
            marks.append((ph.start, ph.end, "unmatched", None))
    marks.sort()
    runs, pos = [], 0
    for start, end, kind, badge in marks:
        if start < pos:  # overlapping phrases: keep the first
            continue
        if start > pos:
            runs.append((record.caption[pos:start], None, None))
        runs.append((record.caption[start:end], kind, badge))
        pos = end
    if pos < len(record.caption):
        runs.append((record.caption[pos:], None, None))
    return runs


def match_table_rows(record: Record, quality: MatchQuality | None = None) -> list[dict]:
    """One row per phrase: its match (segment, label, CLIP, SBERT, score, margin) or its best candidate."""
    quality = quality or match_quality(record)
    seg_by_id = {s.id: s for s in record.segments}
    margins = match_margins(record)
    styles = segment_styles(record)
    cols = record.scores.segment_ids
    rows = []
    for i, ph in enumerate(record.phrases):
        row = {"phrase": ph.text, "span": f"[{ph.start}, {ph.end})", "badge": "", "segment": "", "label": "",
               "clip": None, "sbert": None, "score": None, "margin": None, "best_other": "", "colour": None}
        if ph.segment_id is not None:
            s = seg_by_id[ph.segment_id]
            row.update(badge=styles[s.id].badge, segment=str(s.id), label=s.coco_label, clip=s.clip_sim,
                       sbert=s.sbert_sim, score=s.match_score, margin=margins.get(i), colour=styles[s.id].colour)
        elif record.scores.product and cols:
            prod = record.scores.product[i]
            j = int(np.argmax(prod))
            row["best_other"] = f"segment {cols[j]} ({seg_by_id[cols[j]].coco_label}) {prod[j]:.3f}"
        rows.append(row)
    return rows


def sample_figure(image: Image.Image, segment_map: np.ndarray, record: Record, title: str = "",
                  warning: str | None = None):
    """The ``inspect`` figure (a matplotlib Figure; the caller saves and closes it). ``warning``
    (e.g. that the run used random weights) is written in red as the figure's first line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = match_quality(record)
    styles = segment_styles(record)
    fig = plt.figure(figsize=(17, 9.5), dpi=100)
    grid = fig.add_gridspec(3, 2, width_ratios=[1, 1], height_ratios=[0.8, 1.3, 1.5], wspace=0.22, hspace=0.3,
                            left=0.02, right=0.97, top=0.94, bottom=0.12)

    ax_img = fig.add_subplot(grid[:, 0])
    shown = overlay(image, segment_map, record, max_side=1024, badges=False)
    ax_img.imshow(shown)
    ax_img.set_axis_off()
    seg = np.asarray(segment_map)
    scale = shown.width / image.width
    points = label_points(seg, [sid for sid, st in styles.items() if st.badge])
    seg_by_id = {s.id: s for s in record.segments}
    for sid, (x, y) in points.items():
        st = styles[sid]
        s = seg_by_id[sid]
        text = f"{st.badge} {s.word} · {s.coco_label} {s.match_score:.3f}" if s.matched else f"? {s.coco_label} (unmatched)"
        ax_img.text(x * scale, y * scale, text, fontsize=9, color="white", ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.25", "facecolor": hex_colour(st.colour), "edgecolor": "white", "alpha": 0.9})
    ax_img.set_title(title, fontsize=11, loc="left")
    if warning:
        fig.text(0.01, 0.995, warning, fontsize=12, fontweight="bold", color=WARNING_COLOUR, va="top", ha="left")

    ax_cap = fig.add_subplot(grid[0, 1])
    ax_cap.set_axis_off()
    _draw_caption(fig, ax_cap, record, styles, quality)

    ax_tab = fig.add_subplot(grid[1, 1])
    ax_tab.set_axis_off()
    _draw_match_table(ax_tab, record, quality)

    ax_mat = fig.add_subplot(grid[2, 1])
    _draw_score_matrix(fig, ax_mat, record, styles)
    return fig


def _draw_caption(fig, ax, record: Record, styles, quality: MatchQuality) -> None:
    ax.text(0, 1, "caption (matched spans coloured, unmatched phrases boxed in grey)", fontsize=9, color="#555",
            va="top", transform=ax.transAxes)
    # wrap the caption into lines of runs
    width = 62
    lines: list[list[tuple[str, str | None, str | None]]] = [[]]
    used = 0
    for text, kind, badge in caption_runs(record):
        pieces = [text] if kind else re.findall(r"\S+\s*|\s+", text)
        for piece in pieces:
            if used + len(piece) > width and lines[-1]:
                lines.append([])
                used = 0
            lines[-1].append((piece, kind, badge))
            used += len(piece)
    renderer = fig.canvas.get_renderer()
    y = 0.80
    for line in lines[:4]:
        x = 0.0
        for piece, kind, badge in line:
            props = {"fontsize": 14, "family": "DejaVu Sans", "va": "top", "transform": ax.transAxes}
            if kind == "matched":
                colour = next(st.colour for st in styles.values() if st.badge == badge)
                t = ax.text(x, y, f"{piece}", color="white", bbox={"boxstyle": "square,pad=0.15",
                            "facecolor": hex_colour(colour), "edgecolor": "none"}, **props)
            elif kind == "unmatched":
                t = ax.text(x, y, piece, color="#333", bbox={"boxstyle": "square,pad=0.15", "facecolor": "none",
                            "edgecolor": "#999", "linestyle": "--"}, **props)
            else:
                t = ax.text(x, y, piece.replace(" ", "\u00a0"), color="black", **props)
            bb = t.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
            x = bb.x1 + (0.008 if kind else 0.0)
        y -= 0.2
    raw = f"raw caption: {record.caption_raw}" if record.caption_raw != record.caption else ""
    flags = ", ".join(quality.flags) or "none"
    fc = record.face_checks
    faces = ("faces not checked" if fc is None else
             f"face flags: {', '.join(fc.flags) or 'none'} (faces: yellow boxes; the source's face rect: cyan)")
    ax.text(0, 0.02, f"{raw}\nflags: {flags}\n{faces}", fontsize=9, color="#333", va="bottom", transform=ax.transAxes)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _draw_match_table(ax, record: Record, quality: MatchQuality) -> None:
    rows = match_table_rows(record, quality)
    header = ["#", "phrase", "seg", "label", "CLIP", "SBERT", "score", "margin", "best candidate (unmatched)"]
    cells, colours = [], []
    for r in rows[:14]:
        cells.append([r["badge"], r["phrase"], r["segment"], r["label"], _fmt(r["clip"]), _fmt(r["sbert"]),
                      _fmt(r["score"]), _fmt(r["margin"]), r["best_other"]])
        c = r["colour"]
        light = "#f2f2f2" if c is None else hex_colour(tuple(int(255 - (255 - v) * 0.35) for v in c))
        colours.append([light] * len(header))
    if not cells:
        ax.text(0, 0.5, "no phrases", fontsize=11, transform=ax.transAxes)
        return
    table = ax.table(cellText=cells, colLabels=header, cellColours=colours, loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(len(header))))
    more = f" (first 14 of {len(rows)} phrases)" if len(rows) > 14 else ""
    ax.set_title(f"matches: weakest {_fmt(quality.min_match_score) or '—'}, smallest margin "
                 f"{_fmt(quality.min_margin) or '—'}{more}", fontsize=10, loc="left")


def _draw_score_matrix(fig, ax, record: Record, styles) -> None:
    from matplotlib.patches import Rectangle

    product = np.asarray(record.scores.product, dtype=float)
    ids = list(record.scores.segment_ids)
    if product.size == 0:
        ax.set_axis_off()
        ax.text(0, 0.5, "no score matrix (no phrases or no segments)", fontsize=11, transform=ax.transAxes)
        return
    max_cols = 30
    if len(ids) > max_cols:  # keep the matched columns and the strongest others
        keep = sorted(range(len(ids)), key=lambda j: -product[:, j].max())[:max_cols]
        matched_cols = [j for j, sid in enumerate(ids) if styles[sid].badge and styles[sid].badge != "?"]
        keep = sorted(set(keep[: max_cols - len(matched_cols)]) | set(matched_cols))
        product, ids = product[:, keep], [ids[j] for j in keep]
    im = ax.imshow(product, cmap="viridis", aspect="auto")
    seg_by_id = {s.id: s for s in record.segments}
    ax.set_xticks(range(len(ids)), [f"{sid} {seg_by_id[sid].coco_label[:12]}" for sid in ids], rotation=60,
                  ha="right", fontsize=8)
    ax.set_yticks(range(len(record.phrases)), [p.text[:28] for p in record.phrases], fontsize=8)
    col = {sid: j for j, sid in enumerate(ids)}
    for i, ph in enumerate(record.phrases):
        if ph.segment_id is not None and ph.segment_id in col:
            j = col[ph.segment_id]
            ax.add_patch(Rectangle(
                (j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=hex_colour(styles[ph.segment_id].colour), linewidth=2.5))
        if product.shape[1] <= 12 and product.shape[0] <= 12:
            for j in range(product.shape[1]):
                ax.text(j, i, f"{product[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_title("CLIP × SBERT score matrix (phrases × segments; matches boxed)", fontsize=10, loc="left")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
