"""Export shards to FastComposer's on-disk layout (DESIGN §4), optionally keeping only good samples.

Layout written under ``OUT`` (what FastComposer's released ``FastComposerDataset`` reads)::

    image_ids.txt  image_ids_train.txt  image_ids_test.txt   one id per line (the record key, int()-parses)
    <id[:5]>/<id>.jpg    the shard's JPEG, byte for byte
    <id[:5]>/<id>.json   the record, FastComposer-ready (below)
    <id[:5]>/<id>.npy    the segment-id map, a 2-D integer array (pixel = segments[i].id, 0 = none)
    export_summary.json  what was exported and what was filtered out, by reason

**Segments in the exported JSON: the subjects.** FastComposer's loader keeps the segments whose
``coco_label`` is in its ``object_types`` (``None``, its default, keeps every one) and then reads
``segment["end"]`` of *every* one of them, so an unmatched segment would raise ``KeyError`` there
and a matched ``banner`` would become a subject when the flag is left out. The exported
``segments`` therefore hold exactly the subjects: the matched segments (each with
``word``/``start``/``end``) whose ``coco_label`` is one of the export's ``object_types`` (the
profile's ``subjects.object_types``, default ``person``; the trainer uses the same list). Matched
segments of other labels move, unchanged, to ``other_segments``, unmatched ones to
``unmatched_segments`` (all their pixels stay in the ``.npy``). Everything else of the record is
kept. Upstream's loader then reads the same subjects with its ``object_types`` set to the same
labels or left at ``None``; ``export_summary.json`` names them (``object_types``) and counts the
exported subjects per type (``subjects_by_type``).

**Ids and safety.** Before anything is written, every member name of every shard is checked
(:func:`~datagen.export.common.check_shard_ids`, for every format):
it must be ``<id>.<ext>`` with ``id`` made of ASCII decimal digits (``0``-``9`` only: ``²`` or
Arabic-Indic digits pass ``str.isdigit()`` but are refused), and ids must be unique *as integers*
(``1`` and ``00000001`` are the same sample to FastComposer's ``int(id)`` and are refused). Nothing
outside ``OUT`` is ever read as a path, written or removed: with ``overwrite``, the old
``image_ids.txt`` is only trusted line by line (a line that is not such an id, e.g. ``../../x``
or an absolute path, is skipped and reported, never used as a path); a ``<id[:5]>`` folder that
is a symbolic link (or not a folder) is refused before anything is written, and a stale file is
removed only from a real ``<id[:5]>`` folder inside ``OUT``.

**Split.** Each id goes to ``image_ids_train.txt`` or ``image_ids_test.txt`` by its record's
``split`` (duplicates share a split upstream), or, with ``--split-file`` (``ExportFilters.split_file``),
by the run's identity-safe ``split.parquet`` where it lists the id; ``image_ids.txt`` lists both. An id seen twice is an
error.

**Filters**: :class:`~datagen.export.common.ExportFilters`, as for every format.

Files are written through temp files and renames; the id lists, then the summary, come last, so an
interrupted export has no ``image_ids.txt`` and is not mistaken for a finished one.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from datagen.config import DEFAULT_OBJECT_TYPES
from datagen.export.common import (
    ID_RE,
    ExportError,
    ExportFilters,
    ExportSummary,
    SampleOutcome,
    ShardExport,
    Tally,
    check_sample_folders,
    run_export,
    sample_folder,
)
from datagen.files import atomic_write
from datagen.record.quality import subject_segments
from datagen.record.schema import Record, Segment
from datagen.shards.reader import TarSample

ID_LISTS = ("image_ids.txt", "image_ids_train.txt", "image_ids_test.txt")
SEGMAP_DTYPES = ("auto", "uint8", "int32", "int64")  # each one upstream's loader reads
# Refused, with the reason: upstream's TrainTransformWithSegmap does torch.cat([uint8 image, map]).
UNREADABLE_SEGMAP_DTYPES = {
    "uint16": "FastComposer's loader cannot read uint16 maps: it concatenates the uint8 image with the map "
              "(torch.cat), and torch does not promote uint8 with uint16; use auto (uint8, or int32 when an id "
              "exceeds 255), uint8, int32 or int64",
}
EXPORTED_EXTS = ("jpg", "json", "npy")


def fastcomposer_json(record: Record, object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES,
                      identity_of: Callable[[str, int], int | None] | None = None,
                      subjects: list[Segment] | None = None) -> dict:
    """The record as FastComposer's loader wants it: ``segments`` = the subjects (matched segments
    of ``object_types``, each with its ``identity`` where ``identity_of(key, segment id)`` knows it),
    then ``other_segments`` (matched, other labels), ``unmatched_segments``. ``subjects``: the
    record's ``subject_segments(record, object_types)[0]`` when the caller has them already."""
    if subjects is None:
        subjects = subject_segments(record, object_types)[0]
    subject_ids = {s.id for s in subjects}
    d = record.to_dict()
    d["segments"] = [with_identity(s.to_dict(), record.key, identity_of) for s in record.segments if s.id in subject_ids]
    d["other_segments"] = [s.to_dict() for s in record.segments if s.matched and s.id not in subject_ids]
    d["unmatched_segments"] = [s.to_dict() for s in record.segments if not s.matched]
    return d


