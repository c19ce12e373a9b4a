"""What every export format shares: its errors, the quality filters, the one shard walk and the summary.

An export (:func:`run_export`) reads every ``subjects-*.tar`` of SHARDS_DIR. Before anything is
written it checks every member name of every shard (``<id>.<ext>``, ``id`` ASCII decimal digits,
ids unique as integers: ids become paths under OUT) and that OUT is empty (or ``overwrite``). It
then walks the shards (in parallel with ``workers`` > 1), reads each sample through the shard
reader's :class:`~datagen.shards.reader.TarSample`, drops the samples a filter rejects (each
counted under the first filter it fails) and hands the others to the format
(:class:`ShardExport`), which writes them. The format writes its closing files (id lists, metadata,
legend), then ``OUT/export_summary.json`` comes last.

**Filters** (:class:`ExportFilters`) drop whole samples. Samples without any match are not
affected by ``min_match_score`` or ``min_margin`` (use ``min_subjects`` / ``require_subject`` for
them). ``require_subject`` and ``exclude_unmatched_subject`` look at segments of the export's object
types. The face filters read the record's face checks (:mod:`datagen.record.face_quality`):
``drop_merged_persons`` (a person segment holding two faces or more), ``drop_faceless_persons`` (a
matched person segment without a face), ``min_face_size`` (a matched person whose largest face is
smaller, px; matched persons without a face are left to ``drop_faceless_persons``) and
``require_primary_face`` (the source's face rect is not in a matched person segment; samples whose
source gives no face rect pass). A record whose faces were never checked (schema 1.0) cannot pass a
face filter and is counted as ``faces_not_checked``. ``drop_merged_identities`` (a person segment
holding faces of two identities in the run's index: the record's ``identity_checks``,
:mod:`datagen.record.identity_faces`) needs that index (``identities_from``).
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, ClassVar

from datagen import storage
from datagen.config import DEFAULT_OBJECT_TYPES, object_types_problem
from datagen.files import atomic_write
from datagen.record.face_quality import face_quality
from datagen.record.quality import AMBIGUOUS_MARGIN, match_quality, subject_segments
from datagen.record.schema import Record
from datagen.shards.reader import ShardError, TarSample, iter_members

SUMMARY = "export_summary.json"
ID_RE = re.compile(r"[0-9]+")  # ASCII only (re's [0-9] never matches other scripts' digits)
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
    split_file: str | None = None  # a run's identity-safe split.parquet: its split replaces the record's
    identities_from: str | None = None  # a run with identities.parquet: exported faces and subjects carry it
    drop_merged_identities: bool = False  # drop samples with a person segment holding two identities' faces

    def __post_init__(self) -> None:
        if self.drop_merged_identities and self.identities_from is None:
            raise ExportError("dropping merged identities needs the run whose identities.parquet says who is who "
                              "(--identities RUN, identities_from)")

    def split_for(self, record: Record) -> str:
        """The sample's split: the identity-safe split file's when one is given, else the record's."""
        if self.split_file is None:
            return record.split
        from datagen.identity.split import cached_split

        return cached_split(self.split_file).get(record.key, record.split)

    def join_identities(self, record: Record) -> None:
        """Give the record's faces their identity, and the record its ``identity_checks``, from the run's
        index (``identities_from``)."""
        if self.identities_from is None:
            return
        from datagen.identity.index import identity_lookup
        from datagen.record.identity_faces import IdentityChecks, join_identities

        lookup = identity_lookup(self.identities_from)
        join_identities(record.key, record.identity_faces, lookup.by_face)
        record.identity_checks = IdentityChecks.of(lookup.merged.get(record.key, []))

    def segment_identity(self, key: str, segment_id: int) -> int | None:
        """The identity of a sample's person segment in the run's index (None: unknown, or no index)."""
        if self.identities_from is None:
            return None
        from datagen.identity.index import identity_lookup

        return identity_lookup(self.identities_from).by_segment.get((key, segment_id))

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
        if self.drop_merged_identities and record.identity_checks is not None and record.identity_checks.flags:
            return "merged_identities"
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
    """``object_types`` as a tuple, or :class:`ExportError` saying what is wrong with them (COCO or
    open-vocabulary labels: the profile or the command line checked them against the run's grounding)."""
    problem = object_types_problem(object_types, open_vocabulary=True)
    if problem:
        raise ExportError(f"object types {problem}")
    return tuple(object_types)


