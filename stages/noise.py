"""The noise the diffusion stages start from and train on, apart from the diffusion core.

* Per-sample generators: a sample's noise depends only on its own seed and the stage, never on its
  batch or actor (:func:`stage_generators`, :func:`randn`).
* Frame-correlated noise for videos ``b c f h w`` (PYoCo, Ge et al., 2023): mixed noise
  ε_i = √ρ ε_common + √(1 − ρ) ε_i^ind, whose per-frame part may be progressive (an AR(1) process over
  frames) when sampling (:func:`frame_noise`, :func:`training_noise`).
* Motion guidance (:func:`translated_noise`): the common part translated along a path the user gives,
  by integral noise warping (Chang et al., 2024) of a translation, as Go-with-the-Flow (Burgert et al.,
  2025) warps noise along a flow. Every frame stays exactly N(0, I).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

WARP_SUBPIXELS = 4  # fine noise samples per pixel side in :func:`translated_noise`


def stage_generators(seeds: Sequence[int], stage: str, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded from (prompt seed, stage name)."""
    gens = []
    for seed in seeds:
        digest = hashlib.sha256(f"{int(seed)}:{stage}".encode()).digest()
        gens.append(torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1)))
    return gens


def on_device(generator: torch.Generator, device) -> torch.Generator:
    """A generator that draws on ``device``: ``generator`` itself where it does, else a generator of that
    device seeded by one draw from ``generator`` (which advances it, so successive calls differ).

    Noise is then made where it is used, never copied from the CPU. A seed gives the same noise wherever the
    device type is the same: on the CPU the draws are those of ``generator`` itself, bit for bit; CUDA's
    Philox stream is the same on every GPU of one model and PyTorch version (GPUs with other multiprocessor
    counts may split large draws differently), and is not the CPU's stream.
    """
    device = torch.device(device)
    here = generator.device
    if device.type == here.type and (device.index is None or device.index == here.index):
        return generator
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: Sequence[int], generators: Sequence[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """``len(generators) x shape`` standard normal noise, one generator per sample, drawn on ``device``
    (:func:`on_device`) in float32."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=gen, device=gen.device, dtype=torch.float32)
         for gen in (on_device(g, device) for g in generators)]
    ).to(device=device, dtype=dtype)


def frame_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device, dtype=torch.float32, *,
                shared: float = 0.0, progressive: float = 0.0, motion: torch.Tensor | None = None) -> torch.Tensor:
    """``len(generators) x shape`` noise for videos ``c f h w``, N(0, I) per frame, correlated between frames.

    ``shared`` is ρ, the share of the variance common to every frame; ``progressive`` is r, the correlation
    of neighbouring frames' per-frame parts (frames k apart: r^k). ``motion`` (``b 2``, (dy, dx) in frame
    sizes per frame; a NaN row: none) translates each sample's common part along a straight path
    (:func:`translated_noise`), so what the noise lays out moves with it. ρ = r = 0 is :func:`randn` exactly.
    """
    b = len(generators)
    if motion is not None and motion.shape != (b, 2):
        raise ValueError(f"motion must be (batch, 2) = ({b}, 2), got {tuple(motion.shape)}")
    ind = progressive_frame_noise(randn(shape, generators, device, dtype), progressive)
    if not shared:
        if motion is not None and not torch.isnan(motion).all():
            raise ValueError("motion guidance moves the noise's common part, and this stage's frames share none: "
                             "its frame_noise.shared (or sample_shared) is 0")
        return ind
    c, f, h, w = shape
    commons = []
    for i, g in enumerate(generators):
        if motion is None or torch.isnan(motion[i]).any():
            commons.append(randn((c, 1, h, w), [g], device, dtype).expand(-1, -1, f, -1, -1))
        else:
            fine = randn(translation_field_shape(c, h, w), [g], device, dtype)
            commons.append(translated_noise(fine, motion_offsets(motion[i : i + 1], f, h, w), h, w))
    return mix_frame_noise(ind, torch.cat(commons), shared)


def training_noise(x0: torch.Tensor, generator: torch.Generator | None = None, *, shared: float = 0.0) -> torch.Tensor:
    """ε for a training batch ``x0``: for clips ``b c f h w`` with f > 1 the mixed noise of ρ = ``shared``
    (a common part drawn once per clip), otherwise plain N(0, I). Drawn on ``x0``'s device (:func:`on_device`;
    without a generator, the global one of that device)."""
    gen = on_device(generator, x0.device) if generator is not None else None
    noise = torch.randn(x0.shape, generator=gen, device=x0.device).to(x0.dtype)
    if not shared or x0.ndim != 5 or x0.shape[2] < 2:
        return noise
    b, c, _, h, w = x0.shape
    common = torch.randn((b, c, 1, h, w), generator=gen, device=x0.device).to(x0.dtype)
    return mix_frame_noise(noise, common, shared)


def progressive_frame_noise(ind: torch.Tensor, r: float) -> torch.Tensor:
    """Independent noise η ``b c f h w`` -> PYoCo's progressive noise: ε_0 = η_0,
    ε_i = r ε_{i−1} + √(1 − r²) η_i, still N(0, I) per frame, correlated r^|i − j| between frames i and j."""
    if not r or ind.shape[2] < 2:
        return ind
    frames = [ind[:, :, 0]]
    for i in range(1, ind.shape[2]):
        frames.append(r * frames[-1] + (1 - r * r) ** 0.5 * ind[:, :, i])
    return torch.stack(frames, dim=2)


def mix_frame_noise(ind: torch.Tensor, common: torch.Tensor, shared: float) -> torch.Tensor:
    """√ρ ``common`` (``b c 1 h w``, or one per frame) + √(1 − ρ) ``ind`` (``b c f h w``)."""
    return shared**0.5 * common + (1 - shared) ** 0.5 * ind


def motion_offsets(motion: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
    """A straight path: (dy, dx) ``b 2`` in frame sizes per frame -> pixel offsets ``b f 2`` from frame 0."""
    steps = torch.arange(frames, dtype=torch.float32)[None, :, None]
    return steps * motion.float().cpu()[:, None, :] * torch.tensor([h, w], dtype=torch.float32)


def translation_field_shape(c: int, h: int, w: int) -> tuple[int, int, int]:
    """The fine field :func:`translated_noise` takes for ``c h w`` frames: s² samples a pixel."""
    return c, h * WARP_SUBPIXELS, w * WARP_SUBPIXELS


def translated_noise(fine: torch.Tensor, offsets: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Integral noise warping for translations: frame k of sample i is the fine field ``fine``
    (``b c (h s) (w s)``, N(0, I), s = :data:`WARP_SUBPIXELS`) shifted by ``offsets[i, k]`` (``b f 2``,
    (dy, dx) pixels, rounded to 1/s, wrapping around the frame's edges), each pixel the sum of its s² fine
    samples over s. Every frame is exactly N(0, I), and content that moves by the offset sees the same noise
    in every frame."""
    s = WARP_SUBPIXELS
    b, c = fine.shape[:2]
    frames = offsets.shape[1]
    shifts = (offsets * s).round().long().cpu()
    out = fine.new_empty((b, c, frames, h, w))
    for i in range(b):
        for k in range(frames):
            moved = torch.roll(fine[i], shifts=(int(shifts[i, k, 0]), int(shifts[i, k, 1])), dims=(1, 2))
            out[i, :, k] = moved.reshape(c, h, s, w, s).sum(dim=(2, 4)) / s
    return out
