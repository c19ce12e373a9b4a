"""A tiny randomly-initialised Stable Diffusion, saved as a diffusers pipeline folder.

The folder has SD1.5's layout and component classes, so the trainer loads it exactly as it loads
``stable-diffusion-v1-5/stable-diffusion-v1-5``::

    model_index.json
    unet/          UNet2DConditionModel: CrossAttnDownBlock2D x3 + DownBlock2D, UNetMidBlock2DCrossAttn,
                   UpBlock2D + CrossAttnUpBlock2D x3 (SD1.5's block layout), tiny channels
    vae/           AutoencoderKL: 4 latent channels, x8 downsampling, SD's scaling factor
    text_encoder/  CLIPTextModel: CLIP's vocabulary (49408) and context (77), 32 wide
    tokenizer/     CLIPTokenizer from the real CLIP BPE merges that ship with open_clip
    scheduler/     DDPMScheduler configured like SD1.5 (scaled_linear betas, 1000 steps)

The U-Net's cross-attention width equals the text encoder's hidden size, as in SD1.5 (768 there,
32 here). Weights come from a fixed seed, so every build writes the same tensors.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

SEED = 0
TEXT_HIDDEN_SIZE = 32  # the tiny CLIP vision model's projection_dim matches this
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

UNET_CONFIG = {
    "sample_size": 8,  # latent side: images of 64 px by default
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (16, 32, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": TEXT_HIDDEN_SIZE,
    "attention_head_dim": 2,  # SD1.5's config uses this key for the number of heads (8 there)
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,  # three downsamplings: x8 like SD
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
TEXT_ENCODER_CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": TEXT_HIDDEN_SIZE,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": CONTEXT_LENGTH,
    "projection_dim": TEXT_HIDDEN_SIZE,
    "hidden_act": "quick_gelu",
    "bos_token_id": VOCAB_SIZE - 2,
    "eos_token_id": VOCAB_SIZE - 1,
    "pad_token_id": VOCAB_SIZE - 1,
}
SCHEDULER_CONFIG = {  # SD1.5's noise schedule
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def clip_bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's BPE vocabulary (49408 entries) and merges, rebuilt from open_clip's merges file.

    Same construction as OpenAI's / open_clip's ``SimpleTokenizer``: the 256 byte symbols, the same
    with ``</w>``, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP BPE vocabulary from {default_bpe()} has {len(tokens)} entries, expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def build_stable_diffusion(dest: Path) -> None:
    """Write the tiny Stable Diffusion folder into ``dest`` (created if missing; replaced atomically)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        _build_into(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        for entry in sorted(tmp.iterdir()):
            target = dest / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_into(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = clip_bpe_vocab_and_merges()
    raw_tokenizer = folder / "tokenizer-files"
    raw_tokenizer.mkdir()
    (raw_tokenizer / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (raw_tokenizer / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(raw_tokenizer / "vocab.json"),
        merges=str(raw_tokenizer / "merges.txt"),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=CONTEXT_LENGTH,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    # Keep the plain BPE files next to the tokenizer too (vocab.json + merges.txt, as SD1.5 ships).
    for name in ("vocab.json", "merges.txt"):
        if not (folder / "tokenizer" / name).exists():
            shutil.copyfile(raw_tokenizer / name, folder / "tokenizer" / name)
    shutil.rmtree(raw_tokenizer)
