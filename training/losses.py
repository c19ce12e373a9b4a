"""FastComposer's losses (DESIGN §6).

* :func:`denoising_loss` — MSE between the U-Net's prediction and its target (the noise). With a
  ``region`` (B, 1, h, w) weight map it is the mean inside the region only: the *object-region*
  loss that half the batches use, with the union of the subject masks as region. An example
  without subjects has no region; it counts with its whole image.
* :func:`localization_loss` — balanced L1 on the subject tokens' cross-attention maps: for each
  subject's map A and mask m (resized to the layer's resolution),
  ``mean(A over background) − mean(A over m)``, averaged over heads, then over all subjects of the
  batch, then over the hooked layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def subject_region(subject_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Union of subject masks (B, N, H, W) resized to ``size``: a (B, 1, h, w) weight map in [0, 1];
    examples without any subject pixel get an all-ones map."""
    union = subject_masks.any(dim=1, keepdim=True).to(torch.float32)
    region = F.interpolate(union, size=size, mode="bilinear", align_corners=False)
    empty = union.flatten(1).amax(dim=1) == 0
    return torch.where(empty.view(-1, 1, 1, 1), torch.ones_like(region), region)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    if region is None:
        return F.mse_loss(pred, target)
    weight = region.expand_as(pred)
    return ((pred - target) ** 2 * weight).sum() / weight.sum().clamp(min=1e-8)


def balanced_l1(attention: torch.Tensor, masks: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``attention`` (B, heads, Q, N), ``masks`` (B, N, Q) in [0, 1] → (B, N) loss per subject."""
    attention = attention.float().permute(0, 1, 3, 2)  # (B, heads, N, Q)
    fg = masks.unsqueeze(1)
    bg = 1.0 - fg
    mean_bg = (attention * bg).sum(-1) / (bg.sum(-1) + eps)
    mean_fg = (attention * fg).sum(-1) / (fg.sum(-1) + eps)
    return (mean_bg - mean_fg).mean(dim=1)


def localization_loss(
    maps: dict[str, torch.Tensor], subject_masks: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """``maps``: layer → (B, heads, h·w, N) (square layers); ``subject_masks`` (B, N, H, W);
    ``valid`` (B, N). Returns a scalar (0, still attached to the graph, when no subject is valid)."""
    if not maps:
        raise ValueError("no cross-attention maps were captured: is the capture processor installed?")
    masks = subject_masks.to(torch.float32)
    b, n = valid.shape
    weight = valid.to(torch.float32)
    count = weight.sum()
    total = None
    for name, attention in maps.items():
        queries = attention.shape[2]
        side = math.isqrt(queries)
        if side * side != queries:
            raise ValueError(f"layer {name}: {queries} attention positions are not a square map (train on square images)")
        resized = F.interpolate(masks, size=(side, side), mode="bilinear", antialias=True).view(b, n, queries)
        per_subject = balanced_l1(attention, resized)
        layer_loss = (per_subject * weight).sum() / count.clamp(min=1.0)
        total = layer_loss if total is None else total + layer_loss
    return total / len(maps)
