"""Device memory a stage needs, estimated from its config before it runs, and what fits on a device.

A U-Net pass over N = batch × frames frames of ``size``² holds its skip connections (conv_in, every
down block's ResNet outputs and downsamplings) while the up path works on at most ``WORKING`` activations of
its widest level; a training step keeps about ``SAVED`` tensors per block output for the backward pass (with
gradient checkpointing, on these small networks, about half of that), and per parameter its weight, gradient, two Adam moments and the EMA copy. The constants are fitted to peaks measured
on the CPU (``torch.distributed._tools.mem_tracker``); ``tests/stages/test_memory.py`` holds the estimate
within a factor of 2 of the measured peak.

SR_l^t runs its frames in overlapping windows where a video does not fit (:class:`FrameWindows`); SR_h's
frames per pass come from :func:`largest_fitting`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from stages.config import UNetConfig
from stages.errors import UserError

GIB = 2**30
WORKING = 11       # activations of the widest level alive at once in the up path (concat, norm, conv, residual)
SAVED = 14         # tensors saved for backward per ResNet/attention block output (pseudo-3D: conv, temporal conv, norms)
CHECKPOINTED = 0.5  # share of those a training step with gradient checkpointing holds at its peak (recompute + gradients)
TRAIN_BYTES_PER_PARAM = 4 + 4 + 8 + 4   # weight, gradient, Adam's two moments, EMA (float32)
HEADROOM = 0.9     # share of the free memory a stage may plan to use
WINDOW_OVERLAP = 8  # frames neighbouring SR_l^t windows share (FrameWindows)


class MemoryBudgetError(UserError):
    """A stage's batch needs more memory than its device has free."""


def value_bytes(dtype: torch.dtype) -> float:
    """Bytes per activation value: under bf16 autocast convolutions and matmuls give bf16 and norms float32."""
    return 3.0 if dtype == torch.bfloat16 else float(torch.finfo(dtype).bits // 8)


def _levels(cfg: UNetConfig, size: int) -> list[int]:
    """Elements per frame of one activation at each resolution level: c_i · (size / 2^i)²."""
    return [c * max(1, size >> i) ** 2 for i, c in enumerate(cfg.block_out_channels)]


def unet_activation_bytes(cfg: UNetConfig, *, frames: int, size: int, training: bool = False,
                          gradient_checkpointing: bool = False, dtype: torch.dtype = torch.float32) -> int:
    """Peak activation memory of one U-Net pass over ``frames`` = batch × frames frames of ``size``²."""
    levels = _levels(cfg, size)
    n = cfg.layers_per_block
    skips = levels[0] + sum(n * a + (a // 4 if i < len(levels) - 1 else 0) for i, a in enumerate(levels))
    if not training:
        per_frame = skips + WORKING * max(levels)
    else:
        outputs = sum((2 * n + 1) * a for a in levels) + 2 * levels[-1]  # down, up (one more each) and mid blocks
        per_frame = SAVED * outputs * (CHECKPOINTED if gradient_checkpointing else 1)
    return int(frames * per_frame * value_bytes(dtype))


def parameter_count(build: Callable[[], nn.Module]) -> int:
    """Parameters of the network ``build()`` makes, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        net = build()
    return sum(p.numel() for p in net.parameters())


def estimate_bytes(params: int, cfg: UNetConfig | None, *, frames: int, size: int, training: bool = False,
                   gradient_checkpointing: bool = False, dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes of a stage: its parameters (with gradients, Adam and EMA when ``training``; under bf16
    autocast a bf16 copy too) plus a U-Net pass's activations (none counted for other networks)."""
    weights = params * (TRAIN_BYTES_PER_PARAM if training else 4 + (2 if dtype == torch.bfloat16 else 0))
    if cfg is None:
        return weights
    return weights + unet_activation_bytes(cfg, frames=frames, size=size, training=training,
                                           gradient_checkpointing=gradient_checkpointing, dtype=dtype)


def free_bytes(device: torch.device | str) -> int:
    """Memory free for a stage on ``device``: the CUDA device's free memory, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(what: str, need: int, device: torch.device | str, remedy: str, *, free: int | None = None) -> None:
    """Raise :class:`MemoryBudgetError` naming ``what`` and ``remedy`` if ``need`` bytes exceed the
    planning share of ``device``'s free memory."""
    free = free_bytes(device) if free is None else free
    if need > HEADROOM * free:
        raise MemoryBudgetError(f"{what} needs about {need / GIB:.1f} GiB and {device} has {free / GIB:.1f} GiB free: "
                                f"{remedy}")


def largest_fitting(need: Callable[[int], int], upper: int, budget: float) -> int:
    """The largest n in 1..``upper`` with ``need(n)`` <= ``budget`` (``need`` grows with n), or 0 if none."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class FrameWindows(nn.Module):
    """``net`` over a video's frames in overlapping windows of ``window`` frames, blended: the network
    callable SR_l^t samples with when a whole video does not fit.

    Windows start every ``window − overlap`` frames (the last one ends at the last frame). Each frame's
    prediction is the average of the windows holding it, weighted by a ramp that falls towards a window's
    edges (weight k + 1 at k frames from an edge, capped at ``overlap`` + 1), so the temporal layers of every window see neighbours on both sides of what it
    mostly decides and no seam shows where windows meet. Per-frame networks give exactly the unchunked
    result; trained temporal layers see at most ``window`` frames, where the unchunked pass sees all.
    """

    def __init__(self, net: nn.Module, window: int, overlap: int) -> None:
        super().__init__()
        if window < 2 or not 0 <= overlap < window:
            raise ValueError(f"need window >= 2 and 0 <= overlap < window, got window={window}, overlap={overlap}")
        self.net, self.window, self.overlap = net, window, overlap

    def starts(self, frames: int) -> list[int]:
        if frames <= self.window:
            return [0]
        step = self.window - self.overlap
        starts = list(range(0, frames - self.window, step))
        return [*starts, frames - self.window]

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """x: ``b c f h w``; every ``cond`` tensor with 5 dims is windowed along its frame axis too."""
        f = x.shape[2]
        starts = self.starts(f)
        if len(starts) == 1:
            return self.net(x, t, **cond)
        out = None
        total = x.new_zeros(f)
        ramp = torch.arange(self.window, device=x.device, dtype=x.dtype)
        ramp = (torch.minimum(ramp, ramp.flip(0)) + 1).clamp(max=self.overlap + 1)
        for s in starts:
            part = {k: v[:, :, s : s + self.window] if torch.is_tensor(v) and v.ndim == 5 else v for k, v in cond.items()}
            pred = self.net(x[:, :, s : s + self.window], t, **part)
            if out is None:
                out = pred.new_zeros(*pred.shape[:2], f, *pred.shape[3:])
            out[:, :, s : s + self.window] += pred * ramp.to(pred.dtype)[:, None, None]
            total[s : s + self.window] += ramp
        return out / total.to(out.dtype)[:, None, None]
