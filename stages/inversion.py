"""DDIM inversion: the noise x_T from which DDIM sampling gives back a given x_0.

DDIM's update (Song et al., 2021, eq. 12, η = 0) is a deterministic map x_t -> x_{t−Δ}; run from t = 0 upward
with ε evaluated at the next timestep (eq. 13 read as an ODE, as Null-text inversion, Mokady et al., 2023,
and Tune-A-Video, Wu et al., 2023, use it), it maps a video to noise that samples back to about that video:

    x_{t+Δ} = √ᾱ_{t+Δ} x̂_0(x_t) + √(1 − ᾱ_{t+Δ}) ε(x_t, t + Δ),   x̂_0(x_t) = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t

The steps are diffusers' ``DDIMInverseScheduler`` on the sampling schedule's timesteps, reversed. A tuned
source (:class:`Inversion`) keeps D^t's keyframes, their condition y_e, their fps and their inverted noise,
saved as safetensors beside the tuned network.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace

import safetensors.torch
import torch

from stages.config import DecoderConfig, DiffusionConfig
from stages.diffusion import Progress
from stages.fsio import join, read_bytes, write_bytes_atomic

INVERSION_FILE = "inversion.safetensors"


def invertible(cfg: DiffusionConfig) -> DiffusionConfig:
    """``cfg`` sampling with DDIM (η = 0), the sampler :func:`invert` undoes. Predicted x_0 stays clamped as
    ``cfg`` says: at the schedule's last timestep √ᾱ_T is near 0, and the clamp is what keeps the first
    sampling step's x̂_0 = (x_T − √(1 − ᾱ_T) ε) / √ᾱ_T from amplifying the inversion's error."""
    return replace(cfg, sampler="ddim")


def inverse_scheduler(cfg: DiffusionConfig):
    """DDIM run backwards on the timesteps ``stages.diffusion.sampling_scheduler`` samples at."""
    from diffusers import DDIMInverseScheduler

    return DDIMInverseScheduler(
        num_train_timesteps=cfg.train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )


def invert(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    *,
    cfg: DiffusionConfig,
    steps: int | None = None,
    cond: dict | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """x_0 -> x_T under ``cond`` (no guidance): the noise that ``stages.diffusion.sample`` with
    :func:`invertible` ``cfg``, the same ``steps`` and the same ``cond`` (guidance 1) turns back into about x_0."""
    steps = steps or cfg.steps
    if not 1 <= steps <= cfg.train_timesteps:
        raise ValueError(f"steps must be in 1..{cfg.train_timesteps}, got {steps}")
    scheduler = inverse_scheduler(cfg)
    scheduler.set_timesteps(steps, device=x0.device)
    b = x0.shape[0]
    x = x0
    for i, t in enumerate(scheduler.timesteps):
        pred = model(x, t.expand(b), **(cond or {}))
        x = scheduler.step(pred, t, x, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, steps)
    return x


@dataclass(frozen=True, kw_only=True)
class Inversion:
    """A source video as D^t sees it, and its inverted noise."""

    keyframes: torch.Tensor     # 1 3 f h w in [-1, 1]: D^t's frame count at its size
    image_embeds: torch.Tensor  # 1 d: the source condition y_e the network was tuned and inverted under
    fps: float                  # keyframe rate D^t is conditioned on
    steps: int                  # DDIM steps of the inversion
    noise: torch.Tensor         # 1 3 f h w: x_T


def invert_keyframes(decoder: torch.nn.Module, cfg: DecoderConfig, keyframes: torch.Tensor, image_embeds: torch.Tensor,
                     fps: float, *, steps: int | None = None, progress: Progress | None = None) -> Inversion:
    """D^t's DDIM inversion of ``keyframes`` (``1 3 frames size size`` in [-1, 1]) under y_e ``image_embeds``
    (``1 d``) and ``fps``."""
    dev = next(decoder.parameters()).device
    dt = next(decoder.parameters()).dtype
    steps = steps or cfg.diffusion.steps
    cond = {"image_embeds": image_embeds.to(dev, dt), "fps": torch.tensor([float(fps)], device=dev)}
    noise = invert(decoder, keyframes.to(dev, dt), cfg=cfg.diffusion, steps=steps, cond=cond, progress=progress)
    return Inversion(keyframes=keyframes.cpu().float(), image_embeds=image_embeds.cpu().float(), fps=float(fps),
                     steps=steps, noise=noise.cpu().float())


def save_inversion(url: str, inversion: Inversion) -> str:
    """Write ``inversion`` as ``url/inversion.safetensors``; returns its URL."""
    path = join(url, INVERSION_FILE)
    tensors = {k: getattr(inversion, k).contiguous() for k in ("keyframes", "image_embeds", "noise")}
    meta = {"fps": json.dumps(inversion.fps), "steps": json.dumps(inversion.steps)}
    write_bytes_atomic(path, safetensors.torch.save(tensors, metadata=meta))
    return path


def load_inversion(url: str) -> Inversion | None:
    """The inversion saved in bundle ``url``, or None if it holds none."""
    try:
        data = read_bytes(join(url, INVERSION_FILE))
    except FileNotFoundError:
        return None
    tensors = safetensors.torch.load(data)
    # safetensors' header: its length (8 bytes, little-endian), then JSON whose __metadata__ holds our strings
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = header.get("__metadata__", {})
    return Inversion(keyframes=tensors["keyframes"], image_embeds=tensors["image_embeds"],
                     fps=float(json.loads(meta["fps"])), steps=int(json.loads(meta["steps"])), noise=tensors["noise"])
