"""Model profiles: which model (hub id or local folder) and settings each stage uses.

A profile is a YAML file. The built-in ones live in ``datagen/profiles/`` (``paper``, ``tiny``);
``--profile`` also takes a path to a YAML file of your own, and ``--config FILE`` overlays keys
onto the chosen profile (nested dicts are merged).

``{tiny}`` in a value is replaced by the tiny-models folder: ``$SUBJECT_FFHQ_TINY_MODELS`` if set,
else ``out/tiny-models`` under the current directory. ``{paper_shapes}`` likewise: the paper-size
random-weight models (``$SUBJECT_FFHQ_PAPER_SHAPES``, else ``out/paper-shapes``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

PROFILES_DIR = Path(__file__).parent / "profiles"
TINY_MODELS_ENV = "SUBJECT_FFHQ_TINY_MODELS"
PAPER_SHAPES_ENV = "SUBJECT_FFHQ_PAPER_SHAPES"
STAGES = ("captioner", "segmenter", "phrases", "matcher", "trainer")


class ProfileError(ValueError):
    pass


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def tiny_models_dir() -> Path:
    return Path(os.environ.get(TINY_MODELS_ENV) or Path.cwd() / "out" / "tiny-models").resolve()


def paper_shapes_dir() -> Path:
    return Path(os.environ.get(PAPER_SHAPES_ENV) or Path.cwd() / "out" / "paper-shapes").resolve()


def load_profile(name_or_path: str, overrides: dict[str, Any] | str | Path | None = None) -> dict[str, Any]:
    """Load a profile by built-in name or YAML path, apply overrides, expand ``{tiny}``."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(
            f"profile {name_or_path!r} not found: not a built-in profile ({', '.join(builtin_profiles())}) "
            f"and no YAML file at {path}"
        )
    profile = _read_yaml(path)
    if overrides is not None:
        if not isinstance(overrides, dict):
            overrides = _read_yaml(Path(overrides))
        profile = merge(profile, overrides)
    missing = [s for s in STAGES if s not in profile]
    if missing:
        raise ProfileError(f"profile {path} lacks the section(s) {missing}; every profile names {list(STAGES)}")
    profile.setdefault("name", path.stem)
    profile = expand_tiny(profile, tiny_models_dir())
    return _expand(profile, "{paper_shapes}", str(paper_shapes_dir()))


def _expand(obj: Any, placeholder: str, value: str) -> Any:
    if isinstance(obj, str):
        return obj.replace(placeholder, value)
    if isinstance(obj, dict):
        return {k: _expand(v, placeholder, value) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand(v, placeholder, value) for v in obj]
    return obj


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def expand_tiny(obj: Any, tiny_dir: Path) -> Any:
    if isinstance(obj, str):
        return obj.replace("{tiny}", str(tiny_dir))
    if isinstance(obj, dict):
        return {k: expand_tiny(v, tiny_dir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_tiny(v, tiny_dir) for v in obj]
    return obj


def model_ids(profile: dict[str, Any]) -> dict[str, str]:
    """The model ids a record carries, one per annotation stage."""
    m = profile["matcher"]
    clip = m["clip_model"] + (f":{m['clip_pretrained']}" if m.get("clip_pretrained") else "")
    return {
        "captioner": str(profile["captioner"]["model"]),
        "segmenter": str(profile["segmenter"]["model"]),
        "phrases": str(profile["phrases"]["spacy_model"]),
        "clip": clip,
        "sbert": str(m["sbert_model"]),
    }


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from e
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path} must be a YAML mapping, got {type(data).__name__}")
    return data
