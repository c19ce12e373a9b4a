"""Training checkpoints: the trainable weights in Hugging Face formats, optimizer state, step.

A checkpoint folder holds::

    unet/                                 UNet2DConditionModel.save_pretrained (config + safetensors)
    fusion.safetensors                    the fusion MLP's state dict
    image_encoder_blocks.safetensors      the fine-tuned vision blocks, keyed as in
                                          CLIPVisionModelWithProjection's state dict
    optimizer.pt                          AdamW state (torch.save)
    grad_scaler.pt                        fp16 runs only: the gradient scaler's state (loss scale, growth
                                          tracker), so a resumed run keeps its scale
    trainer_state.json                    step, the run's config, model references, last metrics

Only trainable weights are saved; the frozen ones come from the base models named in
``trainer_state.json`` (``config.pretrained`` / ``config.image_encoder``). Files are written into
the folder given; the caller makes the folder appear atomically (Ray Train copies a finished
folder into the run's storage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from datagen import storage
from datagen.files import atomic_write

STATE_FILE = "trainer_state.json"
FUSION_FILE = "fusion.safetensors"
VISION_BLOCKS_FILE = "image_encoder_blocks.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCALER_FILE = "grad_scaler.pt"
UNET_DIR = "unet"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is missing or incomplete; the message names the folder and the file."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def _vision_block_state(model) -> dict[str, torch.Tensor]:
    vision = model.image_encoder.vision_model
    trainable = {id(p) for p in model.trainable_parameters()}
    return {
        name: p.detach().to(torch.float32).contiguous().cpu()
        for name, p in vision.named_parameters()
        if id(p) in trainable
    }


def save_checkpoint(
    model, optimizer: torch.optim.Optimizer | None, step: int, config: dict[str, Any], folder: str | Path,
    metrics: dict[str, float] | None = None, scaler: torch.amp.GradScaler | None = None,
) -> Path:
    model = unwrap(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.fusion.state_dict().items()}, folder / FUSION_FILE,
              metadata={"dim": str(model.fusion.dim)})
    save_file(_vision_block_state(model), folder / VISION_BLOCKS_FILE,
              metadata={"blocks": str(model.trainable_vision_blocks)})
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    if scaler is not None and scaler.is_enabled():  # fp16: the loss scale it reached
        torch.save(scaler.state_dict(), folder / SCALER_FILE)
    state = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "config": config,
        "hooked_layers": list(model.hooked_layers),
        "metrics": metrics or {},
    }
    atomic_write(folder / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
    return folder


def read_state(folder: str | Path) -> dict[str, Any]:
    path = storage.path(folder) / STATE_FILE  # a local folder or one on a bucket
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint: {STATE_FILE} is missing")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if state.get("format") != FORMAT_VERSION or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: unknown checkpoint format {state.get('format')!r} (this code reads {FORMAT_VERSION})")
    return state


def load_checkpoint(folder: str | Path, model, optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device = "cpu", scaler: torch.amp.GradScaler | None = None
                    ) -> dict[str, Any]:
    """Load trainable weights (and optimizer state, if given) into ``model``; return the state. An
    enabled ``scaler`` (fp16) takes the saved scale when the checkpoint has one (a bf16 or fp32 run's
    has none: it starts from its initial scale)."""
    model = unwrap(model)
    folder = Path(folder)
    state = read_state(folder)
    unet_files = sorted((folder / UNET_DIR).glob("*.safetensors"))
    if not unet_files:
        raise CheckpointError(f"checkpoint {folder} is incomplete: no U-Net weights (*.safetensors) in {UNET_DIR}/")
    for name in (FUSION_FILE, VISION_BLOCKS_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
    unet_state: dict[str, torch.Tensor] = {}
    for f in unet_files:
        unet_state.update(load_file(f))
    model.unet.load_state_dict(unet_state, strict=True)
    model.fusion.load_state_dict(load_file(folder / FUSION_FILE), strict=True)
    vision_state = load_file(folder / VISION_BLOCKS_FILE)
    expected = set(_vision_block_state(model))
    if set(vision_state) != expected:
        raise CheckpointError(
            f"checkpoint {folder}: {VISION_BLOCKS_FILE} holds {len(vision_state)} tensors for other vision blocks "
            f"than this model trains ({len(expected)} expected)"
        )
    model.image_encoder.vision_model.load_state_dict(vision_state, strict=False)
    if optimizer is not None:
        path = folder / OPTIMIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {OPTIMIZER_FILE} is missing")
        optimizer.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
    if scaler is not None and scaler.is_enabled() and (folder / SCALER_FILE).is_file():
        scaler.load_state_dict(torch.load(folder / SCALER_FILE, weights_only=True))
    return state


def checkpoint_step(folder: str | Path) -> int | None:
    try:
        return read_state(folder)["step"]
    except CheckpointError:
        return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step among ``root``'s ``checkpoint*`` folders
    (searched in ``root`` and one level below, e.g. ``OUT/<run name>/checkpoint-00001000``); ``root``
    may be a bucket URL (a ``UPath`` comes back then)."""
    root = storage.path(root)
    if not root.is_dir():
        return None
    candidates = [p for p in root.glob("checkpoint*") if p.is_dir()]
    candidates += [p for p in root.glob("*/checkpoint*") if p.is_dir()]
    best: tuple[int, Path] | None = None
    for folder in candidates:
        step = checkpoint_step(folder)
        if step is not None and (best is None or step > best[0]):
            best = (step, folder)
    return best[1] if best else None


