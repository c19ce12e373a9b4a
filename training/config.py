"""The trainer's configuration: a run's :class:`TrainConfig`, the profile's trainer settings plus its inputs.

Every trainer setting, its default (FastComposer's reference run, DESIGN §6) and its bounds live
in one place: :class:`datagen.config.TrainerSettings`, the profile's ``trainer`` section, whose
model references (``pretrained``: a Stable Diffusion folder or hub id with ``unet/ vae/
text_encoder/ tokenizer/ scheduler/``; ``image_encoder``: a CLIP vision folder or hub id) a run
needs. :class:`TrainConfig` extends it with what a run adds: the shards, the run folder, and the
object types, which come from the profile's ``subjects`` section, the one setting the trainer, the
export and the report share (:class:`datagen.config.SubjectsSettings`). Command-line values
override the profile (``subject-ffhq train``, :mod:`cli.train`, whose options are
:data:`TRAIN_OPTIONS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from datagen import storage
from datagen.config import (
    DEFAULT_OBJECT_TYPES,
    BadValue,
    Profile,
    TrainerSettings,
    object_types_problem,
)

# The settings ``subject-ffhq train`` takes as options (``--field-name``, or the name given), with
# their help text; the others come from the profile (``trainer:``) or ``--config`` only.
TRAIN_OPTIONS: dict[str, tuple[str | None, str]] = {
    "steps": (None, "train until this optimizer step"),
    "batch_size": (None, "examples per worker per micro-batch"),
    "grad_accum": (None, "micro-batches per optimizer step"),
    "lr": (None, "learning rate, constant"),
    "mixed_precision": (None, "auto: bf16 autocast on a GPU that supports it, else fp16 autocast with a gradient "
                              "scaler; bf16 / fp16 ask for one (bf16 falls back to fp16 where unsupported); fp32: "
                              "neither; always fp32 on CPU"),
    "gradient_checkpointing": (None, "trade compute for U-Net memory"),
    "seed": (None, "random seed"),
    "recipe": (None, "paper: 10% text-only examples, as the paper says; released: none, as the released "
                     "training script ran"),
    "resolution": (None, "training image size in pixels"),
    "max_subjects": (None, "subjects per example at most"),
    "object_types": (None, "comma-separated COCO labels whose matched segments can be subjects, e.g. "
                           "person,dog,cat (the profile's subjects.object_types)"),
    "augment_subjects_on": (None, "where subject crops are augmented: loader workers, or the training device "
                                  "after collate (auto: device on GPU, loader on CPU)"),
    "loader_workers": (None, "DataLoader processes per worker"),
    "split_file": (None, "a run's identity-safe split (manifests/<run>/split.parquet, from `subject-ffhq "
                         "identities`): its split replaces each record's"),
    "reference": (None, "the image encoder's crop: same-image (the paper), cross-image (another photo of the "
                        "same identity, from --reference-set; its own when none) or mixed:P (cross-image for a share P)"),
    "reference_set": (None, "a run's reference set (manifests/<run>/references, or the run folder), from "
                            "`subject-ffhq identities`"),
    "localization_weight": (None, "weight of the localization loss"),
    "checkpoint_every": (None, "steps between checkpoints"),
    "keep_checkpoints": (None, "checkpoints kept"),
    "log_every": (None, "steps between log lines"),
    "num_workers": ("workers", "Ray Train workers (one per GPU with --gpu)"),
    "use_gpu": ("gpu", "one GPU per worker, NCCL, mixed precision as --mixed-precision says (bf16 autocast, "
                       "or fp16 with a gradient scaler where bf16 is unsupported)"),
    "max_failures": (None, "worker-group restarts from the last checkpoint"),
    "run_name": (None, "Ray Train run name under OUT"),
}


# The parts of a Stable Diffusion folder (or hub snapshot) the trainer loads: what the model check requires.
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ConfigError(ValueError):
    """A trainer setting is invalid; the message names the setting."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainerSettings):
    """A training run: the trainer settings (defaults and bounds from :class:`TrainerSettings`), the
    recipe applied (``text_only_prob`` not given = the recipe's), and the run's inputs."""

    shards: tuple[str, ...]  # shard tar paths (already expanded; see expand_shards)
    out: str  # run folder: checkpoints and logs
    pretrained: str  # a run needs both models
    image_encoder: str
    object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES  # the profile's subjects.object_types
    open_vocabulary: bool = False  # the profile's grounding labels phrases openly (sam3): any well-formed label

    def __post_init__(self) -> None:
        if isinstance(self.shards, list | tuple):
            object.__setattr__(self, "shards", tuple(str(s) for s in self.shards))
        try:
            super().__post_init__()
            for name, value in self.recipe_values().items():
                object.__setattr__(self, name, value)
            problem = object_types_problem(self.object_types, self.open_vocabulary)
            if problem:
                raise BadValue("object_types", problem)
            if not self.shards:
                raise BadValue("shards", "is empty: give at least one shard tar")
        except BadValue as e:
            raise ConfigError(f"trainer setting '{e.key}' {e.problem}") from None

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
        """Plain JSON values (tuples as lists): what checkpoints store and Ray Train workers get."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown trainer setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_profile(cls, profile: Profile, **overrides: Any) -> TrainConfig:
        """Build from a loaded profile's ``trainer`` section and its ``subjects.object_types``;
        ``overrides`` (not None) win."""
        for required in ("pretrained", "image_encoder"):
            if not getattr(profile.trainer, required):
                raise ConfigError(
                    f"profile {profile.name!r}: section 'trainer' lacks '{required}' (a model folder or hub id)"
                )
        values = {**dataclasses.asdict(profile.trainer), "object_types": profile.subjects.object_types,
                  "open_vocabulary": profile.grounding != "panoptic"}
        return cls.from_dict({**values, **{k: v for k, v in overrides.items() if v is not None}})


def expand_shards(patterns: list[str] | str) -> list[str]:
    """Expand shard globs (and plain paths, and URLs: ``s3://bucket/shards/*.tar``) into a sorted,
    de-duplicated list of existing tar files.

    Raises :class:`ConfigError` naming every pattern that matched nothing.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    found: list[str] = []
    empty: list[str] = []
    for pattern in patterns:
        matches = storage.glob(pattern)  # a local glob, or one over a bucket (URLs stay URLs)
        if not matches:
            empty.append(pattern)
        found.extend(matches)
    if empty:
        raise ConfigError(f"--shards: no shard file matches {empty} (give a glob such as 'out/shards/subjects-*.tar')")
    return sorted(set(found))
