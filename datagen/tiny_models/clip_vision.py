"""A tiny randomly-initialised CLIP image encoder with projection, plus its image processor.

Stands in for ``openai/clip-vit-large-patch14`` in the trainer: the folder is a
``CLIPVisionModelWithProjection.from_pretrained`` folder and also holds the
``CLIPImageProcessor`` config (``preprocessor_config.json``), from which the trainer reads the
subject-crop size and normalisation. Geometry follows ViT-B/32 at 224 px (7 x 7 patches) so the
loader works at the real crop size; the transformer is 32 wide with three blocks (the trainer
fine-tunes the last two). ``projection_dim`` equals the tiny text encoder's hidden size, so the
fusion MLP's shapes work as with SD1.5 + ViT-L/14 (both 768 there). Fixed seed: every build
writes the same tensors.

    model = CLIPVisionModelWithProjection.from_pretrained(dest)
    processor = CLIPImageProcessor.from_pretrained(dest)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from datagen.tiny_models.stable_diffusion import TEXT_HIDDEN_SIZE

SEED = 0
IMAGE_SIZE = 224
VISION_CONFIG = {
    "image_size": IMAGE_SIZE,
    "patch_size": 32,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "projection_dim": TEXT_HIDDEN_SIZE,
    "hidden_act": "quick_gelu",
}
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_clip_vision(dest: Path) -> None:
    """Write the tiny CLIP vision model and processor into ``dest`` (files replaced atomically)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIG))
    processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        for entry in sorted(tmp.iterdir()):
            os.replace(entry, dest / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