def with_identity(segment: dict, key: str, identity_of: Callable[[str, int], int | None] | None) -> dict:
    """A segment's dict, with ``identity`` when the run's index knows its person (``--identities``)."""
    identity = identity_of(key, segment["id"]) if identity_of is not None else None
    return {**segment, "identity": identity} if identity is not None else segment


def segmap_array(segment_map: np.ndarray, dtype: str, record: Record) -> np.ndarray:
    top = int(segment_map.max()) if segment_map.size else 0
    if dtype == "auto":
        dtype = "uint8" if top <= 255 else "int32"
    limit = np.iinfo(np.dtype(dtype)).max
    if top > limit:
        raise ExportError(f"sample {record.key}: segment id {top} does not fit the segment-map dtype {dtype}")
    return np.ascontiguousarray(segment_map.astype(dtype))


class FastComposerExport(ShardExport):
    """FastComposer's own layout (the module docstring)."""

    name = "fastcomposer"
    options = ("segmap_dtype",)

    def __init__(self, out: str | Path, filters: ExportFilters | None = None,
                 object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES, segmap_dtype: str = "auto"):
        super().__init__(out, filters, object_types)
        if segmap_dtype in UNREADABLE_SEGMAP_DTYPES:
            raise ExportError(f"segment-map dtype {segmap_dtype}: {UNREADABLE_SEGMAP_DTYPES[segmap_dtype]}")
        if segmap_dtype not in SEGMAP_DTYPES:
            raise ExportError(f"segment-map dtype must be one of {SEGMAP_DTYPES}, got {segmap_dtype!r}")
        self.segmap_dtype = segmap_dtype
        self.old_ids: set[str] = set()
        self.ignored_old_ids: list[str] = []

    def prepare(self, keys: list[str], overwrite: bool) -> None:
        super().prepare(keys, overwrite)
        self.old_ids, self.ignored_old_ids = _previous_ids(self.out)
        check_sample_folders(self.out, {k[:5] for k in keys})

    def write_sample(self, sample: TarSample, record: Record) -> SampleOutcome:
        out, key = self.out, sample.key
        segmap = sample.checked_segment_map(record)
        folder = sample_folder(out, key[:5])
        buf = io.BytesIO()
        np.save(buf, segmap_array(segmap, self.segmap_dtype, record), allow_pickle=False)
        atomic_write(folder / f"{key}.jpg", sample.members["jpg"])
        atomic_write(folder / f"{key}.npy", buf.getvalue())
        subjects = subject_segments(record, self.object_types)[0]
        atomic_write(folder / f"{key}.json",
                     json.dumps(fastcomposer_json(record, self.object_types, self.filters.segment_identity, subjects),
                                ensure_ascii=False).encode())
        matched = sum(1 for s in record.segments if s.matched)
        counts = Counter(f"subject:{s.coco_label}" for s in subjects)
        counts.update(other_segments=matched - len(subjects), unmatched_segments=len(record.segments) - matched)
        return SampleOutcome(key, record.split, counts=counts)

    def finish(self, tally: Tally) -> tuple[dict[str, Any], dict[str, Any]]:
        ids = sorted(tally.kept, key=int)
        train = [i for i in ids if tally.kept[i] == "train"]
        test = [i for i in ids if tally.kept[i] == "test"]
        removed = 0
        not_removed: list[str] = []
        # ids an earlier export wrote that this one does not, and samples a filter rejected this time
        stale_ids = (self.old_ids - set(ids)) | {key for key in tally.shard_of if key not in tally.kept}
        for stale in sorted(stale_ids, key=lambda k: (int(k), k)):
            n, refused = _remove_exported(self.out, stale)
            removed += n
            not_removed += refused
        for name, lst in zip(ID_LISTS, (ids, train, test), strict=True):
            atomic_write(self.out / name, "".join(f"{i}\n" for i in lst).encode())
        by_type = {t: tally.counts[f"subject:{t}"] for t in self.object_types}
        details = {
            "segments_exported": sum(by_type.values()), "subjects_by_type": by_type,
            "other_segments": tally.counts["other_segments"], "unmatched_segments": tally.counts["unmatched_segments"],
            "segmap_dtype": self.segmap_dtype, "removed_stale": removed,
            "shard_names": tally.shards, "ignored_old_ids": self.ignored_old_ids,
            "not_removed": not_removed,
        }
        return {"train": len(train), "test": len(test)}, details

    @classmethod
    def headline(cls, summary: ExportSummary) -> list[str]:
        return [
            f"exported {summary.exported} of {summary.samples_seen} samples from {summary.shards} shard(s) "
            f"(train {summary.train}, test {summary.test}) to {summary.out}",
            f"subjects ({','.join(summary.object_types)}): {summary.segments_exported} "
            f"{json.dumps(summary.subjects_by_type)}",
        ]

    @classmethod
    def notes(cls, summary: ExportSummary) -> list[str]:
        lines = []
        if any(v not in (None, False, 0, ("train", "test")) for v in summary.filters.values()):
            lines.append(f"filters: {json.dumps(summary.filters)}")
        if summary.ignored_old_ids:
            shown = ", ".join(repr(x) for x in summary.ignored_old_ids[:5])
            more = len(summary.ignored_old_ids) - 5
            lines.append(f"ignored {len(summary.ignored_old_ids)} line(s) of the old image_ids.txt that are not ids "
                         f"(never used as paths): {shown}" + (f" and {more} more" if more > 0 else ""))
        if summary.not_removed:
            lines.append(f"left {len(summary.not_removed)} stale file group(s) in place (their folder is not a real "
                         f"folder inside OUT): {', '.join(summary.not_removed[:5])}")
        return lines


