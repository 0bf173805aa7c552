"""Attention modes of the spatial self-attention of an inflated U-Net, as diffusers attention processors.

``full``: each frame attends to itself alone (the 2D network's attention, frame by frame; diffusers'
``AttnProcessor2_0``). ``sparse_causal`` (Tune-A-Video, Wu et al., 2023, Sec. 4.1): the queries of frame i
attend to the keys and values of frames 0 and i − 1,

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V,  Q = W^Q z_{v_i},  K = W^K [z_{v_0}, z_{v_{i−1}}],  V = W^V [z_{v_0}, z_{v_{i−1}}]

so the first frame anchors content and layout and the previous one carries motion. The mode adds no
weights: a network switches between them with its state dict unchanged. The processor reads the frame
count from the network's :class:`stages.temporal.FrameContext`; an image (f = 1) or a network whose temporal
layers are switched off takes the full path, so an image network computes exactly what it did.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stages.config import ATTENTION_MODES
from stages.temporal import FrameContext


def sparse_causal_context(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The tokens frame i attends to: ``(b f) n c`` -> ``(b f) (2 n) c``, frame 0's tokens then frame i − 1's
    (frame 0 attends to itself twice, as in Tune-A-Video)."""
    x = rearrange(x, "(b f) n c -> b f n c", f=frames)
    previous = (torch.arange(frames, device=x.device) - 1).clamp(min=0)
    first = x[:, :1].expand(-1, frames, -1, -1)
    return rearrange(torch.cat([first, x[:, previous]], dim=2), "b f n c -> (b f) n c")


class SparseCausalAttnProcessor:
    """Spatial self-attention whose keys and values are those of frames 0 and i − 1 (diffusers'
    ``AttnProcessor2_0`` with the key/value tokens gathered by :func:`sparse_causal_context`)."""

    def __init__(self, context: FrameContext) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.context = context
        self.full = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        """hidden_states: ``(b f) n c`` tokens or ``(b f) c h w`` feature maps -> the same shape."""
        if encoder_hidden_states is not None or attention_mask is not None or not self.context.active:
            return self.full(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        maps = hidden_states.ndim == 4
        if maps:
            h, w = hidden_states.shape[-2:]
            hidden_states = rearrange(hidden_states, "n c h w -> n (h w) c")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = sparse_causal_context(hidden_states, self.context.frames)
        query = rearrange(attn.to_q(hidden_states), "n t (nh d) -> n nh t d", nh=attn.heads)
        key = rearrange(attn.to_k(context), "n t (nh d) -> n nh t d", nh=attn.heads)
        value = rearrange(attn.to_v(context), "n t (nh d) -> n nh t d", nh=attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value)
        out = rearrange(out, "n nh t d -> n t (nh d)").to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if maps:
            out = rearrange(out, "n (h w) c -> n c h w", h=h, w=w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def spatial_self_attentions(unet: nn.Module) -> list[nn.Module]:
    """The diffusers ``Attention`` modules of a U-Net that attend within a frame's own tokens (not the
    cross-attention to context tokens; the temporal attention is not a diffusers ``Attention``)."""
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention]


def set_spatial_attention(unet: nn.Module, mode: str, context: FrameContext) -> None:
    """Give every spatial self-attention of a diffusers U-Net the processor of ``mode`` (ATTENTION_MODES)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {', '.join(ATTENTION_MODES)}")
    for attn in spatial_self_attentions(unet):
        attn.set_processor(SparseCausalAttnProcessor(context) if mode == "sparse_causal" else AttnProcessor2_0())


def use_spatial_attention(net: nn.Module, mode: str) -> nn.Module:
    """A :class:`stages.unet.VideoUNet` (from any bundle) switched to attention ``mode`` in place, its config
    saying so; its weights are untouched. Returns it."""
    set_spatial_attention(net.unet, mode, net.frame_context)
    net.cfg = replace(net.cfg, spatial_attention=mode)
    return net
