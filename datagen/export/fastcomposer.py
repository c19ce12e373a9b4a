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

**Ids and safety.** Before anything is written, every member name of every shard is checked:
it must be ``<id>.<ext>`` with ``id`` made of ASCII decimal digits (``0``-``9`` only: ``²`` or
Arabic-Indic digits pass ``str.isdigit()`` but are refused), and ids must be unique *as integers*
(``1`` and ``00000001`` are the same sample to FastComposer's ``int(id)`` and are refused). Nothing
outside ``OUT`` is ever read as a path, written or removed: with ``overwrite``, the old
``image_ids.txt`` is only trusted line by line (a line that is not such an id, e.g. ``../../x``
or an absolute path, is skipped and reported, never used as a path); a ``<id[:5]>`` folder that
is a symbolic link (or not a folder) is refused before anything is written, and a stale file is
removed only from a real ``<id[:5]>`` folder inside ``OUT``.

**Split.** Each id goes to ``image_ids_train.txt`` or ``image_ids_test.txt`` by its record's
``split`` (duplicates share a split upstream); ``image_ids.txt`` lists both. An id seen twice is an
error.

**Filters** (:class:`ExportFilters`) drop whole samples; each dropped sample is counted under the
first filter it fails. Samples without any match are not affected by ``min_match_score`` or
``min_margin`` (use ``min_subjects`` / ``require_subject`` for them). ``require_subject`` and
``exclude_unmatched_subject`` look at segments of the export's object types. The face filters read the
record's face checks (:mod:`datagen.record.face_quality`): ``drop_merged_persons`` (a person segment
holding two faces or more), ``drop_faceless_persons`` (a matched person segment without a face),
``min_face_size`` (a matched person whose largest face is smaller, px; matched persons without a face
are left to ``drop_faceless_persons``) and ``require_primary_face`` (the source's face rect is not in
a matched person segment; samples whose source gives no face rect pass). A record whose faces were
never checked (schema 1.0) cannot pass a face filter and is counted as ``faces_not_checked``.

Files are written through temp files and renames; the id lists and the summary come last, so an
interrupted export has no ``image_ids.txt`` and is not mistaken for a finished one.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from datagen.config import DEFAULT_OBJECT_TYPES, object_types_problem
from datagen.files import atomic_write
from datagen.record.face_quality import face_quality
from datagen.record.quality import AMBIGUOUS_MARGIN, match_quality, subject_segments
from datagen.record.schema import Record, RecordError
from datagen.shards.reader import ShardError, decode_segment_map, iter_members

ID_LISTS = ("image_ids.txt", "image_ids_train.txt", "image_ids_test.txt")
SUMMARY = "export_summary.json"
SEGMAP_DTYPES = ("auto", "uint8", "int32", "int64")  # each one upstream's loader reads
# Refused, with the reason: upstream's TrainTransformWithSegmap does torch.cat([uint8 image, map]).
UNREADABLE_SEGMAP_DTYPES = {
    "uint16": "FastComposer's loader cannot read uint16 maps: it concatenates the uint8 image with the map "
              "(torch.cat), and torch does not promote uint8 with uint16; use auto (uint8, or int32 when an id "
              "exceeds 255), uint8, int32 or int64",
}
EXPORTED_EXTS = ("jpg", "json", "npy")
_ID_RE = re.compile(r"[0-9]+")  # ASCII only (re's [0-9] never matches other scripts' digits)
_MEMBER_RE = re.compile(r"([0-9]+)\.([A-Za-z0-9.]+)")


class ExportError(ValueError):
    """The shards or the output folder do not allow the export; the message says which and why."""


