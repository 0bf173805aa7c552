"""Latte (Ma et al., 2024, "Latte: Latent Diffusion Transformer for Video Generation") as the network of
D^t and ↑F: every frame cut into patch tokens, space and time modelled by transformer blocks.

The contract is :class:`stages.unet.VideoUNet`'s: ``(x_t, t, conditions) -> prediction`` on ``b c f h w``,
an image being a video with f = 1; the network never samples. Conditioning:
  * c = emb(t) + MLP(y_e) + emb(fps) modulates every block (adaLN-Zero: LN(x)·(1 + s) + b, the output
    scaled by a gate g, (b, s, g) a zero-initialised linear map of c, so every block starts as the identity),
    or, with ``conditioning: tokens``, travels as one extra token of every sequence (Latte's ablation);
  * y_e, projected into ``context_tokens`` tokens, is cross-attended after every spatial attention;
  * ↑F's masked frames and mask channel are concatenated to x_t on the channel axis.

The four ways to split space and time (Latte Sec. 3.2; ``LatteConfig.variant``):
  1. spatial and temporal transformer blocks interleaved;
  2. late fusion: all spatial blocks, then as many temporal blocks;
  3. one block = spatial self-attention, temporal self-attention, one MLP;
  4. one multi-head attention per block, half its heads over a frame's tokens, half over a token's frames.
Patch embedding: p×p patches of every frame, or tubelets of k frames × p × p ("compression frames"), each
with its un-patchify. Temporal positions: absolute sin-cos over any frame count, or rotary (relative), both
inside the temporal attention only.

The token stream is ``b F n d``: F token frames (f, or f / k with tubelets), n tokens per frame (the patches,
and in ``conditioning: tokens`` the condition token first). Make-A-Video's image → video rule holds: the
temporal parts start as the identity (adaLN gates at zero; with condition tokens their output layers are
zero; variant 4's temporal heads start as their value), so :func:`inflate` turns a Latte trained on images
into a video model computing exactly what it computed, and one token frame (an image) never enters them.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from stages.config import LatteConfig
from stages.unet import ScalarEmbedding

TIMESTEP_CHANNELS = 256  # sinusoidal features of t before its MLP (DiT's frequency_embedding_size)


def _zero(layer: nn.Linear | nn.Conv2d | nn.Conv3d) -> None:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _attention(width: int, heads: int, *, cross: bool = False, rotary: bool = False) -> nn.Module:
    """diffusers' Attention (SDPA); rotary through its HunyuanDiT processor, which rotates q and k."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, HunyuanAttnProcessor2_0

    return Attention(width, cross_attention_dim=width if cross else None, heads=heads, dim_head=width // heads,
                     bias=True, processor=HunyuanAttnProcessor2_0() if rotary else AttnProcessor2_0())


def _mlp(width: int, ratio: float) -> nn.Module:
    from diffusers.models.attention import FeedForward

    return FeedForward(width, inner_dim=int(width * ratio), activation_fn="gelu-approximate")


