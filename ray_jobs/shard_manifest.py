"""Per-shard manifest entries: ``manifests/<run>/shards/subjects-NNNNN.json``.

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
import os
import time
from pathlib import Path
from typing import Any

from datagen.shard_plan import ShardSpec
from ray_jobs.shard_tasks import DUPLICATE, FAILED, WRITTEN, file_sha256

DONE = "done"
SHARD_FAILED = "failed"


class ManifestError(ValueError):
    """An existing entry cannot be reconciled with this run (other plan or configuration)."""


def entry_path(run_dir: Path, spec: ShardSpec) -> Path:
    return Path(run_dir) / "shards" / f"{spec.name}.json"


def done_entry(
    spec: ShardSpec, tar_path: Path, written: dict[str, Any], seconds: float, attempts: int, digest: str
) -> dict[str, Any]:
    """The entry of a finished shard, from :func:`ray_jobs.shard_tasks.write_shard_tar`'s result."""
    entry = _entry(spec, DONE, tar_path, written["sha256"], written["bytes"], seconds, written["samples"], attempts, None, digest)
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
        "tar": str(Path(tar_path).resolve()),
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
    if entry.get("status", DONE) != DONE:
        return False, f"failed last time: {entry.get('error')}"
    if not tar_path.is_file():
        return False, "tar missing"
    if tar_path.stat().st_size != entry.get("bytes"):
        return False, "tar size differs from the entry"
    if file_sha256(tar_path) != entry.get("sha256"):
        return False, "tar sha256 differs from the entry"
    return True, "done"


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write JSON through a temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _brief(ids: list) -> str:
    return str(ids) if len(ids) <= 6 else f"[{', '.join(map(str, ids[:3]))}, ..., {', '.join(map(str, ids[-2:]))}] ({len(ids)})"
