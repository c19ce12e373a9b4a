"""The per-shard manifest entry ``manifests/<run>/shards/subjects-NNNNN.json``: its schema, writing,
reading (for resume and for the tables) and the run's accounting over all entries.

An entry is written LAST, atomically, after its shard's tar is in place; its presence plus a tar
with the recorded size and sha256 is what "this shard is done" means, and what resume checks.

Entry format (one JSON object)::

    {"shard": 0, "name": "subjects-00000", "status": "done" | "failed",
     "tar": "<abs path>", "sha256": "...", "bytes": 123, "seconds": 4.2,
     "written": n, "skipped": n, "failed": n,            # skipped = duplicates
     "samples": [{"source_id": "12", "key": "00012", "rel_path": "...",
                  "status": "written" | "duplicate" | "failed", "reason": str | null}, ...],
     "attempts": 1, "error": null, "config_digest": "...", "finished_at": "2026-..Z",
     "cpu_seconds": {"load": s, "encode": s, "write": s}}   # CPU task time spent on the shard

``samples`` lists every source item of the shard, in plan order. A shard that kept failing gets
an entry with ``"status": "failed"``, the ``error``, ``"sha256": null``, ``"bytes": 0``, its
non-duplicate items ``failed`` with that error, and no tar (``tar`` is where it would have been);
a later run redoes it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen import storage
from datagen.files import file_sha256, write_json_atomic
from datagen.manifests.run_manifest import RunFolderError, read_json_object
from datagen.shards.plan import ShardSpec

# A shard entry's status, and each of its source items' status.
SHARD_DONE, SHARD_FAILED = "done", "failed"
WRITTEN, DUPLICATE, FAILED = "written", "duplicate", "failed"
SAMPLE_STATUSES = (WRITTEN, DUPLICATE, FAILED)
ENTRY_KEYS = ("shard", "name", "tar", "sha256", "bytes", "seconds", "written", "skipped", "failed", "samples")
SAMPLE_KEYS = ("source_id", "key", "status", "reason")


class AccountingError(RuntimeError):
    """Some source item is missing from the manifests, or recorded more than once."""


class ManifestError(ValueError):
    """An existing entry cannot be reconciled with this run (other plan or configuration)."""


def entry_path(run_dir: Path, spec: ShardSpec) -> Path:
    return storage.path(run_dir) / "shards" / f"{spec.name}.json"


def done_entry(
    spec: ShardSpec, tar_path: Path, written: dict[str, Any], seconds: float, attempts: int, digest: str
) -> dict[str, Any]:
    """The entry of a finished shard, from :func:`ray_jobs.tasks.write_shard_tar`'s result."""
    entry = _entry(spec, SHARD_DONE, tar_path, written["sha256"], written["bytes"], seconds, written["samples"], attempts, None, digest)
    entry["cpu_seconds"] = written.get("cpu_seconds")
    return entry


def failed_entry(spec: ShardSpec, tar_path: Path, error: str, seconds: float, attempts: int, digest: str) -> dict[str, Any]:
    """The entry of a shard that kept failing: every non-duplicate item failed with ``error``."""
    samples = []
    for item in spec.items:
        if item.duplicate_of is not None:
            status, reason = DUPLICATE, f"duplicate of source_id {item.duplicate_of} (same image)"
        else:
            status, reason = FAILED, f"shard failed after {attempts} attempt(s): {error}"
        samples.append(
            {"source_id": item.source_id, "key": item.key, "rel_path": item.rel_path, "status": status, "reason": reason}
        )
    return _entry(spec, SHARD_FAILED, tar_path, None, 0, seconds, samples, attempts, error, digest)