def temporal_sincos(frames: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Absolute sin-cos position of each frame, ``f dim``: defined for any frame count."""
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    pos = torch.arange(frames, device=device, dtype=torch.float64)
    return get_1d_sincos_pos_embed_from_grid(dim, pos, output_type="pt").to(dtype)


def temporal_rotary(frames: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each ``f head_dim``: rotary positions of the frames (relative offsets enter q·k)."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    cos, sin = get_1d_rotary_pos_embed(head_dim, frames, use_real=True, repeat_interleave_real=True)
    return cos.to(device), sin.to(device)


# -- residual sublayers ------------------------------------------------------------------------------

class Residual(nn.Module):
    """x + g ⊙ fn(LN(x)·(1 + s) + b), (b, s, g) = Linear(SiLU(c)) zero-initialised (adaLN-Zero), or
    x + fn(LN(x)) when the condition travels as a token. x: ``b F n d``; c: ``b d``."""

    def __init__(self, width: int, fn: nn.Module, adaln: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=not adaln, eps=1e-6)
        self.fn = fn
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width)) if adaln else None
        if self.modulation is not None:
            _zero(self.modulation[-1])

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.modulation is None:
            return x + self.fn(h)
        shift, scale, gate = rearrange(self.modulation(c), "b (three d) -> three b 1 1 d", three=3)
        return x + gate * self.fn(h * (1 + scale) + shift)


class SpaceAttention(nn.Module):
    """Self-attention among the tokens of each token frame."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = _attention(width, heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b = h.shape[0]
        y = self.attn(rearrange(h, "b f n d -> (b f) n d"))
        return rearrange(y, "(b f) n d -> b f n d", b=b)


class TimeAttention(nn.Module):
    """Self-attention among the token frames at each token position, with sin-cos or rotary positions."""

    def __init__(self, width: int, heads: int, position: str) -> None:
        super().__init__()
        self.position = position
        self.heads = heads
        self.attn = _attention(width, heads, rotary=position == "rope")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, f, _, d = h.shape
        y = rearrange(h, "b f n d -> (b n) f d")
        if self.position == "rope":
            y = self.attn(y, image_rotary_emb=temporal_rotary(f, d // self.heads, h.device))
        else:
            y = self.attn(y + temporal_sincos(f, d, h.device, h.dtype))
        return rearrange(y, "(b n) f d -> b f n d", b=b)


class SplitAttention(nn.Module):
    """Variant 4: one multi-head attention, heads [0, nh/2) over a frame's tokens, [nh/2, nh) over a token's
    frames. A temporal head's output is v + γ (attention over frames − v), γ (per head) starting at 0: the
    image model's temporal heads pass their value through (as attention over one frame does)."""

    def __init__(self, width: int, heads: int, position: str, temporal: bool) -> None:
        super().__init__()
        self.position = position
        self.attn = _attention(width, heads)
        self.temporal_gate = nn.Parameter(torch.zeros(heads // 2)) if temporal else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, f, n, _ = h.shape
        a = self.attn
        half = a.heads // 2
        q, k, v = (rearrange(proj(h), "b f n (nh e) -> b nh f n e", nh=a.heads) for proj in (a.to_q, a.to_k, a.to_v))
        space = F.scaled_dot_product_attention(*(rearrange(x[:, :half], "b nh f n e -> (b f) nh n e")
                                                 for x in (q, k, v)))
        space = rearrange(space, "(b f) nh n e -> b nh f n e", b=b)
        time = v[:, half:]
        if self.temporal_gate is not None and f > 1:
            qt, kt, vt = (rearrange(x[:, half:], "b nh f n e -> (b n) nh f e") for x in (q, k, v))
            if self.position == "rope":
                from diffusers.models.embeddings import apply_rotary_emb

                rot = temporal_rotary(f, qt.shape[-1], h.device)
                qt, kt = apply_rotary_emb(qt, rot), apply_rotary_emb(kt, rot)
            else:
                pos = temporal_sincos(f, qt.shape[-1], h.device, h.dtype)
                qt, kt = qt + pos, kt + pos
            attended = rearrange(F.scaled_dot_product_attention(qt, kt, vt), "(b n) nh f e -> b nh f n e", b=b)
            time = time + self.temporal_gate[:, None, None, None] * (attended - time)
        y = rearrange(torch.cat([space, time], dim=1), "b nh f n e -> b f n (nh e)")
        return a.to_out[1](a.to_out[0](y))


class CrossAttention(nn.Module):
    """x + CrossAttn(LN(x), y_e tokens) (PixArt-α's place for it); the output layer starts at zero."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.attn = _attention(width, heads, cross=True)
        _zero(self.attn.to_out[0])

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, f = x.shape[:2]
        y = self.attn(rearrange(self.norm(x), "b f n d -> b (f n) d"), encoder_hidden_states=tokens)
        return x + rearrange(y, "b (f n) d -> b f n d", f=f)


def _start_at_identity(sublayer: Residual) -> None:
    """A temporal sublayer without adaLN: its output layer at zero (with adaLN the zero gate does it)."""
    if sublayer.modulation is None:
        fn = sublayer.fn
        _zero(fn.attn.to_out[0] if hasattr(fn, "attn") else fn.net[-1])


# -- blocks -------------------------------------------------------------------------------------------

class SpatialBlock(nn.Module):
    """Spatial self-attention, cross-attention to y_e's tokens, MLP (variants 1 and 2); variant 3 adds a
    temporal self-attention before the MLP, variant 4 splits the self-attention's heads."""

    def __init__(self, cfg: LatteConfig, cross: bool) -> None:
        super().__init__()
        adaln = cfg.conditioning == "adaln"
        attn = (SplitAttention(cfg.width, cfg.heads, cfg.temporal_position, cfg.temporal) if cfg.variant == 4
                else SpaceAttention(cfg.width, cfg.heads))
        self.attn = Residual(cfg.width, attn, adaln)
        self.cross = CrossAttention(cfg.width, cfg.heads) if cross else None
        self.temporal_attn = None
        if cfg.variant == 3 and cfg.temporal:
            self.add_temporal(cfg)
        self.mlp = Residual(cfg.width, _mlp(cfg.width, cfg.mlp_ratio), adaln)

    def add_temporal(self, cfg: LatteConfig) -> None:
        """The block's temporal part, at identity: variant 3's attention, variant 4's gates."""
        if cfg.variant == 3:
            self.temporal_attn = Residual(cfg.width, TimeAttention(cfg.width, cfg.heads, cfg.temporal_position),
                                          cfg.conditioning == "adaln")
            _start_at_identity(self.temporal_attn)
        elif cfg.variant == 4:
            self.attn.fn.temporal_gate = nn.Parameter(torch.zeros(cfg.heads // 2))

    def forward(self, x: torch.Tensor, c: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        x = self.attn(x, c)
        if self.cross is not None:
            x = self.cross(x, tokens)
        if self.temporal_attn is not None and x.shape[1] > 1:
            x = self.temporal_attn(x, c)
        return self.mlp(x, c)


class TemporalBlock(nn.Module):
    """Temporal self-attention and MLP (variants 1 and 2)."""

    def __init__(self, cfg: LatteConfig) -> None:
        super().__init__()
        adaln = cfg.conditioning == "adaln"
        self.attn = Residual(cfg.width, TimeAttention(cfg.width, cfg.heads, cfg.temporal_position), adaln)
        self.mlp = Residual(cfg.width, _mlp(cfg.width, cfg.mlp_ratio), adaln)
        _start_at_identity(self.attn)
        _start_at_identity(self.mlp)

    def forward(self, x: torch.Tensor, c: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        return self.mlp(self.attn(x, c), c)


# -- patches ------------------------------------------------------------------------------------------

class Patches(nn.Module):
    """Video ``b c f h w`` <-> tokens ``b F (h/p w/p) d``: per-frame p×p patches (diffusers' PatchEmbed, F = f)
    or tubelets of k frames (a Conv3d, F = f / k); both add 2D sin-cos positions of the patch's row and
    column, whatever the frame size. An image (f = 1) is a still clip of k frames to a tubelet embedding,
    and its k output frames are averaged back into one."""

    def __init__(self, cfg: LatteConfig, in_channels: int, out_channels: int) -> None:
        super().__init__()
        from diffusers.models.embeddings import PatchEmbed

        p, k, d = cfg.patch_size, cfg.frames_per_token, cfg.width
        self.p, self.k, self.out_channels = p, k, out_channels
        if k == 1:
            self.embed = PatchEmbed(patch_size=p, in_channels=in_channels, embed_dim=d, pos_embed_type=None)
        else:
            self.embed = nn.Conv3d(in_channels, d, kernel_size=(k, p, p), stride=(k, p, p))
        self.out_dim = k * p * p * out_channels

    @property
    def proj(self) -> nn.Module:
        """The layer that reads the input channels."""
        return self.embed.proj if self.k == 1 else self.embed

    def embed_video(self, x: torch.Tensor) -> torch.Tensor:
        """``b c f h w`` -> ``b F n d``."""
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        b, _, f, h, w = x.shape
        if h % self.p or w % self.p:
            raise ValueError(f"frames of {h}x{w} do not cut into {self.p}x{self.p} patches")
        if self.k == 1:
            tokens = rearrange(self.embed(rearrange(x, "b c f h w -> (b f) c h w")), "(b f) n d -> b f n d", b=b)
        else:
            if f == 1:
                x = repeat(x, "b c 1 h w -> b c k h w", k=self.k)
            elif f % self.k:
                raise ValueError(f"{f} frames do not cut into tubelets of {self.k}")
            tokens = rearrange(self.embed(x), "b d f gh gw -> b f (gh gw) d")
        gh = h // self.p  # base_size = the grid: positions are the patch's row and column indices
        pos = get_2d_sincos_pos_embed(tokens.shape[-1], (gh, w // self.p), base_size=gh, device=x.device,
                                      output_type="pt")
        return tokens + pos.to(tokens.dtype)

    def unembed(self, y: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        """``b F n (k p q c)`` -> ``b c f h w``."""
        video = rearrange(y, "b f (gh gw) (k p q c) -> b c (f k) (gh p) (gw q)", gh=h // self.p, k=self.k, p=self.p,
                          q=self.p, c=self.out_channels)
        return video.mean(dim=2, keepdim=True) if f == 1 and self.k > 1 else video


class FinalLayer(nn.Module):
    """LN (adaLN-modulated by c, or affine), then a linear map to each token's pixels, zero-initialised."""

    def __init__(self, width: int, out_dim: int, adaln: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=not adaln, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width)) if adaln else None
        if self.modulation is not None:
            _zero(self.modulation[-1])
        self.linear = nn.Linear(width, out_dim)
        _zero(self.linear)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.modulation is not None:
            shift, scale = rearrange(self.modulation(c), "b (two d) -> two b 1 1 d", two=2)
            h = h * (1 + scale) + shift
        return self.linear(h)


# -- the network --------------------------------------------------------------------------------------

class LatteVideo(nn.Module):
    """ε/x_0/v prediction over videos ``b c f h w`` (an image is a video with f = 1), Latte's way.

    Args:
        cfg: the transformer's sizes, variant, patch embedding, conditioning and temporal positions.
        cond_channels: channels concatenated to x_t (0 decoder, 4 interpolation).
        image_embed_dim: size d of y_e, or 0 for a network not conditioned on it.
        context_tokens: y_e is projected into this many cross-attention tokens (0: no cross-attention).
        fps_cond: condition on frames per second (its embedding's last layer starts at zero).
        channels: channels of x_t and of the prediction (3: pixels; a VAE's latent channels in latent mode).
    """

    noise_level_embed = None  # the contract's SR conditioning; Latte serves D^t and ↑F

    def __init__(self, cfg: LatteConfig, *, cond_channels: int = 0, image_embed_dim: int = 0,
                 context_tokens: int = 0, fps_cond: bool = False, channels: int = 3) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.cfg = cfg
        self.channels = channels
        self.cond_channels = cond_channels
        self.context_tokens = context_tokens
        self.gradient_checkpointing = False
        d = cfg.width
        self.patches = Patches(cfg, channels + cond_channels, channels)
        self.time_proj = Timesteps(TIMESTEP_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(TIMESTEP_CHANNELS, d)
        self.image_proj = (nn.Sequential(nn.Linear(image_embed_dim, d), nn.SiLU(), nn.Linear(d, d))
                           if image_embed_dim else None)
        if context_tokens and not image_embed_dim:
            raise ValueError("context tokens need image_embed_dim")
        self.image_tokens = nn.Linear(image_embed_dim, context_tokens * d) if context_tokens else None
        self.fps_embed = ScalarEmbedding(d, scale=1.0) if fps_cond else None
        self.blocks = nn.ModuleList(SpatialBlock(cfg, cross=bool(context_tokens)) for _ in range(cfg.depth))
        self.temporal_blocks = nn.ModuleList(
            TemporalBlock(cfg) for _ in range(cfg.depth if cfg.variant in (1, 2) and cfg.temporal else 0)
        )
        self.final = FinalLayer(d, self.patches.out_dim, cfg.conditioning == "adaln")

    @property
    def temporal(self) -> bool:
        return self.cfg.temporal

    def enable_gradient_checkpointing(self) -> None:
        """Recompute every block's activations in the backward pass (as diffusers' models do)."""
        self.gradient_checkpointing = True

    def _condition(self, t: torch.Tensor, b: int, dtype: torch.dtype, image_embeds, fps) -> torch.Tensor:
        """c = emb(t) + MLP(y_e) + emb(fps), ``b d``."""
        t = t.expand(b) if t.ndim == 0 else t
        c = self.time_embed(self.time_proj(t).to(dtype))
        if self.image_proj is not None:
            if image_embeds is None:
                raise ValueError("this network is conditioned on image_embeds")
            c = c + self.image_proj(image_embeds.to(dtype))
        if self.fps_embed is not None:
            if fps is None:
                raise ValueError("this network is conditioned on fps")
            c = c + self.fps_embed(fps.to(c.device)).to(dtype)
        return c

    def _run(self, block: nn.Module, x: torch.Tensor, c: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, tokens, use_reentrant=False)
        return block(x, c, tokens)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        image_embeds: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        cond_frames: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: ``b channels f h w``; t: ``b`` or scalar; image_embeds: ``b d``; fps: ``b``; cond_frames:
        ``b cond_channels f h w``. Returns ``b channels f h w``."""
        if noise_level is not None:
            raise ValueError("a Latte network takes no noise_level (it serves D^t and ↑F, not super-resolution)")
        b, _, f, h, w = x.shape
        if self.cond_channels:
            if cond_frames is None or cond_frames.shape[1] != self.cond_channels:
                raise ValueError(f"expected cond_frames with {self.cond_channels} channels")
            x = torch.cat([x, cond_frames.to(x.dtype)], dim=1)
        c = self._condition(torch.as_tensor(t, device=x.device), b, x.dtype, image_embeds, fps)
        tokens = None
        if self.image_tokens is not None:
            tokens = rearrange(self.image_tokens(image_embeds.to(x.dtype)), "b (k d) -> b k d", k=self.context_tokens)
        stream = self.patches.embed_video(x)
        conditioned_by_token = self.cfg.conditioning == "tokens"
        if conditioned_by_token:
            stream = torch.cat([repeat(c, "b d -> b f 1 d", f=stream.shape[1]), stream], dim=2)
        temporal = self.temporal_blocks if stream.shape[1] > 1 else []  # one token frame never enters them
        if self.cfg.variant == 1:
            for spatial, block in zip(self.blocks, temporal or [None] * len(self.blocks)):
                stream = self._run(spatial, stream, c, tokens)
                if block is not None:
                    stream = self._run(block, stream, c, tokens)
        else:  # 2: the temporal blocks after all spatial ones; 3, 4: none apart
            for block in (*self.blocks, *temporal):
                stream = self._run(block, stream, c, tokens)
        if conditioned_by_token:
            stream = stream[:, :, 1:]
        return self.patches.unembed(self.final(stream, c), f, h, w)


def inflate(net: LatteVideo) -> LatteVideo:
    """A Latte trained on images made a video model, in place: its temporal parts added at identity
    (Make-A-Video's image → video step), so on any video it computes exactly what it computed. Returns it."""
    if net.cfg.temporal:
        raise ValueError("network already has its temporal parts")
    cfg = replace(net.cfg, temporal=True)
    device, dtype = next(net.parameters()).device, next(net.parameters()).dtype
    for block in net.blocks:
        block.add_temporal(cfg)
    if cfg.variant in (1, 2):
        net.temporal_blocks = nn.ModuleList(TemporalBlock(cfg) for _ in range(cfg.depth))
    net.cfg = cfg
    return net.to(device, dtype)


def widen_input(net: LatteVideo, cond_channels: int) -> LatteVideo:
    """A copy of ``net`` whose patch embedding reads ``cond_channels`` more input channels, their weights at
    zero: ↑F (3 masked RGB + 1 mask channels) starts from D^t computing exactly what D^t computed."""
    wide = copy.deepcopy(net)
    old = wide.patches.proj
    conv = type(old)(old.in_channels + cond_channels, old.out_channels, old.kernel_size, old.stride)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, : old.in_channels] = old.weight
        conv.bias.copy_(old.bias)
    conv = conv.to(old.weight.device, old.weight.dtype)
    if wide.patches.k == 1:
        wide.patches.embed.proj = conv
    else:
        wide.patches.embed = conv
    wide.cond_channels = net.cond_channels + cond_channels
    return wide
