"""Training objectives of every stage, following Make-A-Video's recipe (Sec. 3.4), in pure PyTorch,
and the one table of training stages (:data:`TRAINING_STAGES`).

No text–video pairs anywhere:
  * ``clip``: contrastive CLIP loss on text–image pairs;
  * ``prior``: (x_e, x̂) -> y_e on text–image pairs, the text dropped (replaced by the empty prompt)
    with probability ``cond_drop_prob`` for classifier-free guidance;
  * ``decoder``, ``sr-low``, ``sr-high`` on images alone: D conditioned on y_e of the image itself
    (zeroed with probability ``cond_drop_prob``), SR on its downsampled, noise-augmented copy;
  * ``decoder-video``, ``sr-low-video``: the image networks inflated (temporal layers at identity)
    and fine-tuned on unlabeled clips sampled at fps ∈ [fps_min, fps_max], the fps drawn from a beta
    distribution whose mass moves from high fps (little motion) to low fps (much motion); a clip's noise
    shares ρ = ``frame_noise.shared`` of its variance across frames (:func:`stages.noise.training_noise`);
  * ``interpolation``: D^t with 4 more input channels (masked frames + mask), trained to fill
    frames for interpolation at a random skip and extrapolation at a clip's start or end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stages import cascade, unclip
from stages.config import CascadeConfig, ConfigError, DiffusionConfig, FrameNoiseConfig
from stages import latent, latte
from stages.diffusion import training_loss, training_scheduler
from stages.noise import training_noise
from stages.temporal import inflate, temporal_parameter_names
from stages.unet import VideoUNet, widen_input


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    batch_size: int = 8             # samples per worker per step
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0           # linear learning-rate warm-up
    grad_clip: float = 1.0          # max gradient norm (0 disables)
    ema_decay: float = 0.999        # EMA of the weights, saved as the stage's inference weights
    max_steps: int = 1000
    checkpoint_every: int = 200     # steps between checkpoints (and at the end)
    log_every: int = 10
    bf16: bool = False              # bfloat16 autocast (GPUs)
    gradient_checkpointing: bool = False
    temporal_only: bool = False     # video stages: train only the layers inflation added
    temporal_lr_scale: float = 1.0  # video stages: learning-rate multiplier of the layers inflation added
    min_snr_gamma: float = 0.0      # Min-SNR-γ loss weighting (Hang et al., 2023); 0 weights every t alike
    frames: int = 16                # frames per training clip
    fps_min: int = 1
    fps_max: int = 30
    fps_beta: float = 4.0           # concentration of the fps schedule's beta distribution
    interp_skips: tuple[int, ...] = (2, 3, 5)  # frame skips ↑F trains on
    joint_images: int = 0           # decoder-video: still images from the image data trained beside every clip
                                    # (Latte's image–video joint training); spatial layers see them, temporal ones not
    extrapolation_prob: float = 0.3  # share of ↑F samples whose mask is a start/end extrapolation
    noise_aug_max: int = 250        # SR: condition noised to a timestep drawn from [0, noise_aug_max]
    cache_data: bool = True         # decode the data set once into Ray's object store (small data sets)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "checkpoint_every", "log_every", "frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.fps_min <= self.fps_max <= 30:
            raise ConfigError(f"need 1 <= fps_min <= fps_max <= 30, got {self.fps_min}, {self.fps_max}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.temporal_lr_scale <= 0:
            raise ConfigError(f"temporal_lr_scale must be > 0, got {self.temporal_lr_scale}")
        if self.min_snr_gamma < 0:
            raise ConfigError(f"min_snr_gamma must be >= 0, got {self.min_snr_gamma}")
        if self.joint_images < 0:
            raise ConfigError(f"joint_images must be >= 0, got {self.joint_images}")
        if not self.interp_skips or min(self.interp_skips) < 2:
            raise ConfigError("interp_skips must be a non-empty list of skips >= 2")


def sample_fps(progress: float, n: int, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """fps for ``n`` clips at training progress p ∈ [0, 1]: fps_min + (fps_max − fps_min)·u,
    u ~ Beta(1 + k(1 − p), 1 + k p): mostly high fps (little motion) early, low fps late."""
    p = min(max(progress, 0.0), 1.0)
    k = cfg.fps_beta
    beta = torch.distributions.Beta(torch.tensor(1 + k * (1 - p)), torch.tensor(1 + k * p))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        u = beta.sample((n,))
    return (cfg.fps_min + (cfg.fps_max - cfg.fps_min) * u).round().clamp(cfg.fps_min, cfg.fps_max)


def sample_clip(video: torch.Tensor, length: int, src_fps: float, fps: float, frames: int,
                generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """A ``frames``-frame clip ``c f h w`` from ``video`` (``c T h w``, first ``length`` valid) at about
    ``fps``: stride round(src_fps / fps), shortened if the video is too short. Returns (clip, actual fps)."""
    stride = max(1, round(src_fps / fps))
    stride = max(1, min(stride, (length - 1) // max(frames - 1, 1)))
    span = (frames - 1) * stride + 1
    if span > length:
        raise ValueError(f"video of {length} frames is too short for a {frames}-frame clip")
    start = int(torch.randint(0, length - span + 1, (1,), generator=generator))
    return video[:, start : start + span : stride], src_fps / stride


def interpolation_mask(frames: int, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Which frames ↑F is given (``f`` bool): every s-th frame, or a run at the start or the end."""
    if float(torch.rand((), generator=generator)) < cfg.extrapolation_prob:
        known = torch.zeros(frames, dtype=torch.bool)
        k = int(torch.randint(1, max(2, frames // 2), (1,), generator=generator))
        if float(torch.rand((), generator=generator)) < 0.5:
            known[:k] = True
        else:
            known[-k:] = True
        return known
    skip = cfg.interp_skips[int(torch.randint(0, len(cfg.interp_skips), (1,), generator=generator))]
    known = torch.zeros(frames, dtype=torch.bool)
    known[::skip] = True
    return known


def sample_clips(videos: torch.Tensor, lengths, src_fps, progress: float, cfg: TrainConfig,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.frames``-frame clips ``b c f h w`` of ``videos`` ``b c T h w`` (the first ``lengths[i]`` frames
    of each valid, recorded at ``src_fps[i]``) at fps drawn from the schedule at ``progress``; returns
    (clips, their actual fps ``b``)."""
    target = sample_fps(progress, len(videos), cfg, generator)
    clips, fps = [], []
    for video, n, src, f in zip(videos, lengths, src_fps, target.tolist()):
        clip, actual = sample_clip(video, int(n), float(src), f, cfg.frames, generator)
        clips.append(clip)
        fps.append(actual)
    return torch.stack(clips), torch.tensor(fps, dtype=torch.float32)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model  # DistributedDataParallel


def _drop(n: int, p: float, generator: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=generator) < p).to(device)


def clip_loss(clip_net: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (open_clip's ClipLoss), images ``b 3 h w`` in [-1, 1]."""
    from open_clip.loss import ClipLoss

    img, txt, scale = clip_net(images, tokens)
    return ClipLoss()(img, txt, scale)


def prior_loss(prior: nn.Module, clip: nn.Module, images: torch.Tensor, captions: list[str],
               cfg: DiffusionConfig, generator: torch.Generator, snr_gamma: float = 0.0) -> torch.Tensor:
    """Diffusion loss of P on y_e = CLIP_image(image) given (x_e, x̂) of its caption; captions are
    replaced by the empty prompt with probability ``cfg.cond_drop_prob``."""
    module = _unwrap(prior)
    drop = torch.rand(len(captions), generator=generator) < cfg.cond_drop_prob
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    with torch.no_grad():
        target = module.scale(clip.encode_image(images))
        text = cascade.encode_text(clip, captions)
    cond = {k: text[k].to(images.device) for k in ("text_embeds", "text_hidden", "text_mask")}
    return training_loss(prior, target, cfg=cfg, cond=cond, generator=generator, snr_gamma=snr_gamma)


def image_embeds(clip: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """y_e (unit norm, as P produces it) of images ``b 3 h w``."""
    with torch.no_grad():
        return F.normalize(clip.encode_image(frames).float(), dim=-1)


def decoder_loss(decoder: nn.Module, clip: nn.Module, video: torch.Tensor, fps: torch.Tensor,
                 cfg: DiffusionConfig, generator: torch.Generator, snr_gamma: float = 0.0,
                 shared: float = 0.0, target: torch.Tensor | None = None) -> torch.Tensor:
    """D on images (f = 1, fps 0) or D^t on clips ``b 3 f h w``, conditioned on y_e of the middle frame
    (zeroed with probability ``cfg.cond_drop_prob``); a clip's noise shares ρ = ``shared`` across frames.
    ``target``: what D^t diffuses when it is not the frames themselves (a latent D^t: their latents
    ``b c f h w``)."""
    middle = video[:, :, video.shape[2] // 2]
    drop = _drop(len(video), cfg.cond_drop_prob, generator, video.device)
    if getattr(_unwrap(decoder), "text_proj", None) is not None:  # an imported unCLIP decoder
        cond = unclip.training_condition(_unwrap(decoder), clip, middle, drop)
    else:
        y = image_embeds(clip, middle)
        cond = {"image_embeds": torch.where(drop[:, None], torch.zeros_like(y), y)}
    target = video if target is None else target
    return training_loss(decoder, target, cfg=cfg, cond={**cond, "fps": fps}, generator=generator,
                         noise=training_noise(target, generator, shared=shared), snr_gamma=snr_gamma)


def interpolation_loss(net: nn.Module, clip: nn.Module, video: torch.Tensor, fps: torch.Tensor,
                       known: torch.Tensor, cfg: DiffusionConfig, generator: torch.Generator,
                       snr_gamma: float = 0.0, shared: float = 0.0) -> torch.Tensor:
    """↑F: generate ``video`` (``b 3 f h w``) given its ``known`` (``b f``) frames and the mask channel;
    the noise shares ρ = ``shared`` across frames."""
    middle = video[:, :, video.shape[2] // 2]
    if getattr(_unwrap(net), "text_proj", None) is not None:  # ↑F of an imported unCLIP decoder
        y = unclip.training_condition(_unwrap(net), clip, middle, torch.zeros(len(video), dtype=torch.bool))
    else:
        y = {"image_embeds": image_embeds(clip, middle)}
    cond = {"cond_frames": cascade.infill_inputs(video, known), **y, "fps": fps}
    return training_loss(net, video, cfg=cfg, cond=cond, generator=generator,
                         noise=training_noise(video, generator, shared=shared), snr_gamma=snr_gamma)


def sr_loss(net: nn.Module, in_size: int, video: torch.Tensor, noise_aug_max: int, cfg: DiffusionConfig,
            generator: torch.Generator, snr_gamma: float = 0.0, shared: float = 0.0,
            low_res: str = "noised") -> torch.Tensor:
    """SR on ``b 3 f H W`` targets: the condition is the target downsampled to ``in_size``, upsampled
    back and noised to a random level t_aug ≤ ``noise_aug_max`` (given to the network); the noise of the
    target shares ρ = ``shared`` across frames. ``low_res`` unclip: upsampled bicubically, clean, as
    unCLIP's upsamplers take it (cascade.super_resolve_video)."""
    b, _, f, H, _ = video.shape
    if low_res == "unclip":
        cond = {"cond_frames": cascade.upsample(downsample_video(video, in_size).clamp(-1, 1), H, mode="bicubic"),
                "noise_level": torch.zeros(b, device=video.device)}
        return training_loss(net, video, cfg=cfg, cond=cond, generator=generator,
                             noise=training_noise(video, generator, shared=shared), snr_gamma=snr_gamma)
    frames = rearrange(video, "b c f h w -> (b f) c h w")
    low = F.interpolate(downsample(frames, in_size), size=(H, H), mode="bilinear", align_corners=False)
    low = rearrange(low, "(b f) c h w -> b c f h w", b=b)
    t_aug = torch.randint(0, noise_aug_max + 1, (b,), generator=generator).to(video.device)
    aug = torch.randn(low.shape, generator=generator).to(video.device, video.dtype)
    cond = {"cond_frames": training_scheduler(cfg).add_noise(low, aug, t_aug), "noise_level": t_aug.float()}
    return training_loss(net, video, cfg=cfg, cond=cond, generator=generator,
                         noise=training_noise(video, generator, shared=shared), snr_gamma=snr_gamma)


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area downsampling of ``b 3 h w`` (antialiased) to ``size``."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def downsample_video(video: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`downsample` of every frame of ``b 3 f h w``."""
    if video.shape[-1] == size:
        return video
    frames = downsample(rearrange(video, "b c f h w -> (b f) c h w"), size)
    return rearrange(frames, "(b f) c h w -> b c f h w", b=video.shape[0])


# -- the table of training stages ------------------------------------------------------------------

TEXT_IMAGE, IMAGES, VIDEOS = "text-image pairs", "images", "videos"  # what a training stage reads


@dataclass(frozen=True, kw_only=True)
class Samples:
    """One step's usable training items, on the device."""

    pixels: torch.Tensor          # b 3 f h w in [-1, 1]; an image is a video with f = 1
    fps: torch.Tensor             # b: each clip's frame rate; 0 for images
    captions: tuple[str, ...] = ()  # text–image pairs: one caption per item
    stills: torch.Tensor | None = None  # joint training: still images ``n 3 1 h w`` trained beside the clips


@dataclass(frozen=True, kw_only=True)
class LossContext:
    """What a stage's loss reads besides its network and samples."""

    stage_cfg: Any                # the stage's config (DecoderConfig, SRLowConfig, ...)
    train: TrainConfig
    generator: torch.Generator    # this worker's; every draw of the loss comes from it
    clip: nn.Module | None = None  # the frozen CLIP stage, for the stages that need it
    vae: nn.Module | None = None  # a latent D^t's frozen VAE (stages.latent), which encodes its training frames


def _frame_noise(stage_cfg) -> FrameNoiseConfig:
    """The stage's frame-noise config; independent noise for a stage whose output has no frames (SR_h)."""
    return getattr(stage_cfg, "frame_noise", None) or FrameNoiseConfig()


# Each stage's loss as the table calls it: (network, samples, context) -> the loss above with its arguments.

def _clip_step(model: nn.Module, x: Samples, ctx: LossContext) -> torch.Tensor:
    visual = _unwrap(model).model.visual.image_size
    tokens, _ = _unwrap(model).tokenize(list(x.captions))
    images = downsample(x.pixels[:, :, 0], visual[0] if isinstance(visual, tuple) else visual)
    return clip_loss(model, images, tokens.to(x.pixels.device))


def _prior_step(model: nn.Module, x: Samples, ctx: LossContext) -> torch.Tensor:
    return prior_loss(model, ctx.clip, x.pixels[:, :, 0], list(x.captions), ctx.stage_cfg.diffusion, ctx.generator,
                      ctx.train.min_snr_gamma)


def _latents(video: torch.Tensor, ctx: LossContext) -> torch.Tensor | None:
    """A latent D^t's target: the frames ``b 3 f h w`` encoded by its frozen VAE; None in pixel space."""
    if getattr(ctx.stage_cfg, "latent", None) is None:
        return None
    if ctx.vae is None:
        raise ValueError("this D^t diffuses latents: its loss needs the VAE (LossContext.vae)")
    return latent.encode(ctx.vae, video, ctx.stage_cfg.latent, ctx.generator)


def _decoder_step(model: nn.Module, x: Samples, ctx: LossContext) -> torch.Tensor:
    video = downsample_video(x.pixels, ctx.stage_cfg.size)
    loss = decoder_loss(model, ctx.clip, video, x.fps, ctx.stage_cfg.diffusion, ctx.generator,
                        ctx.train.min_snr_gamma, shared=_frame_noise(ctx.stage_cfg).shared,
                        target=_latents(video, ctx))
    if x.stills is None:
        return loss
    # Image–video joint training (Latte, Sec. 3.3): the still images go through the same network as one-frame
    # videos (fps 0, each conditioned on its own y_e), so they reach its spatial layers only; the loss is the
    # mean over every frame, the clips' and the images'. (The unwrapped network: DDP takes one forward a step.)
    stills = downsample_video(x.stills, ctx.stage_cfg.size)
    still_loss = decoder_loss(_unwrap(model), ctx.clip, stills, torch.zeros(len(stills), device=stills.device),
                              ctx.stage_cfg.diffusion, ctx.generator, ctx.train.min_snr_gamma,
                              target=_latents(stills, ctx))
    f, n = video.shape[2], len(stills) / len(video)
    return (f * loss + n * still_loss) / (f + n)


def _interpolation_step(model: nn.Module, x: Samples, ctx: LossContext) -> torch.Tensor:
    f = x.pixels.shape[2]
    known = torch.stack([interpolation_mask(f, ctx.train, ctx.generator) for _ in range(len(x.pixels))])
    return interpolation_loss(model, ctx.clip, x.pixels, x.fps, known.to(x.pixels.device), ctx.stage_cfg.diffusion,
                              ctx.generator, ctx.train.min_snr_gamma, shared=_frame_noise(ctx.stage_cfg).shared)


def _sr_step(model: nn.Module, x: Samples, ctx: LossContext) -> torch.Tensor:
    cfg = ctx.stage_cfg
    return sr_loss(model, cfg.in_size, downsample_video(x.pixels, cfg.out_size), ctx.train.noise_aug_max, cfg.diffusion,
                   ctx.generator, ctx.train.min_snr_gamma, shared=_frame_noise(cfg).shared, low_res=cfg.low_res)


def _clip_input_size(preset: CascadeConfig) -> int:
    return preset.clip.image_size if preset.clip.arch == "custom" else 224


@dataclass(frozen=True, kw_only=True)
class TrainingStage:
    """One ``mav train`` stage: what it produces, what it starts from, what it reads and how it learns."""

    name: str
    produces: str                 # the cascade stage it writes (stages.config.STAGE_NAMES)
    init: str | None = None       # the cascade stage it starts from (--init BUNDLE); None: fresh from the preset
    data: str                     # TEXT_IMAGE, IMAGES or VIDEOS
    data_size: Callable[[CascadeConfig], int]  # height = width of its training data, from the preset
    loss: Callable[[nn.Module, Samples, LossContext], torch.Tensor]
    needs_clip: bool = False      # its loss reads the frozen CLIP stage
    inflate: bool = False         # its network is made pseudo-3D (temporal layers at identity) unless it is already
    widen: int = 0                # input channels added to the network it starts from (zero-initialised)
    joint: bool = False           # may train still images beside its clips (TrainConfig.joint_images)

    @property
    def video(self) -> bool:
        return self.data == VIDEOS

    @property
    def temporal_only_allowed(self) -> bool:
        """Whether ``TrainConfig.temporal_only`` may freeze all but the temporal layers: a network inflated
        from a trained image network and gaining no new input channels."""
        return self.inflate and not self.widen


TRAINING_STAGES: dict[str, TrainingStage] = {s.name: s for s in (
    TrainingStage(name="clip", produces="clip", data=TEXT_IMAGE, data_size=_clip_input_size, loss=_clip_step),
    TrainingStage(name="prior", produces="prior", data=TEXT_IMAGE, data_size=_clip_input_size, loss=_prior_step,
                  needs_clip=True),
    TrainingStage(name="decoder", produces="decoder", data=IMAGES, data_size=lambda p: p.decoder.size,
                  loss=_decoder_step, needs_clip=True),
    TrainingStage(name="decoder-video", produces="decoder", init="decoder", data=VIDEOS,
                  data_size=lambda p: p.decoder.size, loss=_decoder_step, needs_clip=True, inflate=True, joint=True),
    TrainingStage(name="interpolation", produces="interpolation", init="decoder", data=VIDEOS,
                  data_size=lambda p: p.decoder.size, loss=_interpolation_step, needs_clip=True, inflate=True, widen=4),
    TrainingStage(name="sr-low", produces="sr_low", data=IMAGES, data_size=lambda p: p.sr_low.out_size, loss=_sr_step),
    TrainingStage(name="sr-low-video", produces="sr_low", init="sr_low", data=VIDEOS,
                  data_size=lambda p: p.sr_low.out_size, loss=_sr_step, inflate=True),
    TrainingStage(name="sr-high", produces="sr_high", data=IMAGES, data_size=lambda p: p.sr_high.out_size,
                  loss=_sr_step),
)}


def training_stage(name: str) -> TrainingStage:
    try:
        return TRAINING_STAGES[name]
    except KeyError:
        raise ConfigError(f"unknown training stage {name!r}; expected one of {', '.join(TRAINING_STAGES)}") from None


def image_config(cfg):
    """``cfg`` for training on images: the 2D network (no temporal layers) making independent frames;
    inflation and the frames' correlated noise come with video fine-tuning."""
    if hasattr(cfg, "unet"):
        cfg = replace(cfg, unet=replace(cfg.unet, temporal=False))
    if hasattr(cfg, "latte"):
        cfg = replace(cfg, latte=replace(cfg.latte, temporal=False))
    if hasattr(cfg, "frame_noise"):
        cfg = replace(cfg, frame_noise=FrameNoiseConfig())
    return cfg


def start_network(stage: TrainingStage, preset: CascadeConfig,
                  init: tuple[Any, nn.Module] | None = None) -> tuple[Any, nn.Module]:
    """(stage config, network) a fresh run of ``stage`` starts from: built from ``preset``, or from ``init``,
    the (config, network) of its trained ``stage.init`` stage, inflated and widened as the table says; the
    video stages take the preset's ``frame_noise``."""
    target = getattr(preset, stage.produces)
    if stage.init is None:  # an image stage
        cfg = image_config(target)
        return cfg, cascade.build_stage(stage.produces, cfg)
    if init is None:
        raise ConfigError(f"{stage.name} starts from a trained {stage.init} stage: pass --init BUNDLE")
    init_cfg, net = init
    if stage.widen and getattr(init_cfg, "latent", None) is not None:
        # ↑F reads and writes frames, a latent D^t's network latents: ↑F starts afresh from the preset, with
        # D^t's conditioning sizes.
        cfg = replace(target, image_embed_dim=init_cfg.image_embed_dim, context_tokens=init_cfg.context_tokens)
        return cfg, cascade.build_stage(stage.produces, cfg)
    is_latte = isinstance(net, latte.LatteVideo)
    if stage.inflate and not net.cfg.temporal:
        net = latte.inflate(net) if is_latte else inflate_network(net, kernel=target.unet.temporal_kernel,
                                                                  heads=target.unet.temporal_heads)
    network = {"backbone": "latte", "latte": net.cfg} if is_latte else {"unet": net.cfg}
    if stage.widen:
        # A new cascade stage: the preset's config, with the conditioning sizes and backbone of the network it
        # starts from.
        net = (latte.widen_input if is_latte else widen_input)(net, stage.widen)
        # From an imported unCLIP decoder, ↑F keeps its text conditioning and the schedule its output was
        # trained for (learned variance), as the importer's own ↑F does.
        unclip_parts = {"conditioning": "unclip", "diffusion": replace(init_cfg.diffusion, guidance=1.0)} \
            if getattr(init_cfg, "conditioning", "image") == "unclip" else {}
        return replace(target, image_embed_dim=init_cfg.image_embed_dim, context_tokens=init_cfg.context_tokens,
                       **network, **unclip_parts), net
    return replace(init_cfg, frame_noise=target.frame_noise, **network), net


def inflate_network(net: VideoUNet, *, kernel: int = 3, heads: int = 4) -> VideoUNet:
    """The image network made pseudo-3D in place (temporal layers at identity); returns it."""
    if net.cfg.temporal:
        raise ValueError("network is already pseudo-3D")
    net.frame_context = inflate(net.unet, kernel=kernel, heads=heads)
    net.cfg = replace(net.cfg, temporal=True, temporal_kernel=kernel, temporal_heads=heads)
    return net


def freeze_all_but_temporal(net: nn.Module) -> list[str]:
    """requires_grad only for the temporal layers; returns their names."""
    names = set(temporal_parameter_names(net))
    for name, p in net.named_parameters():
        p.requires_grad_(name in names)
    return sorted(names)


class EMA:
    """Exponential moving average of a network's parameters (and its buffers copied)."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        # Warm the average up (as in diffusers' EMAModel): early weights are forgotten fast.
        d = min(self.decay, (1 + step) / (10 + step))
        frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point and k not in frozen:  # frozen weights stay exactly as they are
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """An optimizer's state as (tensors for safetensors, JSON for the rest): no pickling needed."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], text: str) -> None:
    meta = json.loads(text)
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    # JSON turned tuples (e.g. Adam's betas) into lists; the optimizer expects them as they were.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def probe(stage: str, net: nn.Module) -> list[float]:
    """A fixed, seeded forward pass of a stage's network: four numbers that identify its weights.

    Used to check that a saved checkpoint computes what the trained in-memory network computed.
    """
    g = torch.Generator().manual_seed(1234)
    net = _unwrap(net)
    dev = next(net.parameters()).device
    with torch.no_grad():
        if stage == "clip":
            tokens, _ = net.tokenize(["a red circle on a white background"])
            out = net.encode_text(tokens.to(dev))[0]
        elif stage == "prior":
            d, n = net.embed_dim, net.transformer.config.num_embeddings
            out = net(torch.randn(1, d, generator=g).to(dev), torch.tensor([500], device=dev),
                      text_embeds=torch.randn(1, d, generator=g).to(dev),
                      text_hidden=torch.randn(1, n, d, generator=g).to(dev),
                      text_mask=torch.ones(1, n, dtype=torch.bool, device=dev))
        else:
            size = 8 * getattr(net.cfg, "patch_size", 1)  # whole patches for a Latte
            f = 2 * getattr(net.cfg, "frames_per_token", 1)  # whole tubelets for a Latte
            x = torch.randn(1, getattr(net, "channels", 3), f, size, size, generator=g).to(dev)
            kwargs = {}
            if net.image_proj is not None:
                kwargs["image_embeds"] = torch.randn(1, net.image_proj[0].in_features, generator=g).to(dev)
            if net.fps_embed is not None:
                kwargs["fps"] = torch.tensor([8.0], device=dev)
            if net.noise_level_embed is not None:
                kwargs["noise_level"] = torch.tensor([50.0], device=dev)
            if net.cond_channels:
                kwargs["cond_frames"] = torch.randn(1, net.cond_channels, f, size, size, generator=g).to(dev)
            proj = getattr(net, "text_proj", None)
            if proj is not None:  # an imported unCLIP D^t or ↑F: y_e, x_e and 5 text tokens of its widths
                d = proj.config.clip_embeddings_dim
                kwargs.update(image_embeds=torch.randn(1, d, generator=g).to(dev),
                              text_embeds=torch.randn(1, d, generator=g).to(dev),
                              text_hidden=torch.randn(1, 5, d, generator=g).to(dev),
                              text_mask=torch.ones(1, 5, dtype=torch.bool, device=dev))
            out = net(x, torch.tensor([500], device=dev), **kwargs)
    out = out.double()
    return [float(out.mean()), float(out.std()), float(out.abs().max()), float(out.flatten()[: 97].sum())]
