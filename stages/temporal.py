"""Pseudo-3D layers and the inflation of a 2D U-Net into a spatiotemporal one.

Make-A-Video (Sec. 3.2) factorises every convolution and attention layer:

    Conv_P3D(h) = Conv_1D(Conv_2D(h) ∘ T) ∘ T        (eq. 2)
    ATTN_P3D(h) = unflatten(ATTN_1D(ATTN_2D(flatten(h)) ∘ T) ∘ T)   (eq. 3)

where ∘T swaps the spatial and temporal axes. The 1D conv starts as the identity
(``nn.init.dirac_``) and the temporal attention's output projection starts at zero,
so an inflated network computes exactly what the 2D network computed, frame by frame.

The diffusers 2D U-Net keeps running on ``(b f) c h w`` tensors; the wrapped layers read
the frame count from a shared :class:`FrameContext` to fold frames back out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class FrameContext:
    """Frame count of the batch being processed, shared by all temporal layers of one network."""

    def __init__(self) -> None:
        self.frames = 1
        self.enabled = True

    @property
    def active(self) -> bool:
        # An image (f = 1) always takes the spatial path alone: the network is then the 2D network.
        return self.enabled and self.frames > 1


class PseudoConv3d(nn.Module):
    """Conv_2D on every frame, then Conv_1D over frames at every pixel (eq. 2).

    The 1D conv runs as a ``(k, 1, 1)`` Conv3d on a view of the ``(b f) c h w`` activation as ``b c f h w``:
    no rearrangement to ``(b h w) c f`` and back. On channels-last memory (``(b f) h w c``, which is
    channels-last-3d for ``b c f h w``) the view is free, and so is the result where the conv kernel keeps
    that layout (cuDNN; oneDNN on several threads); a kernel that returns contiguous memory instead has its
    result brought back to channels-last once, so the layers after it see the memory format they were given.
    Its weight keeps the Conv1d's shape ``c c k`` and name, so checkpoints of either layout load unchanged.
    """

    def __init__(self, spatial: nn.Conv2d, context: FrameContext, kernel: int = 3) -> None:
        super().__init__()
        self.spatial = spatial
        self.context = context
        channels = spatial.out_channels
        self.temporal_conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2)
        nn.init.dirac_(self.temporal_conv.weight)
        nn.init.zeros_(self.temporal_conv.bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x: ``(b f) c h w`` -> ``(b f) c' h' w'``."""
        x = self.spatial(x, *args, **kwargs)
        if not self.context.active:
            return x
        conv = self.temporal_conv
        video = rearrange(x, "(b f) c h w -> b c f h w", f=self.context.frames)
        y = F.conv3d(video, conv.weight[..., None, None], conv.bias, padding=(conv.padding[0], 0, 0))
        y = rearrange(y, "b c f h w -> (b f) c h w")
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)  # a no-op where the kernel kept the layout
        return y


def frame_positions(frames: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal encoding of frame index, ``f d``: works for any frame count (16 keyframes or 76 frames)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(half, 1))
    angles = torch.arange(frames, device=device, dtype=torch.float32)[:, None] * freqs[None]
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if enc.shape[-1] < dim:
        enc = F.pad(enc, (0, dim - enc.shape[-1]))
    return enc.to(dtype)


