"""The video U-Net shared by D^t, ↑F, SR_l^t and SR_h: a diffusers 2D U-Net, inflated.

The network maps (noisy video x_t, timestep t, conditioning) to a prediction; it never samples.
Conditioning enters three ways:
  * y_e (CLIP image embedding): added to the timestep embedding, and as ``context_tokens`` extra
    cross-attention tokens (decoder and interpolation);
  * fps: a sinusoidal embedding added to the timestep embedding, its last layer zero-initialised so
    that adding it to a pretrained image network changes nothing at first;
  * frames on the channel axis (``cond_frames``): masked frames + mask for ↑F, the upsampled
    low-resolution video for SR (as improved-diffusion's SuperResModel), with a noise-level embedding;
  * or, for an imported unCLIP decoder (``text_proj``: diffusers' UnCLIPTextProjModel), y_e and x_e added
    to the timestep embedding and the context [y_e's extra tokens, the projected text tokens x̂] with the
    text's mask, y_e's unconditional value learned (:meth:`VideoUNet.null_image_embeds`).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from stages.attention import set_spatial_attention
from stages.config import UNetConfig
from stages.temporal import FrameContext, inflate

def sinusoidal(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``b`` scalars -> ``b dim`` sinusoidal features (as diffusers' Timesteps, flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ScalarEmbedding(nn.Module):
    """A scalar per sample (fps, noise level) -> a vector added to the timestep embedding; starts at zero."""

    def __init__(self, out_dim: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.dim = max(32, out_dim // 4)
        self.mlp = nn.Sequential(nn.Linear(self.dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal(value * self.scale, self.dim).to(self.mlp[0].weight.dtype))


def build_unet2d(cfg: UNetConfig, in_channels: int, out_channels: int = 3) -> nn.Module:
    """A diffusers 2D U-Net with an identity class embedding (the summed conditioning vector goes there)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    common = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        class_embed_type="identity",
    )
    if cfg.cross_attention_dim is None:
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
        return UNet2DModel(
            down_block_types=down,
            up_block_types=up,
            attention_head_dim=cfg.attention_head_dim,
            add_attention=any(cfg.attention),
            **common,
        )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
    heads = tuple(max(1, c // cfg.attention_head_dim) for c in cfg.block_out_channels)
    return UNet2DConditionModel(
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=heads,
        **common,
    )


class VideoUNet(nn.Module):
    """ε/x_0/v prediction over videos ``b c f h w`` (an image is a video with f = 1).

    Args:
        cfg: the U-Net's sizes and whether it is pseudo-3D.
        cond_channels: channels concatenated to x_t (0 decoder, 4 interpolation, 3 super-resolution).
        image_embed_dim: size d of y_e, or 0 for a network not conditioned on it.
        context_tokens: y_e is projected into this many cross-attention tokens.
        fps_cond: condition on frames per second.
        noise_level_cond: condition on the noise level of ``cond_frames`` (super-resolution).
        unet2d: a prebuilt (e.g. pretrained) diffusers 2D U-Net to inflate instead of a fresh one.
        text_proj: an UnCLIPTextProjModel: y_e and the text condition the network as unCLIP's decoder
            (with image_embed_dim = context_tokens = 0).
        channels: channels of x_t and of the prediction (3: pixels; a VAE's latent channels in latent mode).
    """

    def __init__(
        self,
        cfg: UNetConfig,
        *,
        cond_channels: int = 0,
        image_embed_dim: int = 0,
        context_tokens: int = 0,
        fps_cond: bool = False,
        noise_level_cond: bool = False,
        unet2d: nn.Module | None = None,
        text_proj: nn.Module | None = None,
        channels: int = 3,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.channels = channels
        self.text_proj = text_proj
        self.cond_channels = cond_channels
        self.context_tokens = context_tokens
        self.unet = unet2d if unet2d is not None else build_unet2d(cfg, channels + cond_channels, channels)
        if self.unet.config.in_channels != channels + cond_channels:
            raise ValueError(
                f"the 2D U-Net takes {self.unet.config.in_channels} input channels; expected {channels + cond_channels}"
            )
        if self.unet.class_embedding is None:
            # A pretrained U-Net without class conditioning: route the conditioning vector through an identity.
            self.unet.class_embedding = nn.Identity()
            self.unet.register_to_config(class_embed_type="identity")
        temb = self.unet.time_embedding.linear_2.out_features
        self.image_proj = (
            nn.Sequential(nn.Linear(image_embed_dim, temb), nn.SiLU(), nn.Linear(temb, temb)) if image_embed_dim else None
        )
        cross = getattr(self.unet.config, "cross_attention_dim", None)
        if context_tokens and not (image_embed_dim and cross):
            raise ValueError("context tokens need both image_embed_dim and a cross-attention U-Net")
        self.image_tokens = nn.Linear(image_embed_dim, context_tokens * cross) if context_tokens else None
        self.fps_embed = ScalarEmbedding(temb, scale=1.0) if fps_cond else None
        self.noise_level_embed = ScalarEmbedding(temb, scale=1.0) if noise_level_cond else None
        self.frame_context = (
            inflate(self.unet, kernel=cfg.temporal_kernel, heads=cfg.temporal_heads) if cfg.temporal else FrameContext()
        )
        if cfg.spatial_attention != "full":
            set_spatial_attention(self.unet, cfg.spatial_attention, self.frame_context)
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    @property
    def temporal(self) -> bool:
        return self.cfg.temporal

    def null_image_embeds(self, b: int) -> torch.Tensor:
        """y_e of the unconditional branch of guidance, ``b d``: zero, or unCLIP's learned embedding."""
        if self.text_proj is None:
            return torch.zeros(b, self.image_proj[0].in_features, device=self.image_proj[0].weight.device)
        null = self.text_proj.learned_classifier_free_guidance_embeddings
        return null.detach()[None].expand(b, -1)

    def set_temporal(self, enabled: bool) -> None:
        """Switch the temporal layers off (the network is then exactly the 2D network on each frame)."""
        self.frame_context.enabled = enabled

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        image_embeds: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        cond_frames: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        text_hidden: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: ``b 3 f h w``; t: ``b`` or scalar; image_embeds: ``b d``; fps, noise_level: ``b``;
        cond_frames: ``b cond_channels f h w``; with ``text_proj``: x_e ``text_embeds`` ``b d``, the text
        encoder's ``text_hidden`` ``b n d`` and ``text_mask`` ``b n``. Returns ``b 3 f h w`` (learned
        variance: ``b 6 f h w``)."""
        b, _, f, h, w = x.shape
        if self.cond_channels:
            if cond_frames is None or cond_frames.shape[1] != self.cond_channels:
                raise ValueError(f"expected cond_frames with {self.cond_channels} channels")
            x = torch.cat([x, cond_frames.to(x.dtype)], dim=1)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        temb = self.unet.time_embedding.linear_2.out_features
        cond = torch.zeros(b, temb, device=x.device, dtype=x.dtype)
        tokens = None
        if self.image_proj is not None:
            if image_embeds is None:
                raise ValueError("this network is conditioned on image_embeds")
            cond = cond + self.image_proj(image_embeds.to(x.dtype))
            if self.image_tokens is not None:
                tokens = rearrange(self.image_tokens(image_embeds.to(x.dtype)), "b (k d) -> b k d", k=self.context_tokens)
        mask = None
        if self.text_proj is not None:
            if image_embeds is None or text_embeds is None or text_hidden is None or text_mask is None:
                raise ValueError("this network is conditioned on image_embeds, text_embeds, text_hidden and text_mask")
            tokens, additive = self.text_proj(
                image_embeddings=image_embeds.to(x.dtype), prompt_embeds=text_embeds.to(x.dtype),
                text_encoder_hidden_states=text_hidden.to(x.dtype), do_classifier_free_guidance=False)
            cond = cond + additive
            mask = F.pad(text_mask.to(x.device).bool(), (self.text_proj.clip_extra_context_tokens, 0), value=True)
        if self.fps_embed is not None:
            if fps is None:
                raise ValueError("this network is conditioned on fps")
            cond = cond + self.fps_embed(fps.to(x.device))
        if self.noise_level_embed is not None:
            if noise_level is None:
                raise ValueError("this network is conditioned on noise_level")
            cond = cond + self.noise_level_embed(noise_level.to(x.device))
        kwargs = {"class_labels": repeat(cond, "b d -> (b f) d", f=f)}
        if getattr(self.unet.config, "cross_attention_dim", None):
            if tokens is None:
                tokens = torch.zeros(b, 1, self.unet.config.cross_attention_dim, device=x.device, dtype=x.dtype)
            kwargs["encoder_hidden_states"] = repeat(tokens, "b k d -> (b f) k d", f=f)
        if mask is not None:
            kwargs["attention_mask"] = repeat(mask, "b k -> (b f) k", f=f)
        frames = rearrange(x, "b c f h w -> (b f) c h w")
        with self._lock:
            self.frame_context.frames = f
            out = self.unet(frames, repeat(t, "b -> (b f)", f=f), return_dict=False, **kwargs)[0]
        return rearrange(out, "(b f) c h w -> b c f h w", b=b)


def widen_input(net: VideoUNet, cond_channels: int) -> VideoUNet:
    """A copy of ``net`` whose first conv takes ``cond_channels`` more input channels, initialised to zero.

    Used to start ↑F (3 masked RGB + 1 mask channels) from the decoder D^t: the copy computes exactly
    what ``net`` computed whatever the extra channels hold.
    """
    import copy

    wide = copy.deepcopy(net)
    conv = wide.unet.conv_in
    new = nn.Conv2d(conv.in_channels + cond_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : conv.in_channels] = conv.weight
        new.bias.copy_(conv.bias)
    wide.unet.conv_in = new
    wide.unet.register_to_config(in_channels=conv.in_channels + cond_channels)
    wide.cond_channels = net.cond_channels + cond_channels
    return wide