@dataclass
class ExportSummary:
    """What an export did, for every format; written as ``export_summary.json``. The format's own
    fields sit in ``counts`` (written before ``filtered_out``) and ``details`` (written last) and
    read as attributes too (``summary.train``, ``summary.subjects``)."""

    format: str
    shards_dir: str
    out: str
    shards: int
    samples_seen: int
    exported: int
    counts: dict[str, Any]
    filtered_out: dict[str, int]
    filters: dict
    object_types: list[str]  # the COCO labels of the subjects
    details: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        for part in ("counts", "details"):  # looked up in __dict__: no recursion while unpickling
            values = self.__dict__.get(part, {})
            if name in values:
                return values[name]
        raise AttributeError(f"{type(self).__name__} of {self.__dict__.get('format')!r} has no field {name!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        counts, details = d.pop("counts"), d.pop("details")
        head = {k: d.pop(k) for k in ("format", "shards_dir", "out", "shards", "samples_seen", "exported")}
        return {**head, **counts, **d, **details}


@dataclass
class SampleOutcome:
    """What became of one sample: exported (``rejection`` None) or dropped, and what it added."""

    key: str
    split: str
    rejection: str | None = None
    counts: Counter[str] = field(default_factory=Counter)  # added up over the exported samples
    lines: list[str] = field(default_factory=list)  # metadata lines, kept in shard and sample order


@dataclass
class Tally:
    """The outcomes of every shard, added up in shard order."""

    shards: list[str] = field(default_factory=list)  # the names of the shards walked, in order
    seen: int = 0
    kept: dict[str, str] = field(default_factory=dict)  # key -> split of every exported sample
    shard_of: dict[str, str] = field(default_factory=dict)  # key -> shard name of every sample seen
    rejected: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)

    def add(self, shard: str, outcome: SampleOutcome) -> None:
        key = outcome.key
        if key in self.shard_of:
            raise ExportError(f"sample id {key} is in both {self.shard_of[key]} and {shard}")
        self.seen += 1
        self.shard_of[key] = shard
        if outcome.rejection is not None:
            self.rejected[outcome.rejection] += 1
            return
        self.kept[key] = outcome.split
        self.counts.update(outcome.counts)
        self.lines += outcome.lines


class ShardExport:
    """One export format: what it checks before writing, how it writes one kept sample, and how it
    ends. A subclass sets ``name`` (the ``--format`` value) and ``options`` (its own keyword
    arguments, named as the CLI's flags) and is registered in :mod:`datagen.export.registry`.
    Instances travel to worker processes: keep their state picklable."""

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, out: str | Path, filters: ExportFilters | None = None,
                 object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES):
        self.out = storage.path(out)
        self.filters = filters or ExportFilters()
        self.object_types = check_object_types(object_types)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Raise :class:`ExportError` for a bad value of the format's own options, before anything is
        written (the command exits 2 on it)."""

    def prepare(self, keys: list[str], overwrite: bool) -> None:
        """Check OUT before anything is written (``keys``: every sample id of the shards)."""
        check_out(self.out, overwrite)

    def write_sample(self, sample: TarSample, record: Record) -> SampleOutcome:
        """Write one sample the filters kept."""
        raise NotImplementedError

    def end_shard(self, tar_name: str) -> None:
        """Called after the last sample of a shard, in the process that wrote them (a format that
        writes one file per shard, e.g. Parquet, writes it here). Nothing by default."""

    def finish(self, tally: Tally) -> tuple[dict[str, Any], dict[str, Any]]:
        """Write the files that end the export (all but the summary); return the summary's
        ``counts`` and ``details``."""
        raise NotImplementedError

    @classmethod
    def headline(cls, summary: ExportSummary) -> list[str]:
        """What the command prints before the filter counts: by default what was exported, with the
        subjects when the format counts them."""
        subjects = f", {summary.subjects} subject(s)" if summary.counts.get("subjects") is not None else ""
        return [f"exported {summary.exported} of {summary.samples_seen} samples{subjects} from {summary.shards} "
                f"shard(s) as {summary.format} to {summary.out}"]

    @classmethod
    def notes(cls, summary: ExportSummary) -> list[str]:
        """What the command prints after the filter counts."""
        return []

    @classmethod
    def describe(cls, summary: ExportSummary) -> list[str]:
        """The lines the command prints about a finished export (the summary's path not included)."""
        dropped = sum(summary.filtered_out.values())
        filtered = f"filtered out: {dropped}" + (f" {json.dumps(summary.filtered_out)}" if dropped else "")
        return [*cls.headline(summary), filtered, *cls.notes(summary)]


def run_export(export: ShardExport, shards_dir: str | Path, overwrite: bool = False, workers: int = 1) -> ExportSummary:
    """Export every ``subjects-*.tar`` of ``shards_dir`` with ``export``; return (and write) the summary."""
    shards_dir = storage.path(shards_dir)
    tars = sorted(shards_dir.glob("subjects-*.tar"), key=lambda p: p.name)
    if not tars:
        raise ExportError(f"no shards (subjects-*.tar) in {shards_dir}")
    export.prepare(check_shard_ids(tars), overwrite)  # before anything is written
    if isinstance(export.out, Path):  # a bucket has no folders to make
        export.out.mkdir(parents=True, exist_ok=True)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(export_shard, repeat(export), tars))
    else:
        results = [export_shard(export, tar) for tar in tars]
    tally = Tally(shards=[tar.name for tar in tars])
    for tar, outcomes in zip(tars, results, strict=True):
        for outcome in outcomes:
            tally.add(tar.name, outcome)
    counts, details = export.finish(tally)
    summary = ExportSummary(
        format=export.name, shards_dir=storage.text(shards_dir), out=storage.text(export.out), shards=len(tars),
        samples_seen=tally.seen, exported=len(tally.kept), counts=counts,
        filtered_out=dict(sorted(tally.rejected.items())), filters=asdict(export.filters),
        object_types=list(export.object_types), details=details,
    )
    atomic_write(export.out / SUMMARY, json.dumps(summary.to_dict(), indent=1) + "\n")
    return summary


