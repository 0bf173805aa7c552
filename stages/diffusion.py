"""The one diffusion core every diffusion stage (P, D^t, ↑F, SR_l^t, SR_h) uses.

Schedules come from diffusers: DDPM for the training forward process
q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), DDIM (η = 0) or DPM-Solver++ for sampling.
Classifier-free guidance (Ho & Salimans, 2022): ε̃ = ε(x_t, ∅) + w (ε(x_t, c) − ε(x_t, ∅)).

Networks are plain callables ``model(x_t, t, **cond) -> prediction``; they never sample.
"""

from __future__ import annotations

import hashlib
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
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    sampler = sampler or cfg.sampler
    common = dict(
        num_train_timesteps=cfg.train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        timestep_spacing="trailing",
    )
    if sampler == "ddim":
        return DDIMScheduler(clip_sample=cfg.clip_sample, clip_sample_range=1.0, set_alpha_to_one=True, **common)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++",
            solver_order=2,
            thresholding=cfg.clip_sample,
            sample_max_value=1.0,
            dynamic_thresholding_ratio=1.0,
            lower_order_final=True,
            **common,
        )
    raise ValueError(f"unknown sampler {sampler!r}; expected ddim or dpm++")


def stage_generators(seeds: Sequence[int], stage: str, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded from (prompt seed, stage name).

    A sample's noise depends only on its own seed and the stage, never on its batch or actor.
    """
    gens = []
    for seed in seeds:
        digest = hashlib.sha256(f"{int(seed)}:{stage}".encode()).digest()
        gens.append(torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1)))
    return gens


def randn(shape: Sequence[int], generators: Sequence[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """``len(generators) x shape`` standard normal noise, one generator per sample."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    ).to(device=device, dtype=dtype)


def frame_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device, dtype=torch.float32,
                shared: float = 0.0, progressive: float = 0.0, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``len(generators) x shape`` noise for videos ``c f h w``, N(0, I) per frame but correlated between
    frames: PYoCo's (Ge et al., 2023) mixed noise, ε_i = √ρ ε_shared + √(1 − ρ) ε_i^ind with ρ = ``shared``,
    whose per-frame part is their progressive noise when r = ``progressive`` > 0 (see
    :func:`progressive_frame_noise`). The mixed part gives the frames of one sample a common layout; the
    progressive part lets it drift, neighbours correlated ρ + (1 − ρ) r, frames k apart ρ + (1 − ρ) r^k.
    With ``offsets`` (``b f 2`` pixels) the common part moves along them instead of staying put
    (:func:`warped_noise`). ρ = r = 0 is :func:`randn` exactly."""
    ind = progressive_frame_noise(randn(shape, generators, device, dtype), progressive)
    if not shared:
        return ind
    c, _, h, w = shape
    if offsets is None:
        common = randn((c, 1, h, w), generators, device, dtype)
    else:
        common = warped_noise(randn(warp_field_shape(c, h, w), generators, device, dtype), offsets.to(device), h, w)
    return mix_frame_noise(ind, common, shared)


def progressive_frame_noise(ind: torch.Tensor, r: float) -> torch.Tensor:
    """Independent noise η ``b c f h w`` -> PYoCo's progressive noise: ε_0 = η_0,
    ε_i = r ε_{i−1} + √(1 − r²) η_i, an AR(1) process over frames, still N(0, I) per frame, correlated
    r^|i − j| between frames i and j."""
    if not r or ind.shape[2] < 2:
        return ind
    frames = [ind[:, :, 0]]
    for i in range(1, ind.shape[2]):
        frames.append(r * frames[-1] + (1 - r * r) ** 0.5 * ind[:, :, i])
    return torch.stack(frames, dim=2)


def mix_frame_noise(ind: torch.Tensor, common: torch.Tensor, shared: float) -> torch.Tensor:
    """√ρ ``common`` (``b c 1 h w``, or one per frame) + √(1 − ρ) ``ind`` (``b c f h w``)."""
    return shared**0.5 * common + (1 - shared) ** 0.5 * ind


WARP_SUBPIXELS = 4  # fine noise samples per pixel side in :func:`warped_noise`


def warp_field_shape(c: int, h: int, w: int) -> tuple[int, int, int]:
    """The fine field :func:`warped_noise` takes for ``c h w`` frames: three frames a side, s² samples a pixel."""
    return c, 3 * h * WARP_SUBPIXELS, 3 * w * WARP_SUBPIXELS


def warped_noise(fine: torch.Tensor, offsets: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Integral noise warping (Chang et al., 2024) for translations: frame k of sample i is the window of
    the fine field ``fine`` (``b c (3h)s (3w)s``, N(0, I), s = :data:`WARP_SUBPIXELS`) moved by
    ``offsets[i, k]`` (``b f 2``, (dy, dx) pixels, rounded to 1/s), each pixel the sum of its s² fine
    samples over s. Every frame is exactly N(0, I); a pixel's noise moves with the offset, so content that
    moves by the offset sees the same noise in every frame. Offsets are clamped to one frame size."""
    s = WARP_SUBPIXELS
    b, c = fine.shape[:2]
    frames = offsets.shape[1]
    limit = torch.tensor([h, w], device=offsets.device, dtype=offsets.dtype)
    fine_px = (-offsets.clamp(-limit, limit) * s).round().long().cpu()
    out = fine.new_empty((b, c, frames, h, w))
    for i in range(b):
        for k in range(frames):
            y0, x0 = h * s + int(fine_px[i, k, 0]), w * s + int(fine_px[i, k, 1])
            window = fine[i, :, y0 : y0 + h * s, x0 : x0 + w * s]
            out[i, :, k] = window.reshape(c, h, s, w, s).sum(dim=(2, 4)) / s
    return out


def _foreground(video: torch.Tensor, threshold: float) -> torch.Tensor:
    """``b f h w`` weights of ``video``'s (``b c f h w``) pixels farther than ``threshold`` (summed over
    channels) from the clip's median colour, 0 elsewhere."""
    background = video.flatten(2).median(dim=2).values[:, :, None, None, None]
    weight = (video.float() - background.float()).abs().sum(1)
    return torch.where(weight > threshold, weight, torch.zeros_like(weight))


def _moments(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mass (``...``), centroid and standard deviation ((dy, dx) pixels, ``... 2``) of ``... h w`` weights."""
    h, w = weight.shape[-2:]
    coords = [torch.arange(n, dtype=torch.float32, device=weight.device) for n in (h, w)]
    mass = weight.sum(dim=(-2, -1))
    marginals = (weight.sum(-1), weight.sum(-2))
    centre = torch.stack([(m * c).sum(-1) for m, c in zip(marginals, coords)], -1) / mass.clamp_min(1e-6)[..., None]
    var = torch.stack([(m * (c - centre[..., i : i + 1]) ** 2).sum(-1)
                       for i, (m, c) in enumerate(zip(marginals, coords))], -1) / mass.clamp_min(1e-6)[..., None]
    return mass, centre, var.sqrt()


def content_track(video: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(dy, dx) pixels (``b f 2``) each frame's content has moved since the first frame of ``video``
    (``b c f h w`` in [-1, 1]): the centroid of its foreground, the pixels farther than ``threshold``
    (summed over channels) from the clip's median colour; a frame with no foreground keeps the last offset."""
    b, _, f, h, w = video.shape
    mass, centre, _ = _moments(_foreground(video, threshold))
    track = centre.clone()
    for k in range(f):
        last = track[:, k - 1] if k else torch.tensor([(h - 1) / 2, (w - 1) / 2], device=video.device)
        track[:, k] = torch.where(mass[:, k, None] > 0, centre[:, k], last)
    return track - track[:, :1]


def drift_offsets(first: torch.Tensor, frames: int, speed: Sequence[float], generators: Sequence[torch.Generator],
                  threshold: float = 0.1) -> torch.Tensor:
    """A path (``b f 2`` pixel offsets from the first frame) for noise that carries what ``first`` (``b c h w``
    in [-1, 1], each sample's first frame) shows as the shapes world carries its objects: the foreground's
    centroid moves in a straight line at a speed drawn uniformly from ``speed`` (low, high frame widths per
    frame) in a random direction, reflected where the foreground's extent (√3 standard deviations each side
    of the centroid, a square's or a uniform blob's half-width) meets the frame's edge. A first frame with
    no foreground moves as a point from the frame's centre."""
    b, _, h, w = first.shape
    if len(generators) != b:
        raise ValueError(f"drift_offsets needs one generator per first frame: {len(generators)} for {b}")
    mass, centre, std = _moments(_foreground(first[:, :, None], threshold)[:, 0])
    size = torch.tensor([h, w], dtype=torch.float32)
    half = torch.where(mass[:, None] > 0, 3**0.5 * std, torch.zeros_like(std)).cpu()
    centre = torch.where(mass[:, None] > 0, centre, (size - 1) / 2).cpu()
    # pixel i covers [i - 1/2, i + 1/2]: the centroid stays in [half - 1/2, size - 1/2 - half]
    low = (half - 0.5).clamp(max=(size - 1) / 2)
    span = (size - 1 - 2 * low).clamp_min(0)
    steps = torch.arange(frames, dtype=torch.float32)[:, None]
    paths = []
    for i, g in enumerate(generators):
        u = torch.rand(2, generator=g, device=g.device).cpu()
        angle = 2 * torch.pi * u[0]
        v = (speed[0] + (speed[1] - speed[0]) * u[1]) * torch.stack([torch.sin(angle), torch.cos(angle)]) * size
        raw = (centre[i] - low[i]) + v * steps
        folded = torch.remainder(raw, (2 * span[i]).clamp_min(1e-6))
        pos = torch.where(span[i] > 0, torch.where(folded > span[i], 2 * span[i] - folded, folded), raw[:1])
        paths.append(pos - pos[:1])
    return torch.stack(paths)


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
) -> torch.Tensor:
    """Run the reverse process from ``noise`` (x_T) to x_0.

    Args:
        model: ``model(x_t, t, **cond)`` returning the prediction named by ``cfg.prediction_type``.
        noise: x_T, any shape with the batch first.
        steps: sampling steps (default ``cfg.steps``).
        cond / uncond: conditioning keyword tensors (batch first) for the conditional and the
            unconditional pass; ``uncond`` entries default to the ``cond`` ones.
        guidance: w, a scalar or one value per sample (default ``cfg.guidance``); w = 1 everywhere
            skips the unconditional pass.
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
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if guided:
            pred_c, pred_u = model(torch.cat([x_in, x_in]), t.expand(2 * b), **both).chunk(2)
            pred = pred_u + w * (pred_c - pred_u)
        else:
            pred = model(x_in, t.expand(b), **both)
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
    scheduler=None,
    snr_gamma: float = 0.0,
) -> torch.Tensor:
    """Simple diffusion loss E_{t, ε} ‖target − model(x_t, t, c)‖² (Ho et al., 2020, eq. 14).

    The target is ε, x_0 or v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 according to ``cfg.prediction_type``; a video's
    ε is correlated across frames by ``cfg.frame_noise_shared`` and ``cfg.frame_noise_progressive`` (see
    :func:`frame_noise`); with ``cfg.frame_noise_flow`` the common part moves with the clip's content
    (:func:`content_track`, :func:`warped_noise`), as Go-with-the-Flow (Burgert et al., 2025) warps noise
    along a training video's optical flow, so that noise drifting at sampling moves what is drawn.
    ``snr_gamma`` > 0 weights each sample's loss by Min-SNR-γ (Hang et al., 2023): its x_0 error counts
    min(SNR_t, γ), so the nearly clean steps no longer dominate and the noisy steps, where the layout
    (and a video's motion) is decided, learn faster.
    Condition dropout for guidance is the caller's (it knows what "no condition" means for its stage).
    """
    scheduler = scheduler or training_scheduler(cfg)
    b = x0.shape[0]
    t = torch.randint(0, cfg.train_timesteps, (b,), generator=generator, device="cpu").to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
    if x0.ndim == 5:
        noise = progressive_frame_noise(noise, cfg.frame_noise_progressive)
    if cfg.frame_noise_shared and x0.ndim == 5 and x0.shape[2] > 1:
        b, c, _, h, w = x0.shape
        if cfg.frame_noise_flow:
            fine = torch.randn((b, *warp_field_shape(c, h, w)), generator=generator, device="cpu").to(x0.device, x0.dtype)
            common = warped_noise(fine, content_track(x0), h, w)
        else:
            common = torch.randn((b, c, 1, h, w), generator=generator, device="cpu").to(x0.device, x0.dtype)
        noise = mix_frame_noise(noise, common, cfg.frame_noise_shared)
    x_t = scheduler.add_noise(x0, noise, t)
    pred = model(x_t, t, **(cond or {}))
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