def _entry(spec, status, tar_path, sha256, nbytes, seconds, samples, attempts, error, digest) -> dict[str, Any]:
    counts = {s: sum(1 for x in samples if x["status"] == s) for s in (WRITTEN, DUPLICATE, FAILED)}
    return {
        "shard": spec.index,
        "name": spec.name,
        "status": status,
        "tar": storage.text(storage.path(tar_path)),
        "sha256": sha256,
        "bytes": int(nbytes),
        "seconds": round(float(seconds), 3),
        "written": counts[WRITTEN],
        "skipped": counts[DUPLICATE],
        "failed": counts[FAILED],
        "samples": samples,
        "attempts": attempts,
        "error": error,
        "config_digest": digest,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_entry(run_dir: Path, spec: ShardSpec, entry: dict[str, Any]) -> Path:
    return write_json_atomic(entry_path(run_dir, spec), entry)


def read_entry(run_dir: Path, spec: ShardSpec) -> dict[str, Any] | None:
    """The shard's entry, or ``None`` when there is none (or it is unreadable: then it is redone)."""
    path = entry_path(run_dir, spec)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def resume_state(entry: dict[str, Any] | None, spec: ShardSpec, tar_path: Path, digest: str) -> tuple[bool, str]:
    """``(done, why)``: whether the shard can be skipped, and why (not).

    Raises :class:`ManifestError` when the entry was written for other items (another shard size
    or source) or another configuration: redoing only some shards would mix two datasets."""
    if entry is None:
        return False, "no manifest entry"
    planned = [item.source_id for item in spec.items]
    recorded = [s.get("source_id") for s in entry.get("samples", []) if isinstance(s, dict)]
    if recorded != planned:
        raise ManifestError(
            f"{spec.name}: the manifest entry lists source ids {_brief(recorded)} but this run plans "
            f"{_brief(planned)} for it (another source, --limit or --shard-size?). Use another --run-name "
            "and --out, or delete the old run's manifests and shards."
        )
    if entry.get("config_digest") not in (None, digest):
        raise ManifestError(
            f"{spec.name}: finished under another configuration (digest {entry.get('config_digest')}, this run "
            f"{digest}); resuming would mix two configurations. Use another --run-name and --out, or delete "
            "the old run's manifests and shards."
        )
    if entry.get("status", SHARD_DONE) != SHARD_DONE:
        return False, f"failed last time: {entry.get('error')}"
    if not tar_path.is_file():
        return False, "tar missing"
    if tar_path.stat().st_size != entry.get("bytes"):
        return False, "tar size differs from the entry"
    # On a bucket the object is whole or absent (one PUT or one completed multipart upload) and
    # hashing it would download every finished shard again: its size stands for it there.
    if not storage.is_url(tar_path) and file_sha256(tar_path) != entry.get("sha256"):
        return False, "tar sha256 differs from the entry"
    return True, "done"


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


def load_shard_entries(run_dir: Path, shards_dir: str | Path | None = None) -> list[ShardEntry]:
    """Every finished shard's entry, sorted by shard index.

    ``shards_dir``: look for the tars there (by file name) instead of at the paths the entries
    record, e.g. when the shards were moved after the run.
    """
    folder = storage.path(run_dir) / "shards"
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
            if s["status"] not in SAMPLE_STATUSES:
                raise RunFolderError(f"{path}: samples[{i}].status is {s['status']!r}, expected one of {SAMPLE_STATUSES}")
        counts = {st: sum(1 for s in d["samples"] if s["status"] == st) for st in SAMPLE_STATUSES}
        if (counts[WRITTEN], counts[DUPLICATE], counts[FAILED]) != (d["written"], d["skipped"], d["failed"]):
            raise RunFolderError(
                f"{path}: counts written/skipped/failed = {d['written']}/{d['skipped']}/{d['failed']} "
                f"disagree with its samples list ({counts['written']}/{counts['duplicate']}/{counts['failed']})"
            )
        status = d.get("status", SHARD_DONE)
        if status not in (SHARD_DONE, SHARD_FAILED):
            raise RunFolderError(f"{path}: status is {status!r}, expected {SHARD_DONE!r} or {SHARD_FAILED!r}")
        if status == SHARD_FAILED and counts["written"]:
            raise RunFolderError(f"{path}: a failed shard cannot list written samples ({counts['written']} listed)")
        tar = storage.path(d["tar"])
        if shards_dir is not None:
            tar = storage.path(shards_dir) / tar.name
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


def account(plan: list[ShardSpec], entries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Counts over the planned shards' entries; raises :class:`AccountingError` when an item is
    recorded twice or an entry names an item the plan does not hold. Items of shards without an
    entry (an interrupted run) are counted as ``pending``."""
    planned = {item.source_id for spec in plan for item in spec.items}
    seen: Counter[str] = Counter()
    status: Counter[str] = Counter()
    shards: Counter[str] = Counter()
    pending = 0
    for spec in plan:
        entry = entries.get(spec.index)
        if entry is None:
            shards["pending"] += 1
            pending += len(spec.items)
            continue
        shards[entry.get("status", "done")] += 1
        for s in entry["samples"]:
            seen[s["source_id"]] += 1
            status[s["status"]] += 1
            if s["source_id"] not in planned:
                raise AccountingError(f"{entry['name']}: lists source_id {s['source_id']}, which the plan does not hold")
            if s["status"] == "failed" and not s.get("reason"):
                raise AccountingError(f"{entry['name']}: source_id {s['source_id']} failed without a reason")
    twice = sorted((sid for sid, n in seen.items() if n > 1), key=int)
    if twice:
        raise AccountingError(f"source item(s) recorded more than once: {twice[:20]}")
    if pending == 0 and set(seen) != planned:
        missing = sorted(planned - set(seen), key=int)
        raise AccountingError(f"source item(s) in no shard entry: {missing[:20]}")
    return {
        "items": len(planned),
        "written": status["written"],
        "duplicate": status["duplicate"],
        "failed": status["failed"],
        "pending": pending,
        "shards": {"planned": len(plan), "done": shards["done"], "failed": shards["failed"], "pending": shards["pending"]},
    }


def _brief(ids: list) -> str:
    return str(ids) if len(ids) <= 6 else f"[{', '.join(map(str, ids[:3]))}, ..., {', '.join(map(str, ids[-2:]))}] ({len(ids)})"