def export_shard(export: ShardExport, tar_path: Path) -> list[SampleOutcome]:
    """The one shard walk: each sample's record read and checked, filtered, and the kept samples
    written by ``export``; one outcome per sample, in shard order."""
    outcomes = []
    try:
        for key, members in iter_members(tar_path):
            if not ID_RE.fullmatch(key):  # checked before writing (check_shard_ids); the last guard
                raise ExportError(f"{tar_path.name}: sample key {key!r} is not ASCII decimal digits")
            sample = TarSample(tar_path.name, key, members)
            record = sample.record()
            record.split = export.filters.split_for(record)
            export.filters.join_identities(record)
            reason = export.filters.rejection(record, export.object_types)
            if reason is not None:
                outcomes.append(SampleOutcome(key, record.split, reason))
            else:
                outcomes.append(export.write_sample(sample, record))
        export.end_shard(tar_path.name)
    except ShardError as e:
        raise ExportError(str(e)) from e
    return outcomes


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that is not a folder, or not empty unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out} is not empty; pass --overwrite (overwrite=True) to export over it")


def check_sample_folders(out, names: set[str]) -> None:
    """Refuse, before anything is written, an ``OUT/<name>`` (a format's per-sample folder, ``name``
    made of a sample id) that is a symbolic link or not a folder: writing there could land outside
    OUT. A bucket has neither links nor folders."""
    if not isinstance(out, Path) or not out.exists():
        return
    for name in sorted(names):
        p = out / name
        if p.is_symlink():
            raise ExportError(f"{p} is a symbolic link (to {p.readlink()}); refusing to write through it, remove it first")
        if p.exists() and not p.is_dir():
            raise ExportError(f"{p} exists and is not a folder; refusing to export over it")


def sample_folder(out, name: str):
    """``OUT/<name>``, the per-sample folder a format writes into (every format that has one uses
    this): made, and checked to be a real folder directly inside OUT (a link that appeared since
    :func:`check_sample_folders` is refused). On a bucket: the prefix, nothing to make."""
    if not ID_RE.fullmatch(name):  # names come from checked sample ids; the last guard
        raise ExportError(f"per-sample folder {name!r} is not ASCII decimal digits")
    folder = out / name
    if not isinstance(out, Path):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if folder.is_symlink() or folder.resolve().parent != out.resolve():
        raise ExportError(f"{folder} is not a folder inside {out}; refusing to write through it")
    return folder


def check_shard_ids(tars: list[Path]) -> list[str]:
    """Every sample id of the shards, after checking (from the tar headers alone) that each member
    is ``<ASCII decimal id>.<ext>`` and that no two samples share an id or an ``int()`` value."""
    by_value: dict[int, tuple[str, str]] = {}
    keys: list[str] = []
    for tar_path in tars:
        seen_here: set[str] = set()
        try:
            with tar_path.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    m = _MEMBER_RE.fullmatch(member.name)
                    if m is None:
                        raise ExportError(
                            f"{tar_path.name}: member {member.name!r} is not <id>.<ext> with an id of ASCII decimal "
                            "digits 0-9 (ids name the exported files, and FastComposer int()-parses them)"
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
