"""Exports for the methods FastComposer sits among: the same annotations, in the layouts they train on.

``seg-conditioning`` — triples for a segmentation-map conditioning module (MCM-style)::

    OUT/images/<key>.jpg       the shard's JPEG, byte for byte
    OUT/semantic/<key>.png     RGB semantic map, same size: each segment's pixels in the colour of its
                               COCO panoptic class (the panopticapi palette), (0, 0, 0) = no segment
    OUT/captions/<key>.txt     the (expanded) caption, UTF-8, one line
    OUT/metadata.jsonl         one line per sample: key, split, image, semantic, caption (paths relative to OUT)
    OUT/legend.json            class name -> colour and panoptic category id, for every class the
                               palette knows; classes outside it get a stable colour listed under "extra"
    OUT/export_summary.json    counts, filters and what each filter dropped

``subject-crops`` — per subject (a matched segment of the object types: the profile's
``subjects.object_types``, as for the trainer and the FastComposer export), grouped by source image, what
encoder-based (E4T-style) and attention-mask (ViCo-style) personalisation take::

    OUT/<key>/subject-<segment id>.png   the subject cropped to its bbox, RGBA: alpha = the subject's mask
    OUT/<key>/subjects.json              key, split, caption, and per subject: file, phrase, coco_label,
                                         segment id, bbox, and the caption with the phrase replaced by the
                                         placeholder (default ``S*``)
    OUT/metadata.jsonl                   one line per subject (key, file, phrase, coco_label, prompt)
    OUT/export_summary.json

Both read every ``subjects-*.tar`` of SHARDS_DIR through the shard reader, apply the same
:class:`~datagen.export.fastcomposer.ExportFilters` as the FastComposer export (each dropped sample
counted under the first filter it fails) and write every file atomically, the metadata and summary
last. An OUT that is not empty is refused unless ``overwrite``; nothing outside OUT is written.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from datagen.config import COCO_CATEGORIES_FILE, DEFAULT_OBJECT_TYPES
from datagen.export.fastcomposer import ExportError, ExportFilters, check_object_types
from datagen.files import atomic_write
from datagen.record.schema import Record, RecordError
from datagen.shards.reader import ShardError, decode_segment_map, iter_members

PALETTE_FILE = COCO_CATEGORIES_FILE
SUMMARY = "export_summary.json"
METADATA = "metadata.jsonl"
LEGEND = "legend.json"
DEFAULT_PLACEHOLDER = "S*"


def coco_palette() -> dict[str, dict]:
    """COCO panoptic class name -> ``{"id", "isthing", "color"}``."""
    data = json.loads(PALETTE_FILE.read_text())
    return {c["name"]: {"id": c["id"], "isthing": c["isthing"], "color": c["color"]} for c in data["categories"]}


def extra_colour(label: str) -> list[int]:
    """A stable colour for a class the palette does not know (never pure black, which means 'none')."""
    r, g, b = hashlib.sha256(label.encode()).digest()[:3]
    return [r, g, max(b, 1)]


def semantic_map(segment_map: np.ndarray, record: Record, palette: dict[str, dict]) -> tuple[np.ndarray, set[str]]:
    """RGB uint8 map: each segment's pixels in its class colour; also the labels outside the palette."""
    lut = np.zeros((int(segment_map.max(initial=0)) + 1, 3), dtype=np.uint8)
    extra = set()
    for s in record.segments:
        if s.coco_label in palette:
            lut[s.id] = palette[s.coco_label]["color"]
        else:
            lut[s.id] = extra_colour(s.coco_label)
            extra.add(s.coco_label)
    return lut[segment_map], extra


def placeholder_caption(caption: str, start: int, end: int, placeholder: str) -> str:
    """``caption`` with ``caption[start:end]`` (a subject's phrase) replaced by ``placeholder``."""
    return caption[:start] + placeholder + caption[end:]


def subject_crop(image: Image.Image, segment_map: np.ndarray, segment_id: int, bbox: list[int]) -> Image.Image:
    """The subject cut to its bbox as RGBA, alpha 255 on its mask and 0 elsewhere."""
    x0, y0, x1, y1 = bbox
    rgb = np.asarray(image.convert("RGB"))[y0:y1, x0:x1]
    alpha = np.where(segment_map[y0:y1, x0:x1] == segment_id, 255, 0).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