def export_fastcomposer(
    shards_dir: str | Path,
    out: str | Path,
    filters: ExportFilters | None = None,
    overwrite: bool = False,
    segmap_dtype: str = "auto",
    workers: int = 1,
    object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES,
) -> ExportSummary:
    """Export every ``subjects-*.tar`` of ``shards_dir`` to ``out``; return (and write) the summary.
    ``object_types``: the COCO labels of the subjects (the profile's ``subjects.object_types``)."""
    return run_export(FastComposerExport(out, filters, object_types, segmap_dtype), shards_dir, overwrite, workers)


def _previous_ids(out: Path) -> tuple[set[str], list[str]]:
    """The ids an earlier export listed in ``OUT/image_ids.txt``, and the lines that are not ids
    (skipped: a line is only ever used as a path when it is ASCII decimal digits)."""
    listed = out / ID_LISTS[0]
    if listed.is_symlink() or not listed.is_file():
        return set(), ([f"{ID_LISTS[0]} is a symbolic link; not read"] if listed.is_symlink() else [])
    ids, ignored = set(), []
    for line in listed.read_text(encoding="utf-8", errors="backslashreplace").splitlines():
        token = line.strip()
        if not token:
            continue
        if ID_RE.fullmatch(token):
            ids.add(token)
        else:
            ignored.append(token)
    return ids, ignored


def _remove_exported(out: Path, key: str) -> tuple[int, list[str]]:
    """Remove ``OUT/<key[:5]>/<key>.jpg|json|npy``, only from a real folder directly inside OUT."""
    if not ID_RE.fullmatch(key):  # never happens: every key was checked; kept as the last guard
        return 0, [key]
    folder = out / key[:5]
    if not folder.exists():
        return 0, []
    if folder.is_symlink() or not folder.is_dir() or folder.resolve().parent != out.resolve():
        return 0, [f"{folder.name}/{key}.*"]
    removed = 0
    for ext in EXPORTED_EXTS:
        p = folder / f"{key}.{ext}"
        if p.is_symlink() or p.is_file():  # a link is removed itself, never what it points to
            p.unlink()
            removed += 1
    return removed, []
