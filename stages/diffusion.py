"""The one diffusion core every diffusion stage (P, D^t, ↑F, SR_l^t, SR_h) uses: schedules and loops.

Schedules come from diffusers: DDPM for the training forward process
q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), DDIM (η = 0) or DPM-Solver++ for sampling, or UnCLIPScheduler
(ancestral sampling with Karlo's step spacing, its noise drawn from per-sample generators). A network with
learned variance (``variance: learned_range``) outputs 2C channels: the prediction, then v (improved DDPM).
Classifier-free guidance (Ho & Salimans, 2022): ε̃ = ε(x_t, ∅) + w (ε(x_t, c) − ε(x_t, ∅)).

Networks are plain callables ``model(x_t, t, **cond) -> prediction``; they never sample. The noise a
sample starts from, or a loss trains on, is the caller's (``stages.noise``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from stages.config import DiffusionConfig

Progress = Callable[[int, int], None]


def training_scheduler(cfg: DiffusionConfig):
    """DDPM forward process (used for training noise and for noising SR conditions)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def sampling_scheduler(cfg: DiffusionConfig, sampler: str | None = None):
    """A fresh sampling scheduler (schedulers keep per-run state, so one per sampling loop)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UnCLIPScheduler

    sampler = sampler or cfg.sampler
    if sampler == "unclip":
        return UnCLIPScheduler(
            num_train_timesteps=cfg.train_timesteps,
            variance_type="learned_range" if cfg.variance == "learned_range" else "fixed_small_log",
            clip_sample=cfg.clip_sample,
            clip_sample_range=cfg.clip_sample_range,
            prediction_type=cfg.prediction_type,
            beta_schedule=cfg.beta_schedule,
        )
    common = dict(
        num_train_timesteps=cfg.train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        timestep_spacing="trailing",
    )
    if sampler == "ddim":
        return DDIMScheduler(clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range, set_alpha_to_one=True,
                             **common)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++",
            solver_order=2,
            thresholding=cfg.clip_sample,
            sample_max_value=cfg.clip_sample_range,
            dynamic_thresholding_ratio=1.0,
            lower_order_final=True,
            **common,
        )
    raise ValueError(f"unknown sampler {sampler!r}; expected ddim, dpm++ or unclip")


def _cat_cond(cond: dict, uncond: dict) -> dict:
    out = {}
    for k, v in cond.items():
        u = uncond.get(k, v)
        out[k] = torch.cat([v, u]) if isinstance(v, torch.Tensor) else v
    return out


def sample(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    *,
    cfg: DiffusionConfig,
    steps: int | None = None,
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance: float | torch.Tensor | None = None,
    progress: Progress | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` (x_T) to x_0.

    Args:
        model: ``model(x_t, t, **cond)`` returning the prediction named by ``cfg.prediction_type``.
        noise: x_T, any shape with the batch first.
        steps: sampling steps (default ``cfg.steps``).
        cond / uncond: conditioning keyword tensors (batch first) for the conditional and the
            unconditional pass; ``uncond`` entries default to the ``cond`` ones.
        guidance: w, a scalar or one value per sample (default ``cfg.guidance``); w = 1 everywhere
            skips the unconditional pass. With learned variance, w applies to the prediction and the
            variance is the conditional pass's (as unCLIP's decoder guides).
        generators: one per sample; an ancestral sampler (unclip) draws each step's noise from them.
    """
    cond = cond or {}
    steps = steps or cfg.steps
    if not 1 <= steps <= cfg.train_timesteps:
        raise ValueError(f"steps must be in 1..{cfg.train_timesteps}, got {steps}")
    b = noise.shape[0]
    w = torch.as_tensor(cfg.guidance if guidance is None else guidance, dtype=noise.dtype, device=noise.device)
    w = w.expand(b) if w.ndim == 0 else w
    guided = uncond is not None and bool((w != 1).any())
    w = w.view(b, *([1] * (noise.ndim - 1)))
    both = _cat_cond(cond, uncond) if guided else cond
    scheduler = sampling_scheduler(cfg)
    scheduler.set_timesteps(steps, device=noise.device)
    ancestral = cfg.sampler == "unclip"
    if ancestral and (generators is None or len(generators) != b):
        raise ValueError(f"the unclip sampler draws noise at every step: give one generator per sample ({b})")
    learned = cfg.variance == "learned_range"
    c = noise.shape[1]
    x = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if guided:
            out_c, out_u = model(torch.cat([x_in, x_in]), t.expand(2 * b), **both).chunk(2)
            pred_c, pred_u = out_c[:, :c], out_u[:, :c]
            pred = pred_u + w * (pred_c - pred_u)
            variance = out_c[:, c:]
        else:
            out = model(x_in, t.expand(b), **both)
            pred, variance = out[:, :c], out[:, c:]
        if ancestral:
            # UnCLIPScheduler reads the variance channels after the prediction, and the step it goes to.
            prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else None
            model_out = torch.cat([pred, variance], dim=1) if learned else pred
            x = scheduler.step(model_out, t, x, prev_timestep=prev, generator=list(generators), return_dict=False)[0]
        else:
            x = scheduler.step(pred, t, x, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, steps)
    return x


def add_noise(cfg: DiffusionConfig, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, for a per-sample timestep t (``b``)."""
    return training_scheduler(cfg).add_noise(x0, noise, t.to(x0.device))


def training_loss(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    *,
    cfg: DiffusionConfig,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    scheduler=None,
    snr_gamma: float = 0.0,
) -> torch.Tensor:
    """Simple diffusion loss E_{t, ε} ‖target − model(x_t, t, c)‖² (Ho et al., 2020, eq. 14).

    ``noise`` is ε (the caller's, e.g. frame-correlated, :func:`stages.noise.training_noise`); omitted, it
    is N(0, I) drawn from ``generator``. The target is ε, x_0 or v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 according to
    ``cfg.prediction_type``. ``snr_gamma`` > 0 weights each sample's loss by Min-SNR-γ (Hang et al., 2023):
    its x_0 error counts min(SNR_t, γ), so the nearly clean steps no longer dominate.
    Condition dropout for guidance is the caller's (it knows what "no condition" means for its stage).
    """
    scheduler = scheduler or training_scheduler(cfg)
    b = x0.shape[0]
    t = torch.randint(0, cfg.train_timesteps, (b,), generator=generator, device="cpu").to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, x0 {tuple(x0.shape)}")
    x_t = scheduler.add_noise(x0, noise, t)
    # A learned variance's channels follow the prediction; the simple loss trains the prediction alone.
    pred = model(x_t, t, **(cond or {}))[:, : x0.shape[1]]
    if cfg.prediction_type == "epsilon":
        target = noise
    elif cfg.prediction_type == "sample":
        target = x0
    else:
        target = scheduler.get_velocity(x0, noise, t)
    if not snr_gamma:
        return F.mse_loss(pred.float(), target.float())
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * min_snr_weight(scheduler, t, cfg.prediction_type, snr_gamma)).mean()


def min_snr_weight(scheduler, t: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Per-timestep loss weight giving x_0 errors the weight min(SNR_t, γ) whatever the target:
    the ε loss already weights them by SNR, the v loss by SNR + 1, the x_0 loss by 1."""
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "sample":
        return clipped
    return clipped / (snr + 1)
