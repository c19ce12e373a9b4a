"""``identity-pairs``: each subject with references of the same person from *other* photos, the
cross-image pairs that subject-driven generators train on (MultiID-2M's ``train_cp``, UNO-style)::

    OUT/<key>/target.jpg                      the target image, the shard's JPEG as it is
    OUT/<key>/mask-<segment id>.png           the subject's mask in the target (L: 255 inside, 0 outside)
    OUT/<key>/ref-<segment id>-<n>.jpg        reference n: the person's crop in another photo
    OUT/<key>/ref-<segment id>-<n>-mask.png   its mask (L, the crop's size)
    OUT/<key>/pairs.json                      key, split, caption, and per subject: segment id, phrase,
                                              its span [start, end) in the caption, coco_label, identity,
                                              mask file, and each reference's files, key and segment id
    OUT/metadata.jsonl                        one line per subject: key, identity, caption, span, files
    OUT/export_summary.json

The references are the run's reference set (``subject-ffhq identities RUN`` writes it to
``manifests/<run>/references/``; ``--references`` names the run or that folder): the crops of an
identity, nearest first (``references/crops.parquet``'s rank order), from any photo but the target's
own, at most ``--max-references`` per subject. Each process reads the set once (:func:`cached_references`,
keyed by the path); the export object carries only the path. A subject (a matched segment of the object types) without such a reference is not exported;
a sample with none is dropped and counted as ``no_cross_image_reference``. Shards, filters, checks and
the summary: :mod:`datagen.export.common`. Every file is written atomically, the metadata and summary
last; nothing outside OUT is written.
"""

from __future__ import annotations

import functools
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
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
from datagen.identity.references import check_reference_set, read_reference_set
from datagen.record.schema import Record
from datagen.shards.reader import TarSample

METADATA = "metadata.jsonl"
DEFAULT_MAX_REFERENCES = 4


@dataclass(frozen=True)
class ReferenceLookup:
    """A reference set held once per process: its crops as the Arrow table (blobs stay in Arrow's
    buffers), per identity its crop rows in the table's order (nearest first) with their keys, and the
    targets' identities."""

    crops: pa.Table
    rows_of: dict[int, list[tuple[int, str]]]
    identity_of: dict[tuple[str, int], int]

    def crop(self, row: int) -> dict[str, Any]:
        return {c: self.crops.column(c)[row].as_py() for c in ("key", "segment_id", "jpg", "mask")}


@functools.cache
def cached_references(path: str) -> ReferenceLookup:
    """The reference set ``path`` names, read once per process (:class:`ReferenceLookup`)."""
    crops, targets = read_reference_set(path)
    rows_of: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for row, (identity, key) in enumerate(zip(crops.column("identity").to_pylist(), crops.column("key").to_pylist(),
                                              strict=True)):
        rows_of[int(identity)].append((row, key))
    identity_of = {(k, int(s)): int(i) for k, s, i in zip(
        targets.column("key").to_pylist(), targets.column("segment_id").to_pylist(),
        targets.column("identity").to_pylist(), strict=True)}
    return ReferenceLookup(crops, dict(rows_of), identity_of)


def mask_png(mask: np.ndarray) -> bytes:
    """A boolean mask as an 8-bit PNG (255 inside)."""
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


class IdentityPairsExport(ShardExport):
    """Targets and their cross-image references (the module docstring)."""

    name = "identity-pairs"
    options = ("references", "max_references")

    def __init__(self, out: str | Path, filters: ExportFilters | None = None,
                 object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES, references: str | Path | None = None,
                 max_references: int = DEFAULT_MAX_REFERENCES):
        super().__init__(out, filters, object_types)
        self.check_options(references=references, max_references=max_references)
        # only the path travels with the export (pickled per shard task): each process loads the set once
        self.references, self.max_references = str(references), max_references

    @classmethod
    def check_options(cls, references: str | Path | None = None, max_references: int = DEFAULT_MAX_REFERENCES,
                      **_: Any) -> None:
        """:class:`ExportError` saying what is wrong; the reference set's tables are checked to exist, not read."""
        if references is None:
            raise ExportError("identity-pairs needs --references RUN: a run folder whose references/ "
                              "`subject-ffhq identities RUN` wrote (or that folder itself)")
        if max_references < 1:
            raise ExportError(f"--max-references must be >= 1, got {max_references}")
        try:
            check_reference_set(references)
        except FileNotFoundError as e:
            raise ExportError(str(e)) from None

    def prepare(self, keys: list[str], overwrite: bool) -> None:
        super().prepare(keys, overwrite)
        check_sample_folders(self.out, set(keys))  # OUT/<key>: never a link out of OUT

    def write_sample(self, sample: TarSample, record: Record) -> SampleOutcome:
        key, refs_of = sample.key, cached_references(self.references)
        chosen = []
        for s in record.segments:
            identity = refs_of.identity_of.get((key, s.id))
            if not s.matched or s.coco_label not in self.object_types or identity is None:
                continue
            refs = [row for row, ref_key in refs_of.rows_of.get(identity, ()) if ref_key != key][: self.max_references]
            if refs:
                chosen.append((s, identity, refs))
        if not chosen:
            return SampleOutcome(key, record.split, rejection="no_cross_image_reference")
        folder = sample_folder(self.out, key)
        atomic_write(folder / "target.jpg", sample.members["jpg"])
        segmap = sample.checked_segment_map(record)
        subjects, lines = [], []
        for s, identity, refs in chosen:
            atomic_write(folder / f"mask-{s.id}.png", mask_png(segmap == s.id))
            files = []
            for n, row in enumerate(refs):
                ref = refs_of.crop(row)
                jpg, mask = f"ref-{s.id}-{n}.jpg", f"ref-{s.id}-{n}-mask.png"
                atomic_write(folder / jpg, ref["jpg"])
                atomic_write(folder / mask, ref["mask"])
                files.append({"image": jpg, "mask": mask, "key": ref["key"], "segment_id": int(ref["segment_id"])})
            subject = {"segment_id": s.id, "phrase": s.word, "start": s.start, "end": s.end,
                       "coco_label": s.coco_label, "identity": identity, "mask": f"mask-{s.id}.png",
                       "references": files}
            subjects.append(subject)
            lines.append(json.dumps({"key": key, "identity": identity, "caption": record.caption,
                                     "span": [s.start, s.end], "target": f"{key}/target.jpg",
                                     "mask": f"{key}/{subject['mask']}",
                                     "references": [f"{key}/{f['image']}" for f in files]}, ensure_ascii=False) + "\n")
        doc = {"key": key, "split": record.split, "caption": record.caption, "subjects": subjects}
        atomic_write(folder / "pairs.json", json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        counts = Counter(subjects=len(subjects), references=sum(len(x["references"]) for x in subjects))
        return SampleOutcome(key, record.split, counts=counts, lines=lines)

    def finish(self, tally: Tally) -> tuple[dict[str, Any], dict[str, Any]]:
        atomic_write(self.out / METADATA, "".join(tally.lines))
        return ({"subjects": tally.counts["subjects"], "references": tally.counts["references"]},
                {"references_from": self.references, "max_references": self.max_references})

    @classmethod
    def headline(cls, summary) -> list[str]:
        return [f"exported {summary.exported} of {summary.samples_seen} samples, {summary.subjects} subject(s) with "
                f"{summary.references} cross-image reference(s) from {summary.shards} shard(s) as identity-pairs "
                f"to {summary.out}"]
