"""Where a model comes from, and the device and dtype it runs in.

Every stage names its model in the profile as either a **local folder** (what ``subject-ffhq
tiny-models DIR`` writes, or a checkpoint you placed yourself) or a **Hugging Face hub id** (what
the ``paper`` profile uses). :func:`resolve_model` turns that reference into something
``from_pretrained`` loads, so a hub id and a tiny folder share one loading path:

* an existing folder is used as is;
* a reference that is plainly a path (absolute, ``./``, ``../``, ``~``, or more than one ``/``)
  but does not exist fails at once — it is never sent to the hub as an id;
* a hub id, when the hub is switched off (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``), is
  looked up in the local HF cache with ``local_files_only=True`` (no network): if cached, the
  snapshot folder is returned; if not, :class:`ModelNotFoundError` is raised at once instead of a
  long wait on an unreachable hub. Online, the id is returned unchanged for
  ``from_pretrained`` to read from the cache or download.

``local-dir:PATH`` (OpenCLIP's spelling of a local model folder) is accepted: the folder is checked
and the reference comes back unchanged, prefix included, for ``open_clip`` to load.
"""

from __future__ import annotations

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


def resolve_model(ref: str, what: str) -> str:
    """Return a local folder or hub id for ``from_pretrained``; raise :class:`ModelNotFoundError`.

    ``what`` names the model's role in messages, e.g. ``"captioner (BLIP-2)"``.
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
    return _resolve_hub_id(ref, what)


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


def _resolve_hub_id(repo_id: str, what: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not hub_offline():
        return repo_id  # from_pretrained reads the cache or downloads what is missing
    cache = hf_cache_dir()
    try:
        # local_files_only: reads the cache only, never the network.
        return snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"{what}: model {repo_id!r} is not in the Hugging Face cache and the hub is switched off "
            f"(HF_HUB_OFFLINE=1).\n"
            f"Looked in: {cache} (HF cache; set HF_HUB_CACHE or HF_HOME to use another), and for a local "
            f"folder named {repo_id!r} (none).\n"
            f"How to get it: run once with hub access (unset HF_HUB_OFFLINE) so the weights are downloaded "
            f"into the cache, e.g. `huggingface-cli download {repo_id}`, or copy a cache holding it; for an "
            f"offline run use the tiny profile (`subject-ffhq tiny-models DIR`, "
            f"`export SUBJECT_FFHQ_TINY_MODELS=DIR`, `--profile tiny`). ({type(e).__name__})"
        ) from None


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
