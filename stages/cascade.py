"""The inference cascade ŷ = SR_h ∘ SR_l^t ∘ ↑F ∘ D^t ∘ P ∘ (x̂, CLIP_text(x)), one function per stage.

Each function takes its network, batch-first tensors and one seed per sample, and samples through
the shared diffusion core. Videos are ``b c f h w`` in [-1, 1]. A sample's noise comes from
:func:`stages.diffusion.stage_generators`, so it depends on its seed and stage only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from stages.clip import ClipModel
from stages.config import STAGE_NAMES, DecoderConfig, InterpolationConfig, SRHighConfig, SRLowConfig
from stages.diffusion import Progress, add_noise, sample
from stages.noise import frame_noise, randn, stage_generators
from stages.latte import LatteVideo
from stages import latent
from stages import unclip
from stages.prior import PriorNet
from stages.unet import VideoUNet


def build_stage(name: str, cfg, *, seed: int = 0, unet2d: nn.Module | None = None) -> nn.Module:
    """A freshly initialised network for stage ``name``; the same ``seed`` gives the same weights everywhere.

    ``unet2d`` replaces the U-Net stages' fresh 2D U-Net (e.g. pretrained diffusers weights), inflated here.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + STAGE_NAMES.index(name))
        if name == "clip":
            if cfg.kind != "open_clip":
                raise ValueError(f"a {cfg.kind} CLIP stage is built from its bundle's files (stages.checkpoint)")
            return ClipModel(cfg)
        if name == "prior":
            return PriorNet(cfg, embed_dim=cfg.embed_dim, num_tokens=cfg.num_tokens)
        if name in ("decoder", "interpolation") and cfg.backbone == "latte":
            return LatteVideo(cfg.latte, cond_channels=4 if name == "interpolation" else 0,
                              image_embed_dim=cfg.image_embed_dim, context_tokens=cfg.context_tokens, fps_cond=True,
                              channels=getattr(cfg, "channels", 3))
        if name in STAGE_NAMES[2:] and unclip.wants_unclip_network(cfg):
            return unclip.build_network(name, cfg, unet2d)
        if name in ("decoder", "interpolation"):
            return VideoUNet(
                cfg.unet,
                cond_channels=4 if name == "interpolation" else 0,
                image_embed_dim=cfg.image_embed_dim,
                context_tokens=cfg.context_tokens,
                fps_cond=True,
                unet2d=unet2d,
                channels=getattr(cfg, "channels", 3),
            )
        if name in ("sr_low", "sr_high"):
            return VideoUNet(cfg.unet, cond_channels=3, noise_level_cond=True, unet2d=unet2d)
    raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}")


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def encode_text(clip: ClipModel, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """CLIP_text(x) and x̂: ``text_embeds`` (x_e, b d), ``text_hidden`` (b n d), ``text_mask`` (b n),
    ``truncated`` (b, bool: the prompt was longer than the context)."""
    tokens, truncated = clip.tokenize(list(prompts))
    pooled, hidden, mask = clip.encode_text(tokens.to(_device(clip)))
    return {
        "text_embeds": pooled.float(),
        "text_hidden": hidden.float(),
        "text_mask": mask,
        "truncated": torch.tensor(truncated),
    }


def generate_image_embeds(
    prior: PriorNet,
    text: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor],
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    guidance: float | torch.Tensor | None = None,
    progress: Progress | None = None,
    generators: Sequence[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """P: sample y_e ``b d`` (unit norm) given x_e and x̂; ``negative`` (e.g. the empty prompt) is the
    unconditional branch of classifier-free guidance. ``generators`` (one per sample) replace the seeds'
    own: every draw of this stage comes from them, in order; ``noise`` (``b d``) is the x_T to start from
    (None: drawn from them)."""
    dev, dt = _device(prior), _dtype(prior)
    keys = ("text_embeds", "text_hidden", "text_mask")
    cond = {k: text[k].to(dev) for k in keys}
    uncond = {k: negative[k].to(dev) for k in keys}
    gens = generators or stage_generators(seeds, "prior")
    noise = randn((prior.embed_dim,), gens, dev, dt) if noise is None else noise.to(dev, dt)
    x = sample(prior, noise, cfg=prior.cfg.diffusion, steps=steps, cond=cond, uncond=uncond, guidance=guidance,
               progress=progress, generators=gens)
    return prior.unscale(x.to(torch.promote_types(x.dtype, torch.float32)))  # at least float32


def decode(
    decoder: VideoUNet,
    cfg: DecoderConfig,
    image_embeds: torch.Tensor,
    fps: torch.Tensor,
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    guidance: float | torch.Tensor | None = None,
    motion: torch.Tensor | None = None,
    progress: Progress | None = None,
    noise: torch.Tensor | None = None,
    text: dict[str, torch.Tensor] | None = None,
    negative: dict[str, torch.Tensor] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    vae: nn.Module | None = None,
) -> torch.Tensor:
    """D^t: y_e ``b d`` and fps ``b`` -> ``b 3 frames size size``. The unconditional branch has y_e = 0
    (an unCLIP decoder's: its learned null embedding, and the ``negative`` prompt's text where the
    conditional branch has the prompt's ``text``: dicts of text_embeds, text_hidden, text_mask).

    ``motion`` (``b 2``, (dy, dx) in frame sizes per keyframe; NaN rows: none) is motion guidance: the
    initial noise's common part moves along that straight path (``stages.noise.frame_noise``), and what it
    lays out moves with it. Off by default: D^t's keyframes then move as its temporal layers learned.
    ``noise`` (``b 3 frames size size``) is the x_T to start from, e.g. a source video's DDIM inversion
    (``stages.inversion``); None: drawn from the seeds. ``generators`` as in :func:`generate_image_embeds`.

    In latent mode (``cfg.latent``) D^t samples latents ``b c frames h w`` (``noise`` is of that shape) and
    ``vae``, its frozen AutoencoderKL, decodes them frame by frame (``stages.latent.decode``)."""
    if cfg.latent is not None and vae is None:
        raise ValueError("this D^t diffuses latents: pass its VAE (stages.latent.load_vae)")
    dev, dt = _device(decoder), _dtype(decoder)
    image_embeds = image_embeds.to(dev, dt)
    fps = fps.to(dev, torch.float32)
    gens = generators or stage_generators(seeds, "decoder")
    if noise is None:
        noise = frame_noise((cfg.channels, cfg.frames, cfg.latent_size, cfg.latent_size), gens, dev, dt,
                            shared=cfg.frame_noise.sampling_shared, progressive=cfg.frame_noise.sample_progressive,
                            motion=motion)
    cond = {"image_embeds": image_embeds, "fps": fps}
    uncond = {"image_embeds": torch.zeros_like(image_embeds), "fps": fps}
    if getattr(decoder, "text_proj", None) is not None:
        cond.update(_text_cond(text, dev, dt))
        uncond.update(_text_cond(negative, dev, dt), image_embeds=decoder.null_image_embeds(len(image_embeds)).to(dev, dt))
    out = sample(decoder, noise.to(dev, dt), cfg=cfg.diffusion, steps=steps, cond=cond, uncond=uncond,
                 guidance=guidance, progress=progress, generators=gens)
    return out if cfg.latent is None else latent.decode(vae, out, cfg.latent)


def _text_cond(text: dict[str, torch.Tensor] | None, dev, dt) -> dict[str, torch.Tensor]:
    """The text an unCLIP-conditioned network reads (x_e, hidden states, mask), on its device."""
    if text is None:
        raise ValueError("this network is conditioned on the text: pass the prompt's (and the negative prompt's) encoding")
    return {"text_embeds": text["text_embeds"].to(dev, dt), "text_hidden": text["text_hidden"].to(dev, dt),
            "text_mask": text["text_mask"].to(dev)}


def infill_inputs(frames: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """↑F's condition: masked frames ``b 3 f h w`` and mask ``b f`` (True = given) -> ``b 4 f h w``."""
    mask = known.to(frames.dtype)[:, None, :, None, None]
    return torch.cat([frames * mask, mask.expand(-1, 1, -1, *frames.shape[-2:])], dim=1)


def infill(
    net: VideoUNet,
    cfg: InterpolationConfig,
    frames: torch.Tensor,
    known: torch.Tensor,
    image_embeds: torch.Tensor,
    fps: torch.Tensor,
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    progress: Progress | None = None,
    text: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """↑F in general form: generate the frames where ``known`` (``b f``) is False, given the others.
    (``text``: the prompt's encoding, which an unCLIP-conditioned ↑F reads as its decoder does.)

    Interpolation gives every ``skip``-th frame; extrapolation gives the first (or last) frames; image
    animation gives one frame. The given frames come out exactly as they went in, or, with
    ``cfg.keep_given_frames`` false, as ↑F renders them in the same sample as the frames it fills in (the
    network is trained to reproduce every frame, so both are one video: no step in brightness or outline
    where a given frame meets a generated one).
    """
    dev, dt = _device(net), _dtype(net)
    frames, known = frames.to(dev, dt), known.to(dev)
    cond = {
        "cond_frames": infill_inputs(frames, known),
        "image_embeds": image_embeds.to(dev, dt),
        "fps": fps.to(dev, torch.float32),
    }
    if getattr(net, "text_proj", None) is not None:
        cond.update(_text_cond(text, dev, dt))
    gens = stage_generators(seeds, "interpolation")
    noise = frame_noise(frames.shape[1:], gens, dev, dt,
                        shared=cfg.frame_noise.sampling_shared, progressive=cfg.frame_noise.sample_progressive)
    out = sample(net, noise, cfg=cfg.diffusion, steps=steps, cond=cond, progress=progress, generators=gens)
    if not cfg.keep_given_frames:
        return out
    keep = known[:, None, :, None, None]
    return torch.where(keep, frames, out)


def interpolate(
    net: VideoUNet,
    cfg: InterpolationConfig,
    keyframes: torch.Tensor,
    image_embeds: torch.Tensor,
    fps: torch.Tensor,
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    progress: Progress | None = None,
    text: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """↑F with frame skip s: ``b 3 F h w`` at fps -> ``b 3 ((F-1)s+1) h w`` at fps·s.

    Keyframe i lands at position i·s (unchanged unless ``cfg.keep_given_frames`` is false); the s−1
    frames between each pair are generated.
    """
    b, c, f, h, w = keyframes.shape
    s = cfg.skip
    n = (f - 1) * s + 1
    frames = keyframes.new_zeros(b, c, n, h, w)
    frames[:, :, ::s] = keyframes
    known = torch.zeros(b, n, dtype=torch.bool, device=keyframes.device)
    known[:, ::s] = True
    out_fps = fps * s
    video = infill(net, cfg, frames, known, image_embeds, out_fps, seeds, steps=steps, progress=progress, text=text)
    return video, out_fps


def upsample(video: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Bilinear (or antialiased bicubic) spatial upsampling of every frame: ``b c f h w`` -> ``b c f size size``."""
    b = video.shape[0]
    x = rearrange(video, "b c f h w -> (b f) c h w")
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # at least float32
    if mode == "bicubic":
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    else:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return rearrange(x, "(b f) c h w -> b c f h w", b=b).to(video.dtype)


def super_resolve_video(
    net: VideoUNet,
    cfg: SRLowConfig,
    video: torch.Tensor,
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    progress: Progress | None = None,
    generators: Sequence[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """SR_l^t: ``b 3 f in_size in_size`` -> ``b 3 f out_size out_size``, all frames at once (pseudo-3D).

    The condition is the bilinearly upsampled video, noised to ``cfg.noise_level`` (noise conditioning
    augmentation, as in Imagen/DALL-E 2 upsamplers), with the level given to the network; with
    ``low_res: unclip``, the video clamped to [-1, 1] and upsampled bicubically, clean (level 0), as
    unCLIP's pipeline conditions its upsamplers. ``generators`` and ``noise`` (x_T) as in
    :func:`generate_image_embeds`.
    """
    dev, dt = _device(net), _dtype(net)
    video = video.to(dev, dt)
    b, _, f = video.shape[:3]
    if cfg.low_res == "unclip":
        up = upsample(video.clamp(-1, 1), cfg.out_size, mode="bicubic")
        cond = {"cond_frames": up, "noise_level": torch.zeros(b, device=dev)}
    else:
        up = upsample(video, cfg.out_size)
        aug = randn(up.shape[1:], stage_generators(seeds, "sr_low/aug"), dev, dt)
        level = torch.full((b,), cfg.noise_level, dtype=torch.long, device=dev)
        cond = {"cond_frames": add_noise(cfg.diffusion, up, aug, level), "noise_level": level.float()}
    gens = generators or stage_generators(seeds, "sr_low")
    if noise is None:
        noise = frame_noise(up.shape[1:], gens, dev, dt,
                            shared=cfg.frame_noise.sampling_shared, progressive=cfg.frame_noise.sample_progressive)
    noise = noise.to(dev, dt)
    return sample(net, noise, cfg=cfg.diffusion, steps=steps, cond=cond, progress=progress, generators=gens)


def super_resolve_frames(
    net: VideoUNet,
    cfg: SRHighConfig,
    video: torch.Tensor,
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """SR_h: spatial super-resolution of every frame, ``b 3 f h w`` -> ``b 3 f out_size out_size``.

    Every frame of a video starts from the same noise (and the same augmentation noise), so identical
    input frames give identical output frames and the detail added does not flicker. Frames go through
    in chunks of ``cfg.frame_batch``.
    """
    dev, dt = _device(net), _dtype(net)
    video = video.to(dev, dt)
    b, c, f = video.shape[:3]
    size = cfg.out_size
    noise = randn((c, 1, size, size), stage_generators(seeds, "sr_high"), dev, dt)
    aug = randn((c, 1, size, size), stage_generators(seeds, "sr_high/aug"), dev, dt)
    frames = rearrange(video, "b c f h w -> (b f) c 1 h w")
    noise = repeat(noise, "b c 1 h w -> (b f) c 1 h w", f=f)
    aug = repeat(aug, "b c 1 h w -> (b f) c 1 h w", f=f)
    chunks = range(0, frames.shape[0], cfg.frame_batch)
    outs = []
    for i, start in enumerate(chunks):
        # Every pass has the same batch size (the last chunk is padded by repeating its last frame),
        # so a frame's result does not depend on which chunk it fell in, to the last bit.
        idx = torch.arange(start, start + cfg.frame_batch, device=dev).clamp(max=frames.shape[0] - 1)
        n = min(cfg.frame_batch, frames.shape[0] - start)
        if cfg.low_res == "unclip":
            up = upsample(frames[idx].clamp(-1, 1), size, mode="bicubic")
            cond = {"cond_frames": up, "noise_level": torch.zeros(up.shape[0], device=dev)}
        else:
            up = upsample(frames[idx], size)
            level = torch.full((up.shape[0],), cfg.noise_level, dtype=torch.long, device=dev)
            cond = {"cond_frames": add_noise(cfg.diffusion, up, aug[idx], level), "noise_level": level.float()}
        # An ancestral sampler's step noise: every frame of a video draws the same, as its initial noise.
        step_gens = [stage_generators([seeds[int(row) // f]], "sr_high/steps")[0] for row in idx]

        def chunk_progress(step: int, total: int, i=i) -> None:
            if progress is not None:
                progress(i * total + step, len(chunks) * total)

        outs.append(sample(net, noise[idx], cfg=cfg.diffusion, steps=steps, cond=cond, progress=chunk_progress,
                           generators=step_gens)[:n])
    return rearrange(torch.cat(outs), "(b f) c 1 h w -> b c f h w", b=b)

