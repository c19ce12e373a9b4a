"""The trainer's configuration: one dataclass, defaults from FastComposer's reference run (DESIGN §6).

The model references (``pretrained``: a Stable Diffusion folder or hub id with ``unet/ vae/
text_encoder/ tokenizer/ scheduler/``; ``image_encoder``: a CLIP vision folder or hub id) come from
the profile's ``trainer`` section, which may also set any other field below (e.g. a smaller
``resolution`` for the tiny profile). Command-line values override both.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Cross-attention of SD1.5's down blocks 1-2, mid block and up blocks 1-2 (FastComposer's
# `localization_layers=5`: the middle five of the seven cross-attention stages).
DEFAULT_LOCALIZATION_LAYERS = ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2")
MIXED_PRECISION = ("auto", "fp32", "bf16")
BAD_SAMPLE_POLICIES = ("raise", "warn")


class ConfigError(ValueError):
    """A trainer setting is invalid; the message names the setting."""


@dataclass
class TrainConfig:
    shards: list[str]  # shard tar paths (already expanded; see expand_shards)
    out: str  # run folder: checkpoints and logs
    pretrained: str  # Stable Diffusion folder / hub id (unet, vae, text_encoder, tokenizer, scheduler)
    image_encoder: str  # CLIPVisionModelWithProjection folder / hub id (+ its image processor config)

    # optimisation (reference run: lr 1e-5 constant, AdamW wd 1e-2, clip 1.0, batch 8 GPUs x 16)
    steps: int = 150_000
    batch_size: int = 16  # per worker
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    seed: int = 0

    # data (DESIGN §6 sampling policy)
    resolution: int = 512
    max_subjects: int = 4
    object_types: tuple[str, ...] = ("person",)
    uncond_prob: float = 0.1
    text_only_prob: float = 0.1
    subject_keep_prob: float = 0.9
    augment_subjects: bool = True
    split: str | None = "train"  # train only on records of this split; None: every record
    loader_workers: int = 4  # DataLoader processes per training worker
    shuffle_buffer: int = 256  # samples
    bad_samples: str = "raise"  # raise: stop on an unreadable sample; warn: log it (shard, key, why) and skip

    # losses
    localization_weight: float = 1e-3
    localization_layers: tuple[str, ...] = DEFAULT_LOCALIZATION_LAYERS
    object_region_prob: float = 0.5  # batches whose denoising MSE is taken inside the subject masks only
    image_encoder_trainable_blocks: int = 2

    # checkpoints and logs
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 1

    # Ray Train
    num_workers: int = 1
    use_gpu: bool = False
    max_failures: int = 3
    run_name: str = "fastcomposer"

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes stored with checkpoints

    def __post_init__(self) -> None:
        self.shards = [str(s) for s in self.shards]
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
        if not self.object_types:
            fail("object_types", "must name at least one COCO label (e.g. person)")
        if not self.shards:
            fail("shards", "is empty: give at least one shard tar")
        for name in ("pretrained", "image_encoder", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(name, f"must be a non-empty string, got {getattr(self, name)!r}")
        return self

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
        """Build from a loaded profile's ``trainer`` section; ``overrides`` (not None) win."""
        section = dict(profile.get("trainer") or {})
        for required in ("pretrained", "image_encoder"):
            if not section.get(required):
                raise ConfigError(
                    f"profile {profile.get('name', '?')!r}: section 'trainer' lacks '{required}' "
                    "(a model folder or hub id)"
                )
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
