"""The ``trainer:`` and ``evaluation:`` sections of a profile (part of :mod:`datagen.config`, which
re-exports them): every training and evaluation default, typed like the build's sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from datagen.sections import BadValue, ProfileError, Section, bounded, field_types

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
class TrainerSettings(Section):
    """The trainer (``subject-ffhq train``); defaults from FastComposer's reference run (DESIGN §6).
    :class:`training.config.TrainConfig` is these settings plus a run's inputs (shards, OUT, the
    object types); the command's options override them."""

    # models; only training needs them, so a build-only profile may leave them out
    pretrained: str | None = None  # Stable Diffusion folder / hub id (unet, vae, text_encoder, tokenizer, scheduler)
    image_encoder: str | None = None  # CLIPVisionModelWithProjection folder / hub id (+ its image processor config)

    # optimisation (reference run: lr 1e-5 constant, AdamW wd 1e-2, clip 1.0, batch 8 GPUs x 16)
    steps: int = bounded(150_000, minimum=1)  # train until this optimizer step
    batch_size: int = bounded(16, minimum=1)  # examples per worker per micro-batch
    grad_accum: int = bounded(1, minimum=1)  # micro-batches per optimizer step
    lr: float = bounded(1e-5, above=0)  # learning rate, constant
    weight_decay: float = bounded(1e-2, minimum=0)  # AdamW
    adam_beta1: float = bounded(0.9, **_PROBABILITY)
    adam_beta2: float = bounded(0.999, **_PROBABILITY)
    adam_eps: float = bounded(1e-8, minimum=0)
    max_grad_norm: float = bounded(1.0, above=0)  # gradient norm clip
    # auto: bf16 autocast on a GPU that supports it, else fp16 autocast with a gradient scaler; fp32 on CPU
    mixed_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False  # trade compute for U-Net memory
    seed: int = 0

    # data (DESIGN §6 sampling policy)
    recipe: Literal["paper", "released"] = "paper"  # what RECIPES sets where the setting is not given itself
    resolution: int = bounded(512, minimum=8)  # training image size in pixels, a multiple of 8
    max_subjects: int = bounded(4, minimum=1)  # subjects per example at most
    # Not a trainer setting: the object types are the profile's subjects.object_types, which the
    # trainer, the export and the report share. Refused here; a run (TrainConfig) types it and carries them.
    object_types: None = None
    uncond_prob: float = bounded(0.1, **_PROBABILITY)  # examples with empty caption and no subjects
    text_only_prob: float | None = bounded(None, **_PROBABILITY)  # text-only examples; None: the recipe's
    subject_keep_prob: float = bounded(0.9, **_PROBABILITY)  # each subject kept with this probability
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
    split_file: str | None = None  # a run's identity-safe split.parquet (subject-ffhq identities): replaces records' split
    # the crop fed to the image encoder: the target's own subject (the paper), another photo of the
    # same identity from the run's reference set (cross-image; the target's own when none), or
    # cross-image for a share P of the subjects (mixed:P). The localization loss keeps the target's mask.
    reference: str = "same-image"
    reference_set: str | None = None  # manifests/<run>/references (or the run folder): from `subject-ffhq identities`
    loader_workers: int = bounded(4, minimum=0)  # DataLoader processes per worker
    shuffle_buffer: int = bounded(256, minimum=0)  # samples in the shuffle buffer
    bad_samples: Literal["raise", "warn"] = "raise"  # warn: log an unreadable sample (shard, key, why), skip it

    # losses
    localization_weight: float = bounded(1e-3, minimum=0)
    localization_layers: tuple[str, ...] = DEFAULT_LOCALIZATION_LAYERS  # U-Net blocks whose cross-attention is hooked
    object_region_prob: float = bounded(0.5, **_PROBABILITY)  # batches whose denoising MSE is masked to the subjects
    image_encoder_trainable_blocks: int = bounded(2, minimum=0)  # last vision-encoder blocks that train

    # checkpoints and logs
    checkpoint_every: int = bounded(1000, minimum=1)  # steps between checkpoints
    keep_checkpoints: int = bounded(3, minimum=1)
    log_every: int = bounded(1, minimum=1)  # steps between log lines

    # Ray Train
    num_workers: int = bounded(1, minimum=1)  # Ray Train workers (one per GPU with use_gpu)
    use_gpu: bool = False  # one GPU per worker, NCCL, mixed_precision (bf16 autocast, or fp16 + GradScaler)
    max_failures: int = bounded(3, minimum=-1)  # worker-group restarts from the last checkpoint (-1: without limit)
    run_name: str = "fastcomposer"  # Ray Train run name under OUT

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes stored with checkpoints

    def __post_init__(self) -> None:
        if self.object_types is not None and field_types(type(self))["object_types"] is type(None):
            raise ProfileError(
                "'trainer.object_types' is not a trainer setting; set the object types once, under "
                "'subjects: {object_types: [...]}', which the trainer, the export and the report share"
            )
        super().__post_init__()
        if self.resolution % 8:
            raise BadValue("resolution", f"must be a multiple of 8 (the VAE downsamples x8), got {self.resolution}")
        share = reference_share(self.reference)
        if isinstance(share, str):
            raise BadValue("reference", share)
        if share > 0 and not self.reference_set:
            raise BadValue("reference_set", f"is needed with reference {self.reference!r}: the run's references/ "
                                            "folder (written by `subject-ffhq identities RUN`)")
        text_only = self.recipe_values().get("text_only_prob", self.text_only_prob)
        if self.uncond_prob + text_only > 1.0:
            raise BadValue("text_only_prob", f"plus uncond_prob must not exceed 1 (got {self.uncond_prob} + {text_only})")

    def recipe_values(self) -> dict[str, Any]:
        """The settings the recipe sets: those of ``RECIPES[recipe]`` that are not given themselves."""
        return {name: value for name, value in RECIPES[self.recipe].items() if getattr(self, name) is None}


