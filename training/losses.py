"""FastComposer's losses, with the released code's arithmetic (``fastcomposer/model.py``; DESIGN §6).

* :func:`denoising_loss` — MSE between the U-Net's prediction and its target (the noise). With a
  ``region`` (B, 1, h, w) map it is the *object-region* loss that half the batches use:
  ``mse(pred · m, target · m)`` averaged over every element of the batch, m the union of the
  subject masks (:func:`subject_region`). So it scales with the subject area, and an example
  without subjects (m = 0) contributes 0.
* :func:`localization_loss` — balanced L1 on the subject tokens' cross-attention maps: for each
  subject's map A and mask m (bilinear, antialiased, to the layer's size),
  ``mean(A over background) − mean(A over m)``. Per example, the sum over its subjects ÷ its
  subject count (+1e-5, as released); then the mean over (batch × heads), examples without
  subjects counting 0; then the mean over the hooked layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def subject_region(subject_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Union of subject masks (B, N, H, W) resized to ``size`` as released: bilinear, no
    antialiasing, ``align_corners=False``. A (B, 1, h, w) weight map in [0, 1]; all zeros for an
    example without subjects."""
    union = subject_masks.any(dim=1, keepdim=True).to(torch.float32)
    return F.interpolate(union, size=size, mode="bilinear", align_corners=False)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    if region is not None:
        pred, target = pred * region, target * region
    return F.mse_loss(pred, target)


def balanced_l1(attention: torch.Tensor, masks: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``attention`` (B, heads, Q, N), ``masks`` (B, N, Q) in [0, 1] → (B, heads, N) per subject and head."""
    attention = attention.float().permute(0, 1, 3, 2)  # (B, heads, N, Q)
    fg = masks.unsqueeze(1)
    bg = 1.0 - fg
    mean_bg = (attention * bg).sum(-1) / (bg.sum(-1) + eps)
    mean_fg = (attention * fg).sum(-1) / (fg.sum(-1) + eps)
    return mean_bg - mean_fg


def localization_loss(
    maps: dict[str, torch.Tensor], subject_masks: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """``maps``: layer → (B, heads, h·w, N) (square layers); ``subject_masks`` (B, N, H, W);
    ``valid`` (B, N). Returns a scalar (0, still attached to the graph, when no subject is valid)."""
    if not maps:
        raise ValueError("no cross-attention maps were captured: is the capture processor installed?")
    masks = subject_masks.to(torch.float32)
    b, n = valid.shape
    weight = valid.to(torch.float32).view(b, 1, n)
    count = valid.sum(dim=1).to(torch.float32).view(b, 1) + 1e-5
    total = None
    for name, attention in maps.items():
        queries = attention.shape[2]
        side = math.isqrt(queries)
        if side * side != queries:
            raise ValueError(f"layer {name}: {queries} attention positions are not a square map (train on square images)")
        resized = F.interpolate(masks, size=(side, side), mode="bilinear", antialias=True).view(b, n, queries)
        per_head = (balanced_l1(attention, resized) * weight).sum(dim=2) / count  # (B, heads)
        layer_loss = per_head.mean()
        total = layer_loss if total is None else total + layer_loss
    return total / len(maps)