@dataclass
class ExportFilters:
    min_match_score: float | None = None  # drop samples whose weakest match scores below this
    min_margin: float | None = None  # drop samples whose smallest margin to the runner-up is below this
    require_subject: bool = False  # drop samples without a matched segment of the object types
    min_subjects: int = 0  # drop samples with fewer matched segments
    max_subjects: int | None = None  # drop samples with more matched segments
    exclude_unmatched_subject: bool = False  # drop samples with a segment of the object types no phrase matched
    splits: tuple[str, ...] = ("train", "test")  # export only these splits
    drop_merged_persons: bool = False  # drop samples with a person segment holding 2+ faces
    drop_faceless_persons: bool = False  # drop samples with a matched person segment without a face
    min_face_size: int | None = None  # drop samples with a matched person whose largest face is smaller (px)
    require_primary_face: bool = False  # drop samples whose source's face rect is not in a matched person

    @property
    def uses_faces(self) -> bool:
        return bool(self.drop_merged_persons or self.drop_faceless_persons or self.min_face_size is not None
                    or self.require_primary_face)

    def rejection(self, record: Record, object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES) -> str | None:
        """The first filter the record fails (its name), or None when it passes; ``object_types``:
        the COCO labels of subjects (``require_subject``, ``exclude_unmatched_subject``)."""
        if record.split not in self.splits:
            return f"split_{record.split}"
        q = match_quality(record, AMBIGUOUS_MARGIN)
        if q.n_matched < self.min_subjects:
            return "min_subjects"
        if self.max_subjects is not None and q.n_matched > self.max_subjects:
            return "max_subjects"
        subjects, unmatched = subject_segments(record, object_types)
        if self.require_subject and not subjects:
            return "require_subject"
        if self.min_match_score is not None and q.min_match_score is not None and q.min_match_score < self.min_match_score:
            return "min_match_score"
        if self.min_margin is not None and q.min_margin is not None and q.min_margin < self.min_margin:
            return "min_margin"
        if self.exclude_unmatched_subject and unmatched:
            return "unmatched_subject_segment"
        return self.face_rejection(record) if self.uses_faces else None

    def face_rejection(self, record: Record) -> str | None:
        f = face_quality(record)
        if not f.checked:
            return "faces_not_checked"
        if self.drop_merged_persons and f.flags["merged_persons"]:
            return "merged_persons"
        if self.drop_faceless_persons and f.flags["faceless_person"]:
            return "faceless_person"
        if self.min_face_size is not None and f.min_matched_face_size is not None \
                and f.min_matched_face_size < self.min_face_size:
            return "min_face_size"
        if self.require_primary_face and (f.flags["primary_face_unsegmented"] or f.flags["primary_face_unmatched"]):
            return "require_primary_face"
        return None


def check_object_types(object_types: tuple[str, ...]) -> tuple[str, ...]:
    """``object_types`` as a tuple, or :class:`ExportError` saying what is wrong with them."""
    problem = object_types_problem(object_types)
    if problem:
        raise ExportError(f"object types {problem}")
    return tuple(object_types)


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
    object_types: list[str]  # the COCO labels of the exported subjects (``segments``)
    segments_exported: int  # subjects: matched segments of the object types
    subjects_by_type: dict[str, int]
    other_segments: int  # matched segments of other labels
    unmatched_segments: int
    segmap_dtype: str
    removed_stale: int = 0
    shard_names: list[str] = field(default_factory=list)
    # lines of the old image_ids.txt that were not ids (never used as paths), and stale files left in
    # place because their folder is not a real folder inside OUT
    ignored_old_ids: list[str] = field(default_factory=list)
    not_removed: list[str] = field(default_factory=list)


