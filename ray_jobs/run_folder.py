"""Read a run folder ``manifests/<run>/``: its run manifest, its per-shard entries, and samples of its shards.

A run folder holds ``run.json`` and one ``shards/subjects-NNNNN.json`` entry per finished shard
(written by the Ray job after the shard's tar; format in :mod:`ray_jobs.shard_manifest`). An entry
with ``"status": "failed"`` is a shard that kept failing: it has no tar, and its items are listed
as failed (or duplicate) with the shard's error as their reason. The tables,
``summary.json`` and ``report.html`` that the tools here write go next to them.

Nothing here decodes a whole shard: records are read from the ``.json`` members only, and the
report/inspect tools fetch the few samples they show by member name.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from datagen.record import Record, RecordError
from datagen.shard_io import Sample, ShardError, decode_sample, file_sha256

DEFAULT_MANIFESTS_ROOT = "manifests"
ENTRY_KEYS = ("shard", "name", "tar", "sha256", "bytes", "seconds", "written", "skipped", "failed", "samples")
SAMPLE_KEYS = ("source_id", "key", "status", "reason")
STATUSES = ("written", "duplicate", "failed")
SHARD_DONE, SHARD_FAILED = "done", "failed"


class RunFolderError(ValueError):
    """A run folder, one of its manifest entries or a shard it names is missing or inconsistent."""


@dataclass
class ShardEntry:
    """One ``shards/subjects-NNNNN.json`` entry, checked for the fields the tools rely on."""

    path: Path  # the entry file
    shard: int
    name: str
    status: str  # "done" (tar written) or "failed" (no tar)
    error: str | None
    attempts: int | None
    tar: Path
    sha256: str | None
    bytes: int
    seconds: float
    written: int
    skipped: int
    failed: int
    samples: list[dict]


def resolve_run_dir(run: str | Path, manifests_root: str | Path = DEFAULT_MANIFESTS_ROOT) -> Path:
    """``run`` is a run folder path, or a run name under ``manifests_root``."""
    candidates = [Path(run)]
    if not Path(run).is_absolute():
        candidates.append(Path(manifests_root) / str(run))
    for c in candidates:
        if c.is_dir() and ((c / "run.json").is_file() or (c / "shards").is_dir()):
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise RunFolderError(
        f"run {str(run)!r} not found: looked for a folder with run.json or shards/ at {looked}"
    )


def load_run_manifest(run_dir: Path) -> dict:
    """``run.json`` as a dict, or ``{}`` when the run has not written one."""
    path = Path(run_dir) / "run.json"
    return read_json_object(path) if path.is_file() else {}


def read_json_object(path: Path) -> dict:
    """A manifest file's JSON object; :class:`RunFolderError` naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def load_shard_entries(run_dir: Path, shards_dir: str | Path | None = None) -> list[ShardEntry]:
    """Every finished shard's entry, sorted by shard index.

    ``shards_dir``: look for the tars there (by file name) instead of at the paths the entries
    record, e.g. when the shards were moved after the run.
    """
    folder = Path(run_dir) / "shards"
    entries = []
    for path in sorted(folder.glob("subjects-*.json")):
        d = read_json_object(path)
        missing = [k for k in ENTRY_KEYS if k not in d]
        if missing:
            raise RunFolderError(f"{path}: shard entry lacks field(s) {missing}")
        if not isinstance(d["samples"], list):
            raise RunFolderError(f"{path}: field 'samples' must be a list")
        for i, s in enumerate(d["samples"]):
            lack = [k for k in SAMPLE_KEYS if k not in s] if isinstance(s, dict) else list(SAMPLE_KEYS)
            if lack:
                raise RunFolderError(f"{path}: samples[{i}] lacks field(s) {lack}")
            if s["status"] not in STATUSES:
                raise RunFolderError(f"{path}: samples[{i}].status is {s['status']!r}, expected one of {STATUSES}")
        counts = {st: sum(1 for s in d["samples"] if s["status"] == st) for st in STATUSES}
        if (counts["written"], counts["duplicate"], counts["failed"]) != (d["written"], d["skipped"], d["failed"]):
            raise RunFolderError(
                f"{path}: counts written/skipped/failed = {d['written']}/{d['skipped']}/{d['failed']} "
                f"disagree with its samples list ({counts['written']}/{counts['duplicate']}/{counts['failed']})"
            )
        status = d.get("status", SHARD_DONE)
        if status not in (SHARD_DONE, SHARD_FAILED):
            raise RunFolderError(f"{path}: status is {status!r}, expected {SHARD_DONE!r} or {SHARD_FAILED!r}")
        if status == SHARD_FAILED and counts["written"]:
            raise RunFolderError(f"{path}: a failed shard cannot list written samples ({counts['written']} listed)")
        tar = Path(d["tar"])
        if shards_dir is not None:
            tar = Path(shards_dir) / tar.name
        entries.append(
            ShardEntry(
                path=path, shard=int(d["shard"]), name=str(d["name"]), status=status, error=d.get("error"),
                attempts=d.get("attempts"), tar=tar, sha256=d["sha256"],
                bytes=int(d["bytes"]), seconds=float(d["seconds"]), written=int(d["written"]),
                skipped=int(d["skipped"]), failed=int(d["failed"]), samples=list(d["samples"]),
            )
        )
    entries.sort(key=lambda e: e.shard)
    return entries


def check_tar(entry: ShardEntry, verify_sha256: bool = False) -> None:
    """The entry's tar exists and has the recorded size (and sha256, when asked); failed shards have none."""
    if entry.status == SHARD_FAILED:
        return
    if not entry.tar.is_file():
        raise RunFolderError(f"{entry.path.name}: its shard {entry.tar} does not exist")
    size = entry.tar.stat().st_size
    if size != entry.bytes:
        raise RunFolderError(f"{entry.path.name}: {entry.tar} is {size} bytes, the entry says {entry.bytes}")
    if verify_sha256:
        digest = file_sha256(entry.tar)
        if digest != entry.sha256:
            raise RunFolderError(f"{entry.path.name}: sha256 of {entry.tar} is {digest}, the entry says {entry.sha256}")


def iter_shard_records(tar_path: Path) -> Iterator[Record]:
    """The records of one shard (its ``.json`` members only), validated, in written order."""
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                data = tar.extractfile(member).read()
                try:
                    yield Record.from_json(data)
                except RecordError as e:
                    raise ShardError(f"{tar_path.name}: member {member.name}: {e}") from e
    except tarfile.TarError as e:
        raise ShardError(f"{tar_path}: not a readable tar: {e}") from e


def read_samples(tar_path: Path, keys: Iterable[str]) -> dict[str, Sample]:
    """Decode only the samples with the given keys from one shard (by member name)."""
    return dict(iter_samples(tar_path, keys))


def iter_samples(tar_path: Path, keys: Iterable[str]) -> Iterator[tuple[str, Sample]]:
    """Yield ``(key, sample)`` for the given keys in shard order, decoding one sample at a time."""
    wanted = set(keys)
    pending: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key not in wanted or ext not in ("jpg", "seg.png", "json"):
                    continue
                m = pending.setdefault(key, {})
                m[ext] = tar.extractfile(member).read()
                if len(m) == 3:
                    yield key, decode_sample(tar_path.name, key, pending.pop(key))
                    wanted.discard(key)
    except tarfile.TarError as e:
        raise ShardError(f"{tar_path}: not a readable tar: {e}") from e
    for key in sorted(wanted):
        have = sorted(pending.get(key, {}))
        raise ShardError(f"{tar_path.name}: sample {key} not found (members present: {have or 'none'})")


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