def export_view(
    fmt: str,
    shards_dir: str | Path,
    out: str | Path,
    filters: ExportFilters | None = None,
    overwrite: bool = False,
    object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES,
    placeholder: str = DEFAULT_PLACEHOLDER,
) -> dict:
    """Export to ``fmt`` (``seg-conditioning`` or ``subject-crops``); return (and write) the summary.
    ``object_types``: the COCO labels of subjects (the crops, and the filters that look at subjects)."""
    if fmt not in ("seg-conditioning", "subject-crops"):
        raise ExportError(f"unknown view format {fmt!r}")
    object_types = check_object_types(object_types)
    if not placeholder.strip():
        raise ExportError("the placeholder must not be empty")
    filters = filters or ExportFilters()
    shards_dir, out = Path(shards_dir), Path(out)
    tars = sorted(shards_dir.glob("subjects-*.tar"))
    if not tars:
        raise ExportError(f"no shards (subjects-*.tar) in {shards_dir}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out} is not empty; pass --overwrite to export over it")
    out.mkdir(parents=True, exist_ok=True)

    palette = coco_palette()
    lines: list[str] = []
    rejected: Counter[str] = Counter()
    extra_labels: set[str] = set()
    seen = exported = subjects = 0
    keys: set[str] = set()
    for tar in tars:
        try:
            for key, members in iter_members(tar):
                seen += 1
                record = _record(tar, key, members)
                if key in keys:
                    raise ExportError(f"sample id {key} appears twice (again in {tar.name})")
                keys.add(key)
                reason = filters.rejection(record, object_types)
                if reason is not None:
                    rejected[reason] += 1
                    continue
                segmap = decode_segment_map(members["seg.png"])
                if fmt == "seg-conditioning":
                    extra_labels |= _write_triple(out, key, members["jpg"], segmap, record, palette, lines)
                    exported += 1
                else:
                    n = _write_subjects(out, key, members["jpg"], segmap, record, object_types, placeholder, lines)
                    if n == 0:
                        rejected["no_subject_of_object_types"] += 1
                        continue
                    exported += 1
                    subjects += n
        except ShardError as e:
            raise ExportError(str(e)) from e

    if fmt == "seg-conditioning":
        legend = {
            "none": [0, 0, 0],
            "classes": {name: {"color": v["color"], "id": v["id"], "isthing": bool(v["isthing"])} for name, v in palette.items()},
            "extra": {label: extra_colour(label) for label in sorted(extra_labels)},
            "source": json.loads(PALETTE_FILE.read_text())["source"],
        }
        atomic_write(out / LEGEND, json.dumps(legend, indent=1) + "\n")
    summary = {
        "format": fmt, "shards_dir": str(shards_dir.resolve()), "out": str(out.resolve()), "shards": len(tars),
        "samples_seen": seen, "exported": exported, "subjects": subjects if fmt == "subject-crops" else None,
        "filtered_out": dict(sorted(rejected.items())), "filters": asdict(filters),
        "object_types": list(object_types),
        "placeholder": placeholder if fmt == "subject-crops" else None,
    }
    atomic_write(out / METADATA, "".join(lines))
    atomic_write(out / SUMMARY, json.dumps(summary, indent=1) + "\n")
    return summary


def _record(tar: Path, key: str, members: dict[str, bytes]) -> Record:
    if not key.isascii() or not key.isdigit():
        raise ExportError(f"{tar.name}: sample key {key!r} is not ASCII decimal digits")
    try:
        record = Record.from_json(members["json"])
    except RecordError as e:
        raise ExportError(f"{tar.name}: sample {key}: {e}") from e
    if record.key != key:
        raise ExportError(f"{tar.name}: member {key}.json holds record key {record.key!r}")
    return record


def _write_triple(out: Path, key: str, jpg: bytes, segmap: np.ndarray, record: Record, palette, lines) -> set[str]:
    semantic, extra = semantic_map(segmap, record, palette)
    buf = io.BytesIO()
    Image.fromarray(semantic, mode="RGB").save(buf, format="PNG")
    atomic_write(out / "images" / f"{key}.jpg", jpg)
    atomic_write(out / "semantic" / f"{key}.png", buf.getvalue())
    atomic_write(out / "captions" / f"{key}.txt", record.caption + "\n")
    lines.append(json.dumps({
        "key": key, "split": record.split, "image": f"images/{key}.jpg", "semantic": f"semantic/{key}.png",
        "caption": record.caption,
    }, ensure_ascii=False) + "\n")
    return extra


def _write_subjects(out, key, jpg, segmap, record: Record, object_types, placeholder, lines) -> int:
    chosen = [s for s in record.segments if s.matched and s.coco_label in object_types]
    if not chosen:
        return 0
    with Image.open(io.BytesIO(jpg)) as im:
        image = im.convert("RGB")
    entries = []
    for s in chosen:
        name = f"subject-{s.id}.png"
        buf = io.BytesIO()
        subject_crop(image, segmap, s.id, s.bbox).save(buf, format="PNG")
        atomic_write(out / key / name, buf.getvalue())
        prompt = placeholder_caption(record.caption, s.start, s.end, placeholder)
        entry = {"file": name, "phrase": s.word, "coco_label": s.coco_label, "segment_id": s.id, "bbox": s.bbox,
                 "prompt": prompt}
        entries.append(entry)
        lines.append(json.dumps({"key": key, "file": f"{key}/{name}", "phrase": s.word, "coco_label": s.coco_label,
                                 "prompt": prompt}, ensure_ascii=False) + "\n")
    doc = {"key": key, "split": record.split, "caption": record.caption, "placeholder": placeholder, "subjects": entries}
    atomic_write(out / key / "subjects.json", json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return len(entries)
