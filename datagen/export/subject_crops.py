"""``subject-crops``: per subject (a matched segment of the object types: the profile's
``subjects.object_types``, as for the trainer and the FastComposer export), grouped by source image,
what encoder-based (E4T-style) and attention-mask (ViCo-style) personalisation take::

    OUT/<key>/subject-<segment id>.png   the subject cropped to its bbox, RGBA: alpha = the subject's mask
    OUT/<key>/subjects.json              key, split, caption, and per subject: file, phrase, coco_label,
                                         segment id, bbox, and the caption with the phrase replaced by the
                                         placeholder (default ``S*``)
    OUT/metadata.jsonl                   one line per subject (key, file, phrase, coco_label, prompt)
    OUT/export_summary.json

A sample without a subject is dropped and counted as ``no_subject_of_object_types``. Shards,
filters, checks and the summary: :mod:`datagen.export.common`. Every file is written atomically,
the metadata and summary last; nothing outside OUT is written: an ``OUT/<key>`` that is a symbolic
link or not a folder is refused before anything is written
(:func:`~datagen.export.common.check_sample_folders`, :func:`~datagen.export.common.sample_folder`).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datagen.config import DEFAULT_OBJECT_TYPES
from datagen.export.common import (
    ExportError,
    ExportFilters,
    SampleOutcome,
    ShardExport,
    Tally,
    check_sample_folders,
    sample_folder,
)
from datagen.files import atomic_write
from datagen.record.quality import subject_segments
from datagen.record.schema import Record
from datagen.shards.reader import TarSample

METADATA = "metadata.jsonl"
DEFAULT_PLACEHOLDER = "S*"


def placeholder_caption(caption: str, start: int, end: int, placeholder: str) -> str:
    """``caption`` with ``caption[start:end]`` (a subject's phrase) replaced by ``placeholder``."""
    return caption[:start] + placeholder + caption[end:]


def subject_crop(image: Image.Image, segment_map: np.ndarray, segment_id: int, bbox: list[int]) -> Image.Image:
    """The subject cut to its bbox as RGBA, alpha 255 on its mask and 0 elsewhere."""
    x0, y0, x1, y1 = bbox
    rgb = np.asarray(image.convert("RGB"))[y0:y1, x0:x1]
    alpha = np.where(segment_map[y0:y1, x0:x1] == segment_id, 255, 0).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


class SubjectCropsExport(ShardExport):
    """The subjects of each sample, cut out with their masks (the module docstring)."""

    name = "subject-crops"
    options = ("placeholder",)

    def __init__(self, out: str | Path, filters: ExportFilters | None = None,
                 object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES, placeholder: str = DEFAULT_PLACEHOLDER):
        super().__init__(out, filters, object_types)
        if not placeholder.strip():
            raise ExportError("the placeholder must not be empty")
        self.placeholder = placeholder

    def prepare(self, keys: list[str], overwrite: bool) -> None:
        super().prepare(keys, overwrite)
        check_sample_folders(self.out, set(keys))  # OUT/<key>: never a link out of OUT

    def write_sample(self, sample: TarSample, record: Record) -> SampleOutcome:
        key = sample.key
        chosen = subject_segments(record, self.object_types)[0]
        if not chosen:
            return SampleOutcome(key, record.split, rejection="no_subject_of_object_types")
        image, segmap = sample.image(), sample.checked_segment_map(record)
        folder = sample_folder(self.out, key)
        entries, lines = [], []
        for s in chosen:
            name = f"subject-{s.id}.png"
            buf = io.BytesIO()
            subject_crop(image, segmap, s.id, s.bbox).save(buf, format="PNG")
            atomic_write(folder / name, buf.getvalue())
            prompt = placeholder_caption(record.caption, s.start, s.end, self.placeholder)
            entry = {"file": name, "phrase": s.word, "coco_label": s.coco_label, "segment_id": s.id,
                     "bbox": s.bbox, "prompt": prompt}
            identity = self.filters.segment_identity(key, s.id)
            entries.append({**entry, "identity": identity} if identity is not None else entry)
            lines.append(json.dumps({"key": key, "file": f"{key}/{name}", "phrase": s.word,
                                     "coco_label": s.coco_label, "prompt": prompt}, ensure_ascii=False) + "\n")
        doc = {"key": key, "split": record.split, "caption": record.caption, "placeholder": self.placeholder,
               "subjects": entries}
        atomic_write(folder / "subjects.json", json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        return SampleOutcome(key, record.split, counts=Counter(subjects=len(entries)), lines=lines)

    def finish(self, tally: Tally) -> tuple[dict[str, Any], dict[str, Any]]:
        atomic_write(self.out / METADATA, "".join(tally.lines))
        return {"subjects": tally.counts["subjects"]}, {"placeholder": self.placeholder}
