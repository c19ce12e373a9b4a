"""Generate an image from a trained checkpoint, a prompt and subject photos.

As the released pipeline samples (``fastcomposer/pipeline.py``, ``scripts/run_inference.sh``):
SD1.5's default scheduler, PNDM (PLMS steps only: ``skip_prk_steps``, ``steps_offset`` 1), 50
steps, classifier-free guidance 5 with the empty caption as the unconditional branch (the
trainer drops 10% of captions for it). DDIM is an option (``scheduler="ddim"``).

Delayed subject conditioning (FastComposer §4.3): step ``i`` of the scheduler's timesteps uses the
plain text conditioning while ``i <= start_merge_step``, ``start_merge_step = int((1 − alpha) · T)``
(the pipeline's ``i <= (1 - alpha_) * num_inference_steps``, in integers), so the layout follows
the prompt; the later steps use the subject-augmented conditioning, so the subjects' identities
fill it in. Note that step 0 is text-only even with alpha = 1, as upstream.

Each subject binds to a word of the prompt (``("man", photo)``): the word's first free occurrence,
matched as a whole word; the subject's token is the last token of that word. The photo is used
whole (pad to square, resize to the vision encoder's size, no background noise, no augmentation):
pass a crop of the person for best results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datagen import storage
from training.checkpoint import latest_checkpoint, load_checkpoint, read_state
from training.config import TrainConfig
from training.model import FastComposerModel
from training.subject_crops import SubjectCropper
from training.subject_tokens import SubjectTokenizer

SCHEDULERS = ("pndm", "ddim")
# SD1.5's scheduler_config.json: PNDMScheduler with these (betas come from the model's own config)
SD15_PNDM = {"skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}


class SamplerError(ValueError):
    """Bad sampler input; the message says which input and what is wrong."""


def start_merge_step(alpha: float, steps: int) -> int:
    """Last step index that uses text-only conditioning (upstream: ``i <= (1 - alpha) * steps``)."""
    return int((1.0 - alpha) * steps)


def make_scheduler(name: str, config):
    """The sampling scheduler built on the model's noise-schedule ``config``."""
    from diffusers import DDIMScheduler, PNDMScheduler

    if name == "pndm":
        return PNDMScheduler.from_config(config, **SD15_PNDM)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    raise SamplerError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")