def reference_share(mode: str) -> float | str:
    """The share of subjects given a cross-image crop under ``mode`` (``same-image`` 0,
    ``cross-image`` 1, ``mixed:P`` P), or what is wrong with ``mode``."""
    fixed = {"same-image": 0.0, "cross-image": 1.0}
    if mode in fixed:
        return fixed[mode]
    head, _, p = str(mode).partition(":")
    try:
        share = float(p) if head == "mixed" else None
    except ValueError:
        share = None
    if share is None or not 0.0 <= share <= 1.0:
        return f"must be same-image, cross-image or mixed:P with P in 0..1, got {mode!r}"
    return share


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings(Section):
    """``subject-ffhq evaluate`` (DESIGN §8): the face and CLIP models, and the protocol's defaults,
    which the command's options override."""

    # models; only the evaluation needs the embedder and CLIP, so a build-only profile may leave them out
    face_detector: str = "mtcnn"  # 'mtcnn' (the weights inside facenet-pytorch) or a folder of pnet/rnet/onet.pt
    face_embedder: str | None = None  # 'dlib' (offline, real weights), or FaceNet InceptionResnetV1: 'vggface2' or a folder
    clip_model: str | None = None  # prompt consistency: OpenCLIP architecture or 'local-dir:FOLDER'
    clip_pretrained: str | None = None  # the architecture's weights tag
    batch_size: int = bounded(64, minimum=1)  # face crops per FaceNet forward
    min_face_size: int = bounded(20, minimum=8)  # smallest face MTCNN looks for, px
    min_face_score: float = bounded(0.0, **_PROBABILITY)  # weaker MTCNN detections are not faces
    leak_threshold: float = bounded(0.6, minimum=-1.0, maximum=1.0)  # FaceNet cosine at which a training face is the subject

    # the protocol (paper §5.1). ``protocol: released`` applies RELEASED_PROTOCOL over the values below
    # (FastComposer's released evaluation scripts); ``ours`` (the default) keeps them as set
    protocol: Literal["ours", "released"] = "ours"
    images_per_prompt: int = bounded(4, minimum=1)  # images per (subjects, prompt), seeds seed..seed+N-1
    alpha: float = bounded(0.7, **_PROBABILITY)  # delayed subject conditioning: share of steps with the subjects
    steps: int = bounded(50, minimum=1)  # denoising steps
    guidance_scale: float = 5.0  # classifier-free guidance scale
    seed: int = 0  # first seed
    face_choice: Literal["largest", "confident"] = "largest"  # single-subject: the generated face scored
    image_format: Literal["png", "jpeg"] = "png"  # images are saved, and scored, as lossless PNG or JPEG
    jpeg_quality: int = bounded(75, minimum=1, maximum=100)  # with image_format jpeg

    def with_protocol(self) -> EvaluationSettings:
        """These settings with the protocol preset applied (``released``: :data:`RELEASED_PROTOCOL`)."""
        return dataclasses.replace(self, **RELEASED_PROTOCOL) if self.protocol == "released" else self


# FastComposer's released evaluation (evaluation/single_object/run.py and single_object_evaluation.py):
# alpha_=0.5, images saved with PIL's default JPEG quality (75) and scored from those files, MTCNN with
# select_largest=True and generated_face[:1] (the largest face), --num_images_per_prompt 4.
RELEASED_PROTOCOL: dict[str, Any] = {
    "alpha": 0.5, "image_format": "jpeg", "jpeg_quality": 75, "face_choice": "largest", "images_per_prompt": 4,
}
