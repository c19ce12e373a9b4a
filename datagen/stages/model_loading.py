"""Where a model comes from, and the device and dtype it runs in.

Every stage names its model in the profile as either a **local folder** (what ``subject-ffhq
tiny-models DIR`` writes, or a checkpoint you placed yourself) or a **Hugging Face hub id** (what
the ``paper`` profile uses). :func:`resolve_model` turns that reference into something
``from_pretrained`` loads, so a hub id and a tiny folder share one loading path:

* an existing folder is used as is;
* a reference that is plainly a path (absolute, ``./``, ``../``, ``~``, or more than one ``/``)
  but does not exist fails at once — it is never sent to the hub as an id;
* a hub id, when the hub is switched off (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``), is
  looked up in the local HF cache (no network): the snapshot ``refs/main`` points at must hold what
  the loader reads (:func:`loadable_problem`: a config, the weights whole — one file, or an index and
  every shard it names —, the processor/tokenizer files the repo has, or a pipeline's parts). A cache
  filled by ``from_pretrained`` holds exactly that and no more (``snapshot_download`` with
  ``local_files_only=True`` refuses it, since the repo's file list names files it never fetched), so
  this is what is checked; if the model is not there or incomplete, :class:`ModelNotFoundError` is
  raised at once, naming what is missing, instead of a long wait on an unreachable hub. Online, the
  id is returned unchanged for ``from_pretrained`` to read from the cache or download.

``local-dir:PATH`` (OpenCLIP's spelling of a local model folder) is accepted: the folder is checked
and the reference comes back unchanged, prefix included, for ``open_clip`` to load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LOCAL_DIR_PREFIX = "local-dir:"
# A model folder holding this file has random weights (the tiny and paper-size models the project
# builds for tests and benchmarks); whatever it produces says so.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"
_TRUE = {"1", "ON", "YES", "TRUE"}
# torch is imported only where a device or dtype is picked: checking that a model is there
# (the driver does it before Ray starts) must not pay for importing torch.
_DTYPES = {
    "fp32": "float32", "float32": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}


class ModelNotFoundError(FileNotFoundError):
    """A model named in the profile is not available. The message says which model, where it was
    looked for, and how to get it."""


def has_random_weights(ref: str | Path | None) -> bool:
    """True when ``ref`` (a folder, ``local-dir:FOLDER``, or a file in one) is marked as holding random weights."""
    if not ref:
        return False
    text = str(ref)
    text = text[len(LOCAL_DIR_PREFIX):] if text.startswith(LOCAL_DIR_PREFIX) else text
    path = Path(text).expanduser()
    return any((folder / RANDOM_WEIGHTS_MARKER).is_file() for folder in (path, *path.parents[:2]))


def hub_offline() -> bool:
    """Whether the hub is switched off (read from the environment now, not at import time)."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hf_cache_dir() -> Path:
    """The HF hub cache folder, resolved from the environment now (same rules as huggingface_hub)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(env["HF_HUB_CACHE"])).expanduser()
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expandvars(env["HUGGINGFACE_HUB_CACHE"])).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def looks_like_path(ref: str) -> bool:
    """True when ``ref`` can only be a filesystem path, never a hub id (``name`` or ``org/name``)."""
    return (
        os.path.isabs(ref)
        or ref.startswith(("./", "../", "~", ".\\"))
        or ref in (".", "..")
        or "\\" in ref
        or ref.count("/") > 1
    )


def resolve_model(ref: str, what: str, parts: tuple[str, ...] = (), weights_only: bool = False) -> str:
    """Return a local folder or hub id for ``from_pretrained``; raise :class:`ModelNotFoundError`.

    ``what`` names the model's role in messages, e.g. ``"captioner (BLIP-2)"``. ``parts``: the
    sub-folders a pipeline's loader reads (Stable Diffusion's ``unet``, ``vae``, ...), checked instead
    of the root; ``weights_only``: only weights are read from the repo (OpenCLIP by tag).
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ModelNotFoundError(f"{what}: no model given (got {ref!r}); set it in the profile")
    if ref.startswith(LOCAL_DIR_PREFIX):
        _require_folder(Path(ref[len(LOCAL_DIR_PREFIX):]).expanduser(), ref, what)
        return ref
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path)
    if looks_like_path(ref) or path.exists():
        _require_folder(path, ref, what)
    return _resolve_hub_id(ref, what, parts, weights_only)


def _require_folder(path: Path, ref: str, what: str) -> None:
    if path.is_dir():
        return
    state = "is a file, not a model folder" if path.exists() else "does not exist"
    raise ModelNotFoundError(
        f"{what}: model {ref!r} not found: the folder {path.resolve()} {state}.\n"
        f"How to get it: for the tiny profile build the tiny models with "
        f"`subject-ffhq tiny-models DIR` and `export SUBJECT_FFHQ_TINY_MODELS=DIR`; otherwise point the "
        f"profile at a folder saved with save_pretrained, or at a hub id."
    )