def bind_subjects(prompt: str, words: list[str]) -> list[int]:
    """Character offset of the end of each word in ``prompt`` (first whole-word occurrence not yet
    taken, in the order given)."""
    taken: set[int] = set()
    ends = []
    for word in words:
        if not word.strip():
            raise SamplerError("a subject's word is empty")
        for match in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE):
            if match.end() not in taken:
                taken.add(match.end())
                ends.append(match.end())
                break
        else:
            raise SamplerError(f"subject word {word!r} does not occur (as a whole word, once per subject) in the prompt {prompt!r}")
    return ends


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the latest checkpoint of a run folder; local or on a bucket (a ``UPath``
    comes back then)."""
    path = storage.path(path)
    if (path / "trainer_state.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise SamplerError(f"{path}: neither a checkpoint (no trainer_state.json) nor a run folder holding one")
    return latest


@dataclass
class Subject:
    word: str
    image: Image.Image


class FastComposerSampler:
    def __init__(self, model: FastComposerModel, tokenizer, subject_size: int, device: str | torch.device = "cpu",
                 resolution: int = 512):
        self.model = model.eval()
        self.device = torch.device(device)
        self.subject_tokenizer = SubjectTokenizer(tokenizer)
        self.cropper = SubjectCropper(subject_size, zoom=False)
        self.resolution = resolution
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None, pretrained: str | None = None,
                        image_encoder: str | None = None) -> FastComposerSampler:
        """Base models from the checkpoint's config (or the given overrides), trained weights from it."""
        from datagen.stages.model_loading import pick_device

        folder = resolve_checkpoint(path)
        cfg = TrainConfig.from_dict(read_state(folder)["config"])
        components = FastComposerModel.from_pretrained(
            pretrained or cfg.pretrained, image_encoder or cfg.image_encoder, localization_layers=(),
            trainable_vision_blocks=cfg.image_encoder_trainable_blocks,
        )
        with storage.local_copy(folder) as local:  # a bucket's checkpoint: downloaded once, to a temp folder
            load_checkpoint(local, components.model)
        device = pick_device(device)
        components.model.to(device)
        return cls(components.model, components.tokenizer, components.subject_size, device, cfg.resolution)

    def subject_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        crops = []
        for image in images:
            array = np.asarray(image.convert("RGB"))
            tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
            crops.append(self.cropper.finish(tensor))
        return torch.stack(crops).unsqueeze(0)  # (1, N, 3, S, S)

    @torch.no_grad()
    def conditioning(self, prompt: str, subjects: list[Subject]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unconditional, text-only, subject-augmented) embeddings, each (1, 77, d)."""
        ends = bind_subjects(prompt, [s.word for s in subjects])
        order = sorted(range(len(subjects)), key=lambda i: ends[i])
        input_ids, positions = self.subject_tokenizer(prompt, [ends[i] for i in order])
        if any(p is None for p in positions):
            raise SamplerError(f"prompt {prompt!r} is too long: a subject's word falls beyond the text encoder's context")
        model, dev = self.model, self.device
        null = model.encode_text(self.subject_tokenizer.plain("").unsqueeze(0).to(dev)).float()
        text = model.encode_text(input_ids.unsqueeze(0).to(dev)).float()
        if not subjects:
            return null, text, text
        pixels = self.subject_pixels([subjects[i].image for i in order]).to(dev)
        index = torch.tensor([positions], dtype=torch.long, device=dev)
        valid = torch.ones_like(index, dtype=torch.bool)
        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            augmented = model.condition(input_ids.unsqueeze(0).to(dev), pixels, index, valid)
        return null, text, augmented.float()

    @torch.no_grad()
    def generate(self, prompt: str, subjects: list[Subject], *, steps: int = 50, guidance_scale: float = 5.0,
                 alpha: float = 0.7, seed: int = 0, resolution: int | None = None,
                 scheduler: str = "pndm") -> Image.Image:
        if not 0.0 <= alpha <= 1.0:
            raise SamplerError(f"alpha must be in [0, 1], got {alpha}")
        if steps < 1:
            raise SamplerError(f"steps must be >= 1, got {steps}")
        size = resolution or self.resolution
        if size % 8:
            raise SamplerError(f"resolution must be a multiple of 8, got {size}")
        model, dev = self.model, self.device
        null, text, augmented = self.conditioning(prompt, subjects)
        sched = make_scheduler(scheduler, model.noise_scheduler.config)
        sched.set_timesteps(steps, device=dev)
        generator = torch.Generator("cpu").manual_seed(seed)
        channels = model.unet.config.in_channels
        latents = torch.randn((1, channels, size // 8, size // 8), generator=generator).to(dev)
        latents = latents * sched.init_noise_sigma
        last_text_step = start_merge_step(alpha, steps)
        for i, t in enumerate(sched.timesteps):  # PNDM: steps + 1 timesteps, as upstream iterates them
            cond = text if i <= last_text_step else augmented
            latent_in = sched.scale_model_input(torch.cat([latents, latents]), t)
            with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                noise = model.unet(latent_in, t, encoder_hidden_states=torch.cat([null, cond])).sample.float()
            uncond, conditioned = noise.chunk(2)
            noise = uncond + guidance_scale * (conditioned - uncond)
            latents = sched.step(noise, t, latents).prev_sample
        vae_dtype = next(model.vae.parameters()).dtype
        image = model.vae.decode((latents / model.vae.config.scaling_factor).to(vae_dtype)).sample.float()
        image = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(image)