def fastcomposer_json(record: Record, object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES) -> dict:
    """The record as FastComposer's loader wants it: ``segments`` = the subjects (matched segments
    of ``object_types``), then ``other_segments`` (matched, other labels), ``unmatched_segments``."""
    subjects = {s.id for s in subject_segments(record, object_types)[0]}
    d = record.to_dict()
    d["segments"] = [s.to_dict() for s in record.segments if s.id in subjects]
    d["other_segments"] = [s.to_dict() for s in record.segments if s.matched and s.id not in subjects]
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
    object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES,
) -> ExportSummary:
    """Export every ``subjects-*.tar`` of ``shards_dir`` to ``out``; return (and write) the summary.
    ``object_types``: the COCO labels of the subjects (the profile's ``subjects.object_types``)."""
    filters = filters or ExportFilters()
    object_types = check_object_types(object_types)
    shards_dir, out = Path(shards_dir), Path(out)
    if segmap_dtype in UNREADABLE_SEGMAP_DTYPES:
        raise ExportError(f"segment-map dtype {segmap_dtype}: {UNREADABLE_SEGMAP_DTYPES[segmap_dtype]}")
    if segmap_dtype not in SEGMAP_DTYPES:
        raise ExportError(f"segment-map dtype must be one of {SEGMAP_DTYPES}, got {segmap_dtype!r}")
    tars = sorted(shards_dir.glob("subjects-*.tar"))
    if not tars:
        raise ExportError(f"no shards (subjects-*.tar) in {shards_dir}")
    keys = check_shard_ids(tars)  # before anything is written
    old_ids, ignored = _previous_ids(out, overwrite)
    if out.exists():
        _check_id_folders(out, {k[:5] for k in keys})
    out.mkdir(parents=True, exist_ok=True)

    jobs = [(tar, out, filters, segmap_dtype, object_types) for tar in tars]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_export_shard, *zip(*jobs, strict=True)))
    else:
        results = [_export_shard(*job) for job in jobs]

    split_of: dict[str, str] = {}
    where: dict[str, str] = {}
    rejected: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    seen = n_other = n_unmatched = 0
    for tar, outcome in zip(tars, results, strict=True):
        for key, split, reason, subject_labels, n_oth, n_unm in outcome:
            seen += 1
            if key in where:
                raise ExportError(f"sample id {key} is in both {where[key]} and {tar.name}")
            where[key] = tar.name
            if reason is not None:
                rejected[reason] += 1
                continue
            split_of[key] = split
            by_type.update(subject_labels)
            n_other += n_oth
            n_unmatched += n_unm

    ids = sorted(split_of, key=int)
    train = [i for i in ids if split_of[i] == "train"]
    test = [i for i in ids if split_of[i] == "test"]
    removed = 0
    not_removed: list[str] = []
    # ids an earlier export wrote that this one does not, and samples a filter rejected this time
    stale_ids = (old_ids - set(ids)) | {key for key in where if key not in split_of}
    for stale in sorted(stale_ids, key=lambda k: (int(k), k)):
        n, refused = _remove_exported(out, stale)
        removed += n
        not_removed += refused
    summary = ExportSummary(
        format="fastcomposer", shards_dir=str(shards_dir.resolve()), out=str(out.resolve()), shards=len(tars),
        samples_seen=seen, exported=len(ids), train=len(train), test=len(test),
        filtered_out=dict(sorted(rejected.items())), filters=asdict(filters), object_types=list(object_types),
        segments_exported=sum(by_type.values()), subjects_by_type={t: by_type[t] for t in object_types},
        other_segments=n_other, unmatched_segments=n_unmatched, segmap_dtype=segmap_dtype, removed_stale=removed,
        shard_names=[t.name for t in tars], ignored_old_ids=ignored, not_removed=not_removed,
    )
    atomic_write(out / SUMMARY, (json.dumps(asdict(summary), indent=1) + "\n").encode())
    for name, lst in zip(ID_LISTS, (ids, train, test), strict=True):
        atomic_write(out / name, "".join(f"{i}\n" for i in lst).encode())
    return summary


def _previous_ids(out: Path, overwrite: bool) -> tuple[set[str], list[str]]:
    """The ids an earlier export listed in ``OUT/image_ids.txt``, and the lines that are not ids
    (skipped: a line is only ever used as a path when it is ASCII decimal digits)."""
    if not out.exists():
        return set(), []
    if not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if any(out.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out} is not empty; pass --overwrite (overwrite=True) to export over it")
    listed = out / ID_LISTS[0]
    if listed.is_symlink() or not listed.is_file():
        return set(), ([f"{ID_LISTS[0]} is a symbolic link; not read"] if listed.is_symlink() else [])
    ids, ignored = set(), []
    for line in listed.read_text(encoding="utf-8", errors="backslashreplace").splitlines():
        token = line.strip()
        if not token:
            continue
        if _ID_RE.fullmatch(token):
            ids.add(token)
        else:
            ignored.append(token)
    return ids, ignored


