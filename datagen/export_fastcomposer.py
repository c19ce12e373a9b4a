"""Export shards to FastComposer's on-disk layout (DESIGN §4), optionally keeping only good samples.

Layout written under ``OUT`` (what FastComposer's released ``FastComposerDataset`` reads)::

    image_ids.txt  image_ids_train.txt  image_ids_test.txt   one id per line (the record key, int()-parses)
    <id[:5]>/<id>.jpg    the shard's JPEG, byte for byte
    <id[:5]>/<id>.json   the record, FastComposer-ready (below)
    <id[:5]>/<id>.npy    the segment-id map, a 2-D integer array (pixel = segments[i].id, 0 = none)
    export_summary.json  what was exported and what was filtered out, by reason

**Segments in the exported JSON.** FastComposer's loader keeps the segments whose ``coco_label`` is
in its object types and then reads ``segment["end"]`` of *every* one of them, so an unmatched
person segment would raise ``KeyError`` there. The exported ``segments`` therefore hold only
matched segments (each with ``word``/``start``/``end``); the unmatched ones move, unchanged, to
``unmatched_segments`` (their pixels stay in the ``.npy``). Everything else of the record is kept.

**Split.** Each id goes to ``image_ids_train.txt`` or ``image_ids_test.txt`` by its record's
``split`` (duplicates share a split upstream); ``image_ids.txt`` lists both. An id seen twice is an
error.

**Filters** (:class:`ExportFilters`) drop whole samples; each dropped sample is counted under the
first filter it fails. Samples without any match are not affected by ``min_match_score`` or
``min_margin`` (use ``min_subjects`` / ``require_person`` for them).

Files are written through temp files and renames; the id lists and the summary come last, so an
interrupted export has no ``image_ids.txt`` and is not mistaken for a finished one.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from datagen.match_quality import AMBIGUOUS_MARGIN, match_quality
from datagen.record import Record, RecordError
from datagen.shard_io import decode_segment_map

ID_LISTS = ("image_ids.txt", "image_ids_train.txt", "image_ids_test.txt")
SUMMARY = "export_summary.json"
SEGMAP_DTYPES = ("auto", "uint8", "int32", "int64")  # each one upstream's loader reads
# Refused, with the reason: upstream's TrainTransformWithSegmap does torch.cat([uint8 image, map]).
UNREADABLE_SEGMAP_DTYPES = {
    "uint16": "FastComposer's loader cannot read uint16 maps: it concatenates the uint8 image with the map "
              "(torch.cat), and torch does not promote uint8 with uint16; use auto (uint8, or int32 when an id "
              "exceeds 255), uint8, int32 or int64",
}


class ExportError(ValueError):
    """The shards or the output folder do not allow the export; the message says which and why."""


@dataclass
class ExportFilters:
    min_match_score: float | None = None  # drop samples whose weakest match scores below this
    min_margin: float | None = None  # drop samples whose smallest margin to the runner-up is below this
    require_person: bool = False  # drop samples without a matched person segment
    min_subjects: int = 0  # drop samples with fewer matched segments
    max_subjects: int | None = None  # drop samples with more matched segments
    exclude_unmatched_person: bool = False  # drop samples with a person segment no phrase matched
    splits: tuple[str, ...] = ("train", "test")  # export only these splits

    def rejection(self, record: Record) -> str | None:
        """The first filter the record fails (its name), or None when it passes."""
        if record.split not in self.splits:
            return f"split_{record.split}"
        q = match_quality(record, AMBIGUOUS_MARGIN)
        if q.n_matched < self.min_subjects:
            return "min_subjects"
        if self.max_subjects is not None and q.n_matched > self.max_subjects:
            return "max_subjects"
        if self.require_person and q.n_matched_person == 0:
            return "require_person"
        if self.min_match_score is not None and q.min_match_score is not None and q.min_match_score < self.min_match_score:
            return "min_match_score"
        if self.min_margin is not None and q.min_margin is not None and q.min_margin < self.min_margin:
            return "min_margin"
        if self.exclude_unmatched_person and q.unmatched_person_segment:
            return "unmatched_person_segment"
        return None


@dataclass
class ExportSummary:
    format: str
    shards_dir: str
    out: str
    shards: int
    samples_seen: int
    exported: int
    train: int
    test: int
    filtered_out: dict[str, int]
    filters: dict
    segments_exported: int
    unmatched_segments: int
    segmap_dtype: str
    removed_stale: int = 0
    shard_names: list[str] = field(default_factory=list)


def fastcomposer_json(record: Record) -> dict:
    """The record as FastComposer's loader wants it: ``segments`` = matched segments only."""
    d = record.to_dict()
    d["segments"] = [s.to_dict() for s in record.segments if s.matched]
    d["unmatched_segments"] = [s.to_dict() for s in record.segments if not s.matched]
    return d


def segmap_array(segment_map: np.ndarray, dtype: str, record: Record) -> np.ndarray:
    top = int(segment_map.max()) if segment_map.size else 0
    if dtype == "auto":
        dtype = "uint8" if top <= 255 else "int32"
    limit = np.iinfo(np.dtype(dtype)).max
    if top > limit:
        raise ExportError(f"sample {record.key}: segment id {top} does not fit the segment-map dtype {dtype}")
    return np.ascontiguousarray(segment_map.astype(dtype))


