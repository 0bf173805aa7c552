"""One-shot tuning of D^t on a single video (Tune-A-Video, Wu et al., 2023, Sec. 4): what it starts from,
which parameters it trains, and its training stage for the shared loop.

The network is D^t of a bundle with sparse-causal spatial attention (``stages.attention``) and DDIM as its
sampler (the sampler ``stages.inversion`` undoes). The loss is the stage's own diffusion loss on the one
clip's keyframes, always under one condition y_e: the source's. What it trains (:data:`TRAINABLE`):

  * ``queries``: the query projections W^Q of every spatial self- and cross-attention, and the temporal
    attention (the paper's choice: the rest of the image network's knowledge stays as it was);
  * ``temporal``: the layers inflation added (temporal convs and attention);
  * ``all``: every parameter of D^t.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn

from stages.attention import use_spatial_attention
from stages.config import ConfigError
from stages.diffusion import training_loss
from stages.inversion import invertible
from stages.noise import training_noise
from stages.temporal import temporal_parameter_names
from stages.training import VIDEOS, LossContext, Samples, TrainingStage, downsample_video

TRAINABLE = ("queries", "temporal", "all")


def start_tuning(cfg, net: nn.Module) -> tuple[object, nn.Module]:
    """(config, network) a tuning run starts from: D^t of any bundle, switched to sparse-causal attention
    and DDIM sampling, its weights unchanged."""
    if not hasattr(net, "unet") or not hasattr(net, "frame_context"):
        raise ConfigError(f"tuning needs a U-Net decoder D^t (stages.unet.VideoUNet); this bundle's is a "
                          f"{type(net).__name__}")
    if getattr(cfg, "latent", None) is not None:
        raise ConfigError("tuning needs a pixel-space decoder D^t; this bundle's diffuses a VAE's latents")
    if not net.cfg.temporal:
        raise ConfigError("tuning needs a pseudo-3D decoder D^t (unet.temporal true): train decoder-video first")
    net = use_spatial_attention(net, "sparse_causal")
    return replace(cfg, unet=net.cfg, diffusion=invertible(cfg.diffusion)), net


def trainable_parameters(net: nn.Module, which: str) -> list[str]:
    """Names of the parameters of D^t that tuning ``which`` (:data:`TRAINABLE`) trains, sorted."""
    from diffusers.models.attention_processor import Attention

    names = [n for n, _ in net.named_parameters()]
    if which == "all":
        return sorted(names)
    temporal = set(temporal_parameter_names(net))
    if which == "temporal":
        return sorted(temporal)
    if which != "queries":
        raise ConfigError(f"unknown choice of parameters to train {which!r}; expected one of {', '.join(TRAINABLE)}")
    queries = {f"{m}.to_q." for m, module in net.named_modules() if isinstance(module, Attention)}
    return sorted(n for n in names if ".temporal_attn." in n or any(n.startswith(q) for q in queries))


def freeze_all_but(net: nn.Module, names) -> None:
    """requires_grad for the parameters named in ``names`` only."""
    names = set(names)
    for name, p in net.named_parameters():
        p.requires_grad_(name in names)


def tuning_loss(model: nn.Module, x: Samples, ctx: LossContext, *, image_embeds: tuple[float, ...]) -> torch.Tensor:
    """D^t's diffusion loss on the clip ``x.pixels`` (``b 3 f h w``) under the source condition y_e
    ``image_embeds`` (never dropped: tuning learns this video under this condition)."""
    cfg = ctx.stage_cfg
    video = downsample_video(x.pixels, cfg.size)
    y = torch.tensor(image_embeds, dtype=video.dtype, device=video.device).expand(len(video), -1)
    return training_loss(model, video, cfg=cfg.diffusion, cond={"image_embeds": y, "fps": x.fps},
                         generator=ctx.generator, noise=training_noise(video, ctx.generator,
                                                                       shared=cfg.frame_noise.shared),
                         snr_gamma=ctx.train.min_snr_gamma)


def tuning_stage(image_embeds: torch.Tensor) -> TrainingStage:
    """The training stage of one tuning run: D^t from D^t, on one video's keyframes, under y_e ``image_embeds``
    (``d`` or ``1 d``)."""
    y = tuple(float(v) for v in image_embeds.flatten())
    return TrainingStage(name="tune", produces="decoder", init="decoder", data=VIDEOS,
                         data_size=lambda preset: preset.decoder.size, loss=partial(tuning_loss, image_embeds=y))
