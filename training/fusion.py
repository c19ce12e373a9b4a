"""The fusion MLP: a subject's image embedding augments its word's text embedding (DESIGN §6).

For a subject with word embedding ``w`` (text encoder output at the subject's token, width d) and
image embedding ``v`` (vision encoder's projected embedding, width d)::

    h = MLP1([w; v]) + w          # LayerNorm(2d) → Linear(2d, d) → GELU → Linear(d, d), no residual
    h = MLP2(h)                   # LayerNorm(d) → Linear(d, d) → GELU → Linear(d, d), plus residual
    out = LayerNorm(h)            # replaces w in the sequence

:func:`fuse_subjects` applies it at every subject slot of a batch. Every slot is computed (padding
slots too) and padding results are discarded by a mask, so every fusion parameter takes part in
every step — as distributed data parallel training requires — and shapes stay static.
"""

from __future__ import annotations

import torch
from torch import nn


class FusionBlock(nn.Module):
    """LayerNorm → Linear → GELU → Linear, with an optional residual connection."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, residual: bool):
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError(f"a residual block needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act = nn.GELU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(self.layernorm(x))))
        return y + x if self.residual else y


class SubjectFusionMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp1 = FusionBlock(2 * dim, dim, dim, residual=False)
        self.mlp2 = FusionBlock(dim, dim, dim, residual=True)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, word_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        h = self.mlp1(torch.cat([word_embeds, image_embeds], dim=-1)) + word_embeds
        return self.layer_norm(self.mlp2(h))


def fuse_subjects(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    token_index: torch.Tensor,
    valid: torch.Tensor,
    fusion: SubjectFusionMLP,
) -> torch.Tensor:
    """Replace each valid subject's word embedding by its fused embedding.

    ``text_embeds`` (B, L, d); ``image_embeds`` (B, N, d); ``token_index`` (B, N) int; ``valid``
    (B, N) bool. Returns (B, L, d). Distinct valid subjects of one example must have distinct
    token indices (the loader guarantees it).
    """
    b, n = token_index.shape
    d = text_embeds.shape[-1]
    words = torch.gather(text_embeds, 1, token_index.unsqueeze(-1).expand(b, n, d))
    fused = fusion(words, image_embeds.to(words.dtype))
    # one-hot placement (B, N, L), zero rows for padding slots
    place = torch.nn.functional.one_hot(token_index, text_embeds.shape[1]).to(text_embeds.dtype)
    place = place * valid.unsqueeze(-1).to(text_embeds.dtype)
    replaced = place.sum(dim=1).clamp(max=1.0).unsqueeze(-1)  # (B, L, 1): 1 where a subject sits
    return text_embeds * (1.0 - replaced) + torch.einsum("bnl,bnd->bld", place, fused.to(text_embeds.dtype))
