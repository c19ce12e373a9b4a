"""FastComposerModel: Stable Diffusion's U-Net conditioned on text whose subject words carry image
embeddings, trained with the denoising and localization losses (DESIGN §6).

Components (all loaded with ``from_pretrained``): diffusers ``UNet2DConditionModel``,
``AutoencoderKL``, ``DDPMScheduler`` and transformers ``CLIPTextModel`` + ``CLIPTokenizer`` from
the Stable Diffusion folder; ``CLIPVisionModelWithProjection`` + ``CLIPImageProcessor`` from the
image-encoder folder; the fusion MLP (:mod:`training.fusion`).

Trainable: the whole U-Net, the fusion MLP, the last ``trainable_vision_blocks`` (2) transformer
blocks of the vision encoder. Everything else is frozen (``requires_grad=False``) and kept in
eval mode, also when ``train()`` is called.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from datagen.config import DEFAULT_LOCALIZATION_LAYERS
from training.attention_capture import SubjectAttentionStore, install_subject_attention_capture
from training.config import SD_PARTS
from training.fusion import SubjectFusionMLP, fuse_subjects
from training.image_encoder import SubjectImageEncoder, processor_geometry
from training.losses import denoising_loss, localization_loss, subject_region


@dataclass
class LoadedComponents:
    model: FastComposerModel
    tokenizer: object  # CLIPTokenizer
    subject_size: int  # the image processor's crop size: subject crops are made at this size


def resolve(ref: str, what: str, parts: tuple[str, ...] = ()) -> str:
    from datagen.stages.model_loading import resolve_model

    return resolve_model(ref, what, parts=parts)


class FastComposerModel(nn.Module):
    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        image_encoder: SubjectImageEncoder,
        fusion: SubjectFusionMLP,
        noise_scheduler,
        *,
        localization_layers: tuple[str, ...] = DEFAULT_LOCALIZATION_LAYERS,
        localization_weight: float = 1e-3,
        object_region_prob: float = 0.5,
        trainable_vision_blocks: int = 2,
    ):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.fusion = fusion
        self.noise_scheduler = noise_scheduler
        self.localization_weight = float(localization_weight)
        self.object_region_prob = float(object_region_prob)
        # the object-region coin (one per batch): its own generator, seeded by the loop (seed_coin)
        self.coin = random.Random(0)
        blocks = image_encoder.blocks()
        if not 0 <= trainable_vision_blocks <= len(blocks):
            raise ValueError(f"trainable_vision_blocks={trainable_vision_blocks}, the vision encoder has {len(blocks)} blocks")
        self.trainable_vision_blocks = int(trainable_vision_blocks)
        text_dim = text_encoder.config.hidden_size
        if image_encoder.embed_dim != text_dim or fusion.dim != text_dim or unet.config.cross_attention_dim != text_dim:
            raise ValueError(
                f"width mismatch: text encoder {text_dim}, image projection {image_encoder.embed_dim}, "
                f"fusion {fusion.dim}, U-Net cross-attention {unet.config.cross_attention_dim}"
            )
        self.attention_store = SubjectAttentionStore()
        self.hooked_layers = (
            install_subject_attention_capture(unet, tuple(localization_layers), self.attention_store)
            if localization_layers else []
        )
        self.freeze()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        image_encoder: str,
        *,
        localization_layers: tuple[str, ...] = DEFAULT_LOCALIZATION_LAYERS,
        localization_weight: float = 1e-3,
        object_region_prob: float = 0.5,
        trainable_vision_blocks: int = 2,
        seed: int = 0,
    ) -> LoadedComponents:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import (
            CLIPImageProcessor,
            CLIPTextModel,
            CLIPTokenizer,
            CLIPVisionModelWithProjection,
        )

        sd = resolve(pretrained, "trainer base (Stable Diffusion: unet, vae, text_encoder, tokenizer, scheduler)", SD_PARTS)
        enc = resolve(image_encoder, "trainer image encoder (CLIP vision with projection)")
        fp32 = torch.float32
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", torch_dtype=fp32)
        vae = AutoencoderKL.from_pretrained(sd, subfolder="vae", torch_dtype=fp32)
        text_encoder = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", dtype=fp32)
        tokenizer = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
        noise_scheduler = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
        vision = CLIPVisionModelWithProjection.from_pretrained(enc, dtype=fp32)
        size, mean, std = processor_geometry(CLIPImageProcessor.from_pretrained(enc))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fusion = SubjectFusionMLP(text_encoder.config.hidden_size)
        model = cls(
            unet, vae, text_encoder, SubjectImageEncoder(vision, mean, std), fusion, noise_scheduler,
            localization_layers=localization_layers, localization_weight=localization_weight,
            object_region_prob=object_region_prob, trainable_vision_blocks=trainable_vision_blocks,
        )
        return LoadedComponents(model, tokenizer, size)

    @classmethod
    def from_config(cls, cfg) -> LoadedComponents:
        return cls.from_pretrained(
            cfg.pretrained, cfg.image_encoder, localization_layers=cfg.localization_layers,
            localization_weight=cfg.localization_weight, object_region_prob=cfg.object_region_prob,
            trainable_vision_blocks=cfg.image_encoder_trainable_blocks, seed=cfg.seed,
        )

    # ---- what trains ---------------------------------------------------------------------
    def trainable_vision_modules(self) -> list[nn.Module]:
        k = self.trainable_vision_blocks
        return list(self.image_encoder.blocks()[-k:]) if k else []

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.unet.requires_grad_(True)
        self.fusion.requires_grad_(True)
        for block in self.trainable_vision_modules():
            block.requires_grad_(True)
        self.train(self.training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> FastComposerModel:
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        self.image_encoder.eval()
        for block in self.trainable_vision_modules():
            block.train(mode)
        return self

    def seed_coin(self, seed: int) -> None:
        """Seed the object-region coin, so that a run with the same seed flips the same coins."""
        self.coin.seed(seed)

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Store the frozen components in ``dtype`` (bf16 on GPU saves memory); trainable ones stay fp32."""
        self.vae.to(dtype)
        self.text_encoder.to(dtype)
        trainable = {id(p) for p in self.trainable_parameters()}
        for module in self.image_encoder.vision_model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) not in trainable:
                    setattr(module, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))

    # ---- conditioning ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids).last_hidden_state

    def condition(
        self, input_ids: torch.Tensor, subject_pixels: torch.Tensor, token_index: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Text embeddings (B, 77, d) with each valid subject's word embedding fused with its image."""
        text = self.encode_text(input_ids).float()
        image_embeds = self.image_encoder(subject_pixels).float()
        return fuse_subjects(text, image_embeds, token_index, valid, self.fusion)

    @torch.no_grad()
    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents of images given as uint8 (B, 3, H, W) or float in [-1, 1]."""
        if pixel_values.dtype == torch.uint8:
            pixel_values = pixel_values.float().div(127.5).sub(1.0)
        dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(pixel_values.to(dtype)).latent_dist.sample()
        return latents.float() * self.vae.config.scaling_factor

    # ---- training forward --------------------------------------------------------------------
    def forward(
        self,
        batch: dict,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        object_region: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one batch: ``loss``, ``denoise_loss``, ``localization_loss`` and
        ``object_region`` (1.0 when the MSE was taken inside the subject masks). ``noise``,
        ``timesteps`` and ``object_region`` are drawn at random unless given."""
        latents = self.encode_latents(batch["pixel_values"])
        if noise is None:
            noise = torch.randn_like(latents)
        if timesteps is None:
            steps = self.noise_scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
        timesteps = timesteps.long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction type {prediction_type!r}")

        valid = batch["subject_valid"]
        token_index = batch["subject_token_index"]
        cond = self.condition(batch["input_ids"], batch["subject_pixel_values"], token_index, valid)
        self.attention_store.begin(token_index if self.hooked_layers else None)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=cond).sample

        if object_region is None:
            object_region = self.coin.random() < self.object_region_prob
        region = subject_region(batch["subject_masks"], tuple(pred.shape[-2:])) if object_region else None
        denoise = denoising_loss(pred, target, region)
        if self.hooked_layers:
            localization = localization_loss(self.attention_store.maps, batch["subject_masks"], valid)
        else:
            localization = torch.zeros((), device=pred.device)
        loss = denoise + self.localization_weight * localization
        return {
            "loss": loss,
            "denoise_loss": denoise.detach(),
            "localization_loss": localization.detach(),
            "object_region": torch.tensor(float(object_region), device=pred.device),
        }
