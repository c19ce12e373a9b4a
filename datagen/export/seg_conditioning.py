"""``seg-conditioning``: triples for a segmentation-map conditioning module (MCM-style)::

    OUT/images/<key>.jpg       the shard's JPEG, byte for byte
    OUT/semantic/<key>.png     RGB semantic map, same size: each segment's pixels in the colour of its
                               COCO panoptic class (the panopticapi palette), (0, 0, 0) = no segment
    OUT/captions/<key>.txt     the (expanded) caption, UTF-8, one line
    OUT/metadata.jsonl         one line per sample: key, split, image, semantic, caption (paths relative to OUT)
    OUT/legend.json            class name -> colour and panoptic category id, for every class the
                               palette knows; classes outside it get a stable colour listed under "extra"
    OUT/export_summary.json    counts, filters and what each filter dropped

Shards, filters, checks and the summary: :mod:`datagen.export.common`. Every file is written
atomically, the legend, metadata and summary last; nothing outside OUT is written.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datagen.config import COCO_CATEGORIES_FILE, DEFAULT_OBJECT_TYPES
from datagen.export.common import ExportFilters, SampleOutcome, ShardExport, Tally
from datagen.files import atomic_write
from datagen.record.schema import Record
from datagen.shards.reader import TarSample

PALETTE_FILE = COCO_CATEGORIES_FILE
METADATA = "metadata.jsonl"
LEGEND = "legend.json"
_EXTRA = "extra:"  # counts key prefix: a label outside the palette, seen in an exported sample


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


class SegConditioningExport(ShardExport):
    """Image, semantic map and caption per sample (the module docstring)."""

    name = "seg-conditioning"

    def __init__(self, out: str | Path, filters: ExportFilters | None = None,
                 object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES):
        super().__init__(out, filters, object_types)
        self.palette = coco_palette()

    def write_sample(self, sample: TarSample, record: Record) -> SampleOutcome:
        out, key = self.out, sample.key
        segmap = sample.checked_segment_map(record)
        semantic, extra = semantic_map(segmap, record, self.palette)
        buf = io.BytesIO()
        Image.fromarray(semantic, mode="RGB").save(buf, format="PNG")
        atomic_write(out / "images" / f"{key}.jpg", sample.members["jpg"])
        atomic_write(out / "semantic" / f"{key}.png", buf.getvalue())
        atomic_write(out / "captions" / f"{key}.txt", record.caption + "\n")
        line = json.dumps({
            "key": key, "split": record.split, "image": f"images/{key}.jpg", "semantic": f"semantic/{key}.png",
            "caption": record.caption,
        }, ensure_ascii=False) + "\n"
        return SampleOutcome(key, record.split, counts=Counter(_EXTRA + label for label in extra), lines=[line])

    def finish(self, tally: Tally) -> tuple[dict[str, Any], dict[str, Any]]:
        extra_labels = sorted(k.removeprefix(_EXTRA) for k in tally.counts if k.startswith(_EXTRA))
        legend = {
            "none": [0, 0, 0],
            "classes": {name: {"color": v["color"], "id": v["id"], "isthing": bool(v["isthing"])}
                        for name, v in self.palette.items()},
            "extra": {label: extra_colour(label) for label in extra_labels},
            "source": json.loads(PALETTE_FILE.read_text())["source"],
        }
        atomic_write(self.out / LEGEND, json.dumps(legend, indent=1) + "\n")
        atomic_write(self.out / METADATA, "".join(tally.lines))
        return {"subjects": None}, {}