class TemporalAttention(nn.Module):
    """Self-attention over frames at every pixel, added residually; output projection starts at zero.

    The norm, the frame-position add and the q/k/v/out projections act on each token alone, so they run on
    the activation in its own order, ``(b f) h w c`` (a view; free on channels-last memory). Only the
    attention needs the frames as its sequence: q, k and v are strided views ``(h w nh) b f d`` of the
    projections, never copied to ``(b h w) f c`` and back, and the residual add keeps the input's layout.
    """

    def __init__(self, channels: int, heads: int, context: FrameContext) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels={channels} must be divisible by temporal heads={heads}")
        self.context = context
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(b f) c h w`` -> same shape and memory format."""
        if not self.context.active:
            return x
        return self.attend(x, self.context.frames)

    def attend(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """The attention over ``frames`` frames at every pixel of x, ``(b f) c h w``, plus x."""
        h = x.shape[-2]
        tokens = rearrange(x, "(b f) c h w -> b f (h w) c", f=frames)
        y = self.norm(tokens).add_(frame_positions(frames, tokens.shape[-1], x.device, x.dtype)[:, None])
        # One projection per q, k, v (rows of to_qkv's weight), each b f (h w) c: (h w) and nh then merge into
        # one attention batch axis; the pixels go there, not into the heads axis, whose CUDA grid is limited.
        q, k, v = (rearrange(F.linear(y, w), "b f n (nh d) -> (n nh) b f d", nh=self.heads)
                   for w in self.to_qkv.weight.chunk(3))
        y = F.scaled_dot_product_attention(q, k, v)
        # A view where the attention keeps q's memory order (SDPA's CPU kernel does), else a copy.
        y = self.to_out(rearrange(y, "(n nh) b f d -> b f n (nh d)", nh=self.heads))
        return x + rearrange(y, "b f (h w) c -> (b f) c h w", h=h)


class PseudoAttention(nn.Module):
    """The pretrained spatial attention block on every frame, then temporal attention (eq. 3)."""

    def __init__(self, spatial: nn.Module, channels: int, heads: int, context: FrameContext) -> None:
        super().__init__()
        self.spatial = spatial
        self.temporal_attn = TemporalAttention(channels, heads, context)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.spatial(hidden_states, *args, **kwargs)
        # diffusers blocks return a tensor, a tuple (return_dict=False) or an output object with .sample.
        if isinstance(out, torch.Tensor):
            return self.temporal_attn(out)
        if isinstance(out, tuple):
            return (self.temporal_attn(out[0]), *out[1:])
        out.sample = self.temporal_attn(out.sample)
        return out


def _attention_channels(module: nn.Module) -> int:
    for name in ("in_channels", "query_dim"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the channel count of attention block {type(module).__name__}")


def inflate(unet: nn.Module, *, kernel: int = 3, heads: int = 4) -> FrameContext:
    """Turn a diffusers 2D U-Net (``UNet2DModel`` or ``UNet2DConditionModel``) pseudo-3D, in place.

    Every ResNet block's two 3x3 convs become :class:`PseudoConv3d`; every entry of an
    ``attentions`` list (spatial self/cross-attention blocks) becomes :class:`PseudoAttention`.
    Returns the :class:`FrameContext` through which the caller sets the frame count.
    The inflated network is function-preserving: on a video it equals the 2D network on each frame.
    """
    from diffusers.models.resnet import ResnetBlock2D

    if any(isinstance(m, (PseudoConv3d, PseudoAttention)) for m in unet.modules()):
        raise ValueError("network is already inflated")
    context = FrameContext()
    for module in list(unet.modules()):
        if isinstance(module, ResnetBlock2D):
            module.conv1 = PseudoConv3d(module.conv1, context, kernel)
            module.conv2 = PseudoConv3d(module.conv2, context, kernel)
        attentions = getattr(module, "attentions", None)
        if isinstance(attentions, nn.ModuleList):
            for i, attn in enumerate(attentions):
                if attn is None:  # diffusers keeps None placeholders where attention is switched off
                    continue
                attentions[i] = PseudoAttention(attn, _attention_channels(attn), heads, context)
    return context


# What inflate adds, by name (and a Latte's temporal parts, stages.latte).
TEMPORAL_KEYS = (".temporal_conv.", ".temporal_attn.", ".temporal_blocks.", ".temporal_gate")


def _is_temporal(name: str) -> bool:
    return any(key in f".{name}" for key in TEMPORAL_KEYS)


def temporal_parameter_names(module: nn.Module) -> list[str]:
    """Names of the parameters added by :func:`inflate` (what video fine-tuning may train alone)."""
    return [n for n, _ in module.named_parameters() if _is_temporal(n)]


def spatial_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The 2D network's state dict inside an inflated network, with the 2D key names."""
    out = {}
    for name, tensor in module.state_dict().items():
        if _is_temporal(name):
            continue
        out[name.replace(".spatial.", ".")] = tensor
    return out