def export_fastcomposer(
    shards_dir: str | Path,
    out: str | Path,
    filters: ExportFilters | None = None,
    overwrite: bool = False,
    segmap_dtype: str = "auto",
    workers: int = 1,
) -> ExportSummary:
    """Export every ``subjects-*.tar`` of ``shards_dir`` to ``out``; return (and write) the summary."""
    filters = filters or ExportFilters()
    shards_dir, out = Path(shards_dir), Path(out)
    if segmap_dtype in UNREADABLE_SEGMAP_DTYPES:
        raise ExportError(f"segment-map dtype {segmap_dtype}: {UNREADABLE_SEGMAP_DTYPES[segmap_dtype]}")
    if segmap_dtype not in SEGMAP_DTYPES:
        raise ExportError(f"segment-map dtype must be one of {SEGMAP_DTYPES}, got {segmap_dtype!r}")
    tars = sorted(shards_dir.glob("subjects-*.tar"))
    if not tars:
        raise ExportError(f"no shards (subjects-*.tar) in {shards_dir}")
    old_ids = _previous_ids(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)

    jobs = [(tar, out, filters, segmap_dtype) for tar in tars]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_export_shard, *zip(*jobs, strict=True)))
    else:
        results = [_export_shard(*job) for job in jobs]

    split_of: dict[str, str] = {}
    where: dict[str, str] = {}
    rejected: Counter[str] = Counter()
    seen = n_segments = n_unmatched = 0
    for tar, outcome in zip(tars, results, strict=True):
        for key, split, reason, n_seg, n_unm in outcome:
            seen += 1
            if key in where:
                raise ExportError(f"sample id {key} is in both {where[key]} and {tar.name}")
            where[key] = tar.name
            if reason is not None:
                rejected[reason] += 1
                continue
            split_of[key] = split
            n_segments += n_seg
            n_unmatched += n_unm

    ids = sorted(split_of, key=int)
    train = [i for i in ids if split_of[i] == "train"]
    test = [i for i in ids if split_of[i] == "test"]
    removed = 0
    for stale in sorted(old_ids - set(ids)):
        for ext in ("jpg", "json", "npy"):
            p = out / stale[:5] / f"{stale}.{ext}"
            if p.exists():
                p.unlink()
                removed += 1
    # samples that a filter rejected this time but an earlier export wrote
    for key in where:
        if key not in split_of:
            for ext in ("jpg", "json", "npy"):
                p = out / key[:5] / f"{key}.{ext}"
                if p.exists():
                    p.unlink()
                    removed += 1
    summary = ExportSummary(
        format="fastcomposer", shards_dir=str(shards_dir.resolve()), out=str(out.resolve()), shards=len(tars),
        samples_seen=seen, exported=len(ids), train=len(train), test=len(test),
        filtered_out=dict(sorted(rejected.items())), filters=asdict(filters), segments_exported=n_segments,
        unmatched_segments=n_unmatched, segmap_dtype=segmap_dtype, removed_stale=removed,
        shard_names=[t.name for t in tars],
    )
    _write_atomic(out / SUMMARY, (json.dumps(asdict(summary), indent=1) + "\n").encode())
    for name, lst in zip(ID_LISTS, (ids, train, test), strict=True):
        _write_atomic(out / name, "".join(f"{i}\n" for i in lst).encode())
    return summary


def _previous_ids(out: Path, overwrite: bool) -> set[str]:
    if not out.exists():
        return set()
    if not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if any(out.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out} is not empty; pass --overwrite (overwrite=True) to export over it")
    listed = out / ID_LISTS[0]
    return set(listed.read_text().split()) if listed.is_file() else set()


def _export_shard(tar_path: Path, out: Path, filters: ExportFilters, segmap_dtype: str):
    """Export one shard; return ``(key, split, rejection or None, matched segments, unmatched segments)`` per sample."""
    outcomes = []
    for key, members in _iter_raw_samples(tar_path):
        try:
            record = Record.from_json(members["json"])
        except RecordError as e:
            raise ExportError(f"{tar_path.name}: sample {key}: {e}") from e
        if record.key != key:
            raise ExportError(f"{tar_path.name}: member {key}.json holds record key {record.key!r}")
        reason = filters.rejection(record)
        matched = sum(1 for s in record.segments if s.matched)
        if reason is None:
            segmap = decode_segment_map(members["seg.png"])
            with Image.open(io.BytesIO(members["jpg"])) as im:
                size = im.size
            if size != (segmap.shape[1], segmap.shape[0]) or size != (record.width, record.height):
                raise ExportError(
                    f"{tar_path.name}: sample {key}: image {size}, segment map {segmap.shape[::-1]} and record "
                    f"{record.width}x{record.height} disagree"
                )
            folder = out / key[:5]
            folder.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, segmap_array(segmap, segmap_dtype, record), allow_pickle=False)
            _write_atomic(folder / f"{key}.jpg", members["jpg"])
            _write_atomic(folder / f"{key}.npy", buf.getvalue())
            _write_atomic(folder / f"{key}.json", json.dumps(fastcomposer_json(record), ensure_ascii=False).encode())
        outcomes.append((key, record.split, reason, matched, len(record.segments) - matched))
    return outcomes


def _iter_raw_samples(tar_path: Path):
    """``(key, {"jpg", "seg.png", "json": bytes})`` per sample of a shard, in order."""
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key != current:
                    if current is not None:
                        yield current, _complete(tar_path, current, members)
                    current, members = key, {}
                members[ext] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise ExportError(f"{tar_path}: not a readable tar: {e}") from e
    if current is not None:
        yield current, _complete(tar_path, current, members)


def _complete(tar_path: Path, key: str, members: dict[str, bytes]) -> dict[str, bytes]:
    missing = [m for m in ("jpg", "seg.png", "json") if m not in members]
    if missing:
        raise ExportError(f"{tar_path.name}: sample {key} lacks member(s) {missing}")
    if not key.isdigit():
        raise ExportError(f"{tar_path.name}: sample key {key!r} is not decimal digits (FastComposer ids int()-parse)")
    return members


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
