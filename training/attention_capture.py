"""Capture the cross-attention maps of the subject tokens in chosen U-Net layers.

A diffusers attention processor, :class:`SubjectCrossAttnProcessor`, is installed ONLY on the
cross-attention (``attn2``) modules of the hooked layers (by default SD1.5's down blocks 1-2, mid
block and up blocks 1-2, FastComposer's choice); every other attention keeps its fast
scaled-dot-product processor. The processor computes the attention probabilities explicitly
(softmax(QKᵀ·scale), as diffusers' ``AttnProcessor``), uses them as usual, and stores the columns
of the subject tokens in a shared :class:`SubjectAttentionStore`:

    store.maps[module name] : (B, heads, H·W, N)  attention of every latent position on each subject token

Capture is on while ``store.token_index`` is set (:meth:`SubjectAttentionStore.begin`), so the
same U-Net also runs without capture (e.g. when sampling). The store keeps ``token_index`` until
the next ``begin`` so that gradient checkpointing, which re-runs the forward pass during backward,
recomputes the same operations.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention


class SubjectAttentionStore:
    def __init__(self) -> None:
        self.token_index: torch.Tensor | None = None  # (B, N) int64
        self.maps: dict[str, torch.Tensor] = {}

    def begin(self, token_index: torch.Tensor | None) -> None:
        """Start a forward pass: capture the columns ``token_index`` (None switches capture off)."""
        self.token_index = token_index
        self.maps = {}


class SubjectCrossAttnProcessor:
    """Explicit-softmax attention that records the subject tokens' attention maps."""

    def __init__(self, store: SubjectAttentionStore, name: str):
        self.store = store
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, sequence_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B·heads, H·W, L)
        self._record(probs, batch, attn.heads)
        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _record(self, probs: torch.Tensor, batch: int, heads: int) -> None:
        index = self.store.token_index
        if index is None:
            return
        if index.shape[0] != batch:
            raise ValueError(f"{self.name}: token_index is for {index.shape[0]} examples, attention for {batch}")
        _, queries, keys = probs.shape
        n = index.shape[1]
        probs = probs.view(batch, heads, queries, keys)
        gather_index = index.view(batch, 1, 1, n).expand(batch, heads, queries, n)
        self.store.maps[self.name] = probs.gather(-1, gather_index)


def cross_attention_modules(unet, layers: tuple[str, ...]) -> dict[str, Attention]:
    """The ``attn2`` modules under each of ``layers`` (prefixes such as ``"down_blocks.1"``)."""
    found = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn2"
        and any(name.startswith(layer + ".") for layer in layers)
    }
    missing = [layer for layer in layers if not any(n.startswith(layer + ".") for n in found)]
    if missing:
        available = sorted({n.split(".attentions")[0] for n, m in unet.named_modules() if n.endswith("attn2")})
        raise ValueError(f"localization layer(s) {missing} have no cross-attention in this U-Net; ones that do: {available}")
    return found


def install_subject_attention_capture(unet, layers: tuple[str, ...], store: SubjectAttentionStore) -> list[str]:
    """Install :class:`SubjectCrossAttnProcessor` on the hooked ``attn2`` modules; return their names."""
    modules = cross_attention_modules(unet, layers)
    for name, module in modules.items():
        module.set_processor(SubjectCrossAttnProcessor(store, name))
    return sorted(modules)