def check_shard_ids(tars: list[Path]) -> list[str]:
    """Every sample id of the shards, after checking (from the tar headers alone) that each member
    is ``<ASCII decimal id>.<ext>`` and that no two samples share an id or an ``int()`` value."""
    by_value: dict[int, tuple[str, str]] = {}
    keys: list[str] = []
    for tar_path in tars:
        seen_here: set[str] = set()
        try:
            with tarfile.open(tar_path, mode="r:") as tar:
                for member in tar:
                    m = _MEMBER_RE.fullmatch(member.name)
                    if m is None:
                        raise ExportError(
                            f"{tar_path.name}: member {member.name!r} is not <id>.<ext> with an id of ASCII decimal "
                            "digits 0-9 (FastComposer int()-parses ids and files are written to OUT/<id[:5]>/<id>.*)"
                        )
                    key = m.group(1)
                    if key in seen_here:
                        continue
                    seen_here.add(key)
                    value = int(key)
                    if value in by_value:
                        other, where = by_value[value]
                        same = "the same id" if other == key else f"the same integer ({value}) as id {other!r}"
                        raise ExportError(f"{tar_path.name}: sample id {key!r} is {same} in {where}; ids must be unique as integers")
                    by_value[value] = (key, tar_path.name)
                    keys.append(key)
        except tarfile.TarError as e:
            raise ExportError(f"{tar_path}: not a readable tar: {e}") from e
    return keys


def _check_id_folders(out: Path, folders: set[str]) -> None:
    """Refuse an ``OUT/<id[:5]>`` that is a symbolic link or not a folder: writing there could land outside OUT."""
    for name in sorted(folders):
        p = out / name
        if p.is_symlink():
            raise ExportError(f"{p} is a symbolic link (to {p.readlink()}); refusing to write through it, remove it first")
        if p.exists() and not p.is_dir():
            raise ExportError(f"{p} exists and is not a folder; refusing to export over it")


def _remove_exported(out: Path, key: str) -> tuple[int, list[str]]:
    """Remove ``OUT/<key[:5]>/<key>.jpg|json|npy``, only from a real folder directly inside OUT."""
    if not _ID_RE.fullmatch(key):  # never happens: every key was checked; kept as the last guard
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


def _export_shard(tar_path: Path, out: Path, filters: ExportFilters, segmap_dtype: str, object_types: tuple[str, ...]):
    """Export one shard; return ``(key, split, rejection or None, labels of its subjects, other matched
    segments, unmatched segments)`` per sample."""
    outcomes = []
    for key, members in _shard_members(tar_path):
        try:
            record = Record.from_json(members["json"])
        except RecordError as e:
            raise ExportError(f"{tar_path.name}: sample {key}: {e}") from e
        if record.key != key:
            raise ExportError(f"{tar_path.name}: member {key}.json holds record key {record.key!r}")
        reason = filters.rejection(record, object_types)
        subjects = subject_segments(record, object_types)[0]
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
            if folder.is_symlink() or folder.resolve().parent != out.resolve():  # appeared since the check
                raise ExportError(f"{folder} is not a folder inside {out}; refusing to write through it")
            buf = io.BytesIO()
            np.save(buf, segmap_array(segmap, segmap_dtype, record), allow_pickle=False)
            atomic_write(folder / f"{key}.jpg", members["jpg"])
            atomic_write(folder / f"{key}.npy", buf.getvalue())
            atomic_write(folder / f"{key}.json", json.dumps(fastcomposer_json(record, object_types), ensure_ascii=False).encode())
        outcomes.append((key, record.split, reason, [s.coco_label for s in subjects], matched - len(subjects),
                         len(record.segments) - matched))
    return outcomes


def _shard_members(tar_path: Path):
    """``(key, {"jpg", "seg.png", "json": bytes})`` per sample of a shard, in order."""
    try:
        for key, members in iter_members(tar_path):
            if not _ID_RE.fullmatch(key):  # checked before writing (check_shard_ids); the last guard
                raise ExportError(f"{tar_path.name}: sample key {key!r} is not ASCII decimal digits")
            yield key, members
    except ShardError as e:
        raise ExportError(str(e)) from e
