"""The trainer's configuration: one dataclass, defaults from FastComposer's reference run (DESIGN §6).

The model references (``pretrained``: a Stable Diffusion folder or hub id with ``unet/ vae/
text_encoder/ tokenizer/ scheduler/``; ``image_encoder``: a CLIP vision folder or hub id) come from
the profile's ``trainer`` section, which may also set any other field below (e.g. a smaller
``resolution`` for the tiny profile) except ``object_types``: that one comes from the profile's
``subjects`` section, the one setting the trainer, the export and the report share
(:class:`datagen.config.SubjectsSettings`). Command-line values override both.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.config import DEFAULT_OBJECT_TYPES, object_types_problem

# Cross-attention of SD1.5's down blocks 1-2, mid block and up blocks 1-2 (FastComposer's
# `localization_layers=5`: the middle five of the seven cross-attention stages).
DEFAULT_LOCALIZATION_LAYERS = ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2")
MIXED_PRECISION = ("auto", "fp32", "bf16")
BAD_SAMPLE_POLICIES = ("raise", "warn")
# The two training recipes (docs/training.md): what each sets unless the setting is given itself.
RECIPES = {
    "paper": {"text_only_prob": 0.1},  # the paper's text: 10% of examples text-only
    "released": {"text_only_prob": 0.0},  # the released run_training.sh never passes --text_only_prob
}
SEGMENT_MAP_RESIZES = ("nearest", "upstream")
AUGMENT_PLACES = ("auto", "loader", "device")


def setting(default: Any, help: str, *, cli: bool = False, option: str | None = None, choices=None, **kw: Any) -> Any:
    """A TrainConfig field with its help text; ``cli=True`` makes it a ``train`` option
    (``--field-name`` or ``--option``), see :mod:`training.train_command`."""
    metadata = {"help": help, "cli": cli, "option": option, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


class ConfigError(ValueError):
    """A trainer setting is invalid; the message names the setting."""


@dataclass
class TrainConfig:
    shards: list[str]  # shard tar paths (already expanded; see expand_shards)
    out: str  # run folder: checkpoints and logs
    pretrained: str  # Stable Diffusion folder / hub id (unet, vae, text_encoder, tokenizer, scheduler)
    image_encoder: str  # CLIPVisionModelWithProjection folder / hub id (+ its image processor config)

    # optimisation (reference run: lr 1e-5 constant, AdamW wd 1e-2, clip 1.0, batch 8 GPUs x 16)
    steps: int = setting(150_000, "train until this optimizer step", cli=True)
    batch_size: int = setting(16, "examples per worker per micro-batch", cli=True)
    grad_accum: int = setting(1, "micro-batches per optimizer step", cli=True)
    lr: float = setting(1e-5, "learning rate, constant", cli=True)
    weight_decay: float = setting(1e-2, "AdamW weight decay")
    adam_beta1: float = setting(0.9, "AdamW beta1")
    adam_beta2: float = setting(0.999, "AdamW beta2")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    max_grad_norm: float = setting(1.0, "gradient norm clip")
    mixed_precision: str = setting("auto", "auto: bf16 autocast on GPU, fp32 on CPU", cli=True, choices=MIXED_PRECISION)
    gradient_checkpointing: bool = setting(False, "trade compute for U-Net memory", cli=True)
    seed: int = setting(0, "random seed", cli=True)

    # data (DESIGN §6 sampling policy)
    recipe: str = setting("paper", "paper: 10% text-only examples, as the paper says; released: none, as the "
                          "released training script ran", cli=True, choices=tuple(RECIPES))
    resolution: int = setting(512, "training image size in pixels", cli=True)
    max_subjects: int = setting(4, "subjects per example at most", cli=True)
    object_types: tuple[str, ...] = setting(
        DEFAULT_OBJECT_TYPES, "comma-separated COCO labels whose matched segments can be subjects, e.g. person,dog,cat "
        "(the profile's subjects.object_types)", cli=True)
    uncond_prob: float = setting(0.1, "share of examples with empty caption and no subjects")
    text_only_prob: float | None = setting(None, "share of text-only examples (default: the recipe's)")
    subject_keep_prob: float = setting(0.9, "each subject kept with this probability")
    augment_subjects: bool = setting(True, "augment subject crops (zoom-in, rotation, colour, blur, ...)")
    augment_subjects_on: str = setting(
        "auto", "where subject crops are augmented: loader workers, or the training device after collate "
        "(auto: device on GPU, loader on CPU)", cli=True, choices=AUGMENT_PLACES)
    drop_cropped_subjects: bool = setting(
        True, "a subject whose segment the square target crop cut away entirely does not condition "
        "(upstream keeps it, with an empty mask)")
    segment_map_resize: str = setting(
        "nearest", "nearest: every resize of the segment map samples the nearest pixel centre; upstream: "
        "torchvision NEAREST, then bilinear with the image for portrait images, as released",
        choices=SEGMENT_MAP_RESIZES)
    split: str | None = setting("train", "train only on records of this split; None: every record")
    loader_workers: int = setting(4, "DataLoader processes per worker", cli=True)
    shuffle_buffer: int = setting(256, "samples in the shuffle buffer")
    bad_samples: str = setting("raise", "raise: stop on an unreadable sample; warn: log it (shard, key, why) "
                               "and skip", choices=BAD_SAMPLE_POLICIES)

    # losses
    localization_weight: float = setting(1e-3, "weight of the localization loss", cli=True)
    localization_layers: tuple[str, ...] = setting(DEFAULT_LOCALIZATION_LAYERS, "U-Net blocks whose cross-attention is hooked")
    object_region_prob: float = setting(0.5, "share of batches whose denoising MSE is masked to the subjects")
    image_encoder_trainable_blocks: int = setting(2, "last vision-encoder blocks that train")

    # checkpoints and logs
    checkpoint_every: int = setting(1000, "steps between checkpoints", cli=True)
    keep_checkpoints: int = setting(3, "checkpoints kept", cli=True)
    log_every: int = setting(1, "steps between log lines", cli=True)

    # Ray Train
    num_workers: int = setting(1, "Ray Train workers (one per GPU with --gpu)", cli=True, option="workers")
    use_gpu: bool = setting(False, "one GPU per worker, NCCL, bf16 autocast", cli=True, option="gpu")
    max_failures: int = setting(3, "worker-group restarts from the last checkpoint", cli=True)
    run_name: str = setting("fastcomposer", "Ray Train run name under OUT", cli=True)

    extra: dict[str, Any] = setting({}, "free-form notes stored with checkpoints")

    def __post_init__(self) -> None:
        if self.recipe in RECIPES:
            for name, value in RECIPES[self.recipe].items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        self.shards = [str(s) for s in self.shards]
        if isinstance(self.object_types, list):
            self.object_types = tuple(self.object_types)
        self.localization_layers = tuple(self.localization_layers)
        self.validate()

    def validate(self) -> TrainConfig:
        def fail(name: str, problem: str) -> None:
            raise ConfigError(f"trainer setting '{name}' {problem}")

        for name in ("steps", "batch_size", "grad_accum", "resolution", "max_subjects", "checkpoint_every",
                     "keep_checkpoints", "log_every", "num_workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(name, f"must be a positive integer, got {v!r}")
        if self.resolution % 8:
            fail("resolution", f"must be a multiple of 8 (the VAE downsamples x8), got {self.resolution}")
        for name in ("loader_workers", "shuffle_buffer", "max_failures", "image_encoder_trainable_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (-1 if name == "max_failures" else 0):
                fail(name, f"must be a non-negative integer, got {v!r}")
        if self.recipe not in RECIPES:
            fail("recipe", f"must be one of {tuple(RECIPES)}, got {self.recipe!r}")
        for name, options in (("segment_map_resize", SEGMENT_MAP_RESIZES), ("augment_subjects_on", AUGMENT_PLACES)):
            if getattr(self, name) not in options:
                fail(name, f"must be one of {options}, got {getattr(self, name)!r}")
        for name in ("uncond_prob", "text_only_prob", "subject_keep_prob", "object_region_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                fail(name, f"must be a probability in [0, 1], got {v!r}")
        if self.uncond_prob + self.text_only_prob > 1.0:
            fail("text_only_prob", f"plus uncond_prob must not exceed 1 (got {self.uncond_prob} + {self.text_only_prob})")
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                fail(name, f"must be positive, got {getattr(self, name)!r}")
        if self.weight_decay < 0 or self.localization_weight < 0:
            fail("weight_decay/localization_weight", "must not be negative")
        if self.mixed_precision not in MIXED_PRECISION:
            fail("mixed_precision", f"must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.bad_samples not in BAD_SAMPLE_POLICIES:
            fail("bad_samples", f"must be one of {BAD_SAMPLE_POLICIES}, got {self.bad_samples!r}")
        problem = object_types_problem(self.object_types)
        if problem:
            fail("object_types", problem)
        if not self.shards:
            fail("shards", "is empty: give at least one shard tar")
        for name in ("pretrained", "image_encoder", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(name, f"must be a non-empty string, got {getattr(self, name)!r}")
        return self

    def subject_augmentation_place(self, device_type: str) -> str | None:
        """Where subject crops are augmented when training on ``device_type``: ``"loader"``,
        ``"device"`` (after collate, in the training step) or None (not augmented)."""
        if not self.augment_subjects:
            return None
        if self.augment_subjects_on == "auto":
            return "device" if device_type == "cuda" else "loader"
        return self.augment_subjects_on

    # ---- conversions --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["object_types"] = list(self.object_types)
        d["localization_layers"] = list(self.localization_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown trainer setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_profile(cls, profile: dict[str, Any], **overrides: Any) -> TrainConfig:
        """Build from a loaded profile's ``trainer`` section and its ``subjects.object_types``;
        ``overrides`` (not None) win."""
        section = dict(profile.get("trainer") or {})
        name = profile.get("name", "?")
        for required in ("pretrained", "image_encoder"):
            if not section.get(required):
                raise ConfigError(
                    f"profile {name!r}: section 'trainer' lacks '{required}' (a model folder or hub id)"
                )
        if "object_types" in section:
            raise ConfigError(
                f"profile {name!r}: 'trainer.object_types' is not a trainer setting; set the object types once, "
                "under 'subjects: {object_types: [...]}', which the trainer, the export and the report share"
            )
        subjects = profile.get("subjects") or {}
        if subjects.get("object_types"):
            section["object_types"] = tuple(subjects["object_types"])
        values = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict(values)


def expand_shards(patterns: list[str] | str) -> list[str]:
    """Expand shard globs (and plain paths) into a sorted, de-duplicated list of existing tar files.

    Raises :class:`ConfigError` naming every pattern that matched nothing.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    found: list[str] = []
    empty: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            empty.append(pattern)
        found.extend(str(Path(m).resolve()) for m in matches)
    if empty:
        raise ConfigError(f"--shards: no shard file matches {empty} (give a glob such as 'out/shards/subjects-*.tar')")
    return sorted(set(found))