# Files a processor or tokenizer reads, when the repo has them (from_pretrained fetches them all).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json", "tokenizer.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
CONFIG_FILES = ("config.json", "open_clip_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_problem(folder: Path) -> str | None:
    """Why ``folder`` lacks whole weights (one unsharded file, or an index with every shard), or None."""
    files = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()] if folder.is_dir() else []
    if any("-of-" not in p.name for p in files):
        return None
    missing: list[str] = []
    for index in sorted(folder.glob("*.index.json"), key=lambda p: ".safetensors" not in p.name):
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            return f"the weights index {index.name} cannot be read ({e})"
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if not missing:
            return None
        return f"the weights index {index.name} names shard(s) not there: {', '.join(missing[:3])}"
    return f"no weights file (*.safetensors or *.bin) in {folder.name}/"


def part_problem(folder: Path, part: str) -> str | None:
    """Why the pipeline part ``folder / part`` cannot load, or None."""
    sub = folder / part
    if not sub.is_dir():
        return f"no {part}/ folder"
    if (sub / "scheduler_config.json").is_file() or any((sub / n).is_file() for n in PROCESSOR_FILES):
        return None
    if not (sub / "config.json").is_file():
        return f"no config.json in {part}/"
    return weights_problem(sub)


def loadable_problem(folder: Path, parts: tuple[str, ...] = (), weights_only: bool = False,
                     listed: set[str] | None = None) -> str | None:
    """Why ``from_pretrained`` could not load the model in ``folder``, or None. ``listed``: the repo's
    files (the hub cache's listing of the revision), when known: its processor/tokenizer files must be there."""
    if parts:
        return next((p for p in (part_problem(folder, part) for part in parts) if p), None)
    if not weights_only and not any((folder / n).is_file() for n in CONFIG_FILES):
        return "no config.json"
    problem = weights_problem(folder)
    if problem or weights_only:
        return problem
    absent = sorted(n for n in PROCESSOR_FILES if n in (listed or ()) and not (folder / n).is_file())
    if absent:
        return f"the processor/tokenizer file(s) {', '.join(absent)} the repo has are not there"
    return None


def cached_snapshot(repo_id: str, cache: Path) -> tuple[Path | None, set[str] | None]:
    """The snapshot folder ``refs/main`` names in the HF cache (else the newest one), and the repo's
    file list that the cache recorded for it (None when it recorded none)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
    else:
        found = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if repo.is_dir() else []
        snapshot = found[-1] if found else repo / "snapshots" / "none"
    if not snapshot.is_dir():
        return None, None
    try:  # huggingface_hub's record of the revision's files (trees/<commit>.json); optional
        listed = set(json.loads((repo / "trees" / f"{snapshot.name}.json").read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    return snapshot, listed


def _resolve_hub_id(repo_id: str, what: str, parts: tuple[str, ...] = (), weights_only: bool = False) -> str:
    if not hub_offline():
        return repo_id  # from_pretrained reads the cache or downloads what is missing
    cache = hf_cache_dir()
    snapshot, listed = cached_snapshot(repo_id, cache)
    problem = (loadable_problem(snapshot, parts, weights_only, listed) if snapshot is not None
               else "not in the Hugging Face cache")
    if problem:
        state = (f"is in the Hugging Face cache ({snapshot}) but incomplete: {problem}" if snapshot is not None
                 else "is not in the Hugging Face cache")
        raise ModelNotFoundError(
            f"{what}: model {repo_id!r} {state}, and the hub is switched off (HF_HUB_OFFLINE=1).\n"
            f"Looked in: {cache} (HF cache; set HF_HUB_CACHE or HF_HOME to use another), and for a local "
            f"folder named {repo_id!r} (none).\n"
            f"How to get it: run once with hub access (unset HF_HUB_OFFLINE) so the weights are downloaded "
            f"into the cache, e.g. `huggingface-cli download {repo_id}`, or copy a cache holding it; for an "
            f"offline run use the tiny profile (`subject-ffhq tiny-models DIR`, "
            f"`export SUBJECT_FFHQ_TINY_MODELS=DIR`, `--profile tiny`)."
        )
    return str(snapshot)


def pick_device(device: str | None = None) -> str:
    """``device`` if given, else ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, spec: str | None = "auto") -> torch.dtype:
    """The dtype for weights and activations.

    ``auto``: bf16 on a GPU that supports it, else fp16 on GPU; fp32 on CPU (and other devices).
    ``fp32``/``fp16``/``bf16`` (or the torch names) force a dtype.
    """
    import torch

    spec = (spec or "auto").lower()
    if spec == "auto":
        if str(device).startswith("cuda") and torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if spec not in _DTYPES:
        raise ValueError(f"dtype {spec!r} not understood; use auto, fp32, fp16 or bf16")
    return getattr(torch, _DTYPES[spec])


def load_pretrained(ref: str, what: str, processor_class, model_class, device: str, dtype: str | None = "auto"):
    """``(processor, model, dtype)`` of the transformers model ``ref`` names (a folder or hub id,
    through :func:`resolve_model`), in eval mode on ``device`` in the dtype :func:`pick_dtype` picks;
    a model that cannot be read raises :class:`ModelNotFoundError` naming ``what`` and where it looked."""
    torch_dtype = pick_dtype(device, dtype)
    path = resolve_model(ref, what)
    try:
        processor = processor_class.from_pretrained(path)
        model = model_class.from_pretrained(path, dtype=torch_dtype)
    except OSError as e:
        raise ModelNotFoundError(f"{what}: cannot load model {ref!r} from {path}: {e}") from e
    model.to(device).eval()
    return processor, model, torch_dtype
