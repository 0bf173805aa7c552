"""What one sample costs each stage of the cascade: network evaluations, FLOPs counted, seconds measured.

One evaluation is one forward of a stage's network for one sample (batch 1, one denoising step, no guidance
pair); a sample costs :func:`evaluations_per_sample` of them. FLOPs are torch.utils.flop_counter's count (matrix
products and convolutions; a multiply-add is 2 FLOPs) on the meta device, where
F.scaled_dot_product_attention decomposes into the bmm's the counter sees. :func:`seconds_per_evaluation`
times one on a real device.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from stages.cascade import build_stage, encode_text, infill_inputs
from stages.config import CascadeConfig

PROMPT = "a photograph of a city street at night"  # any prompt: the text is padded to the context length
FPS = 5.0          # keyframe rate D^t is conditioned on in one evaluation (any rate costs the same)
TIMESTEP = 500     # t of one evaluation (any t costs the same)
VIDEO_STAGES = ("decoder", "interpolation", "sr_low", "sr_high")


def evaluation_shape(name: str, cfg: CascadeConfig) -> tuple[int, int]:
    """(frames, size) of one evaluation of a U-Net stage for one sample; SR_h's sample is one frame (a
    latent D^t's size is its latents')."""
    if name == "decoder":
        return cfg.decoder.frames, cfg.decoder.latent_size
    if name == "interpolation":
        return cfg.output_frames, cfg.decoder.size
    if name == "sr_low":
        return cfg.output_frames, cfg.sr_low.out_size
    if name == "sr_high":
        return 1, cfg.sr_high.out_size
    raise ValueError(f"stage {name!r} has no video shape; expected one of {', '.join(VIDEO_STAGES)}")


def network_call(name: str, net: nn.Module, cfg: CascadeConfig, frames: int | None = None) -> Callable[[], Any]:
    """A closure running one evaluation of ``net`` for one sample, inputs on the network's device.

    ``frames`` (video stages) replaces the preset's frame count. CLIP's evaluation is ``encode_text`` of one prompt.
    """
    device = next(net.parameters()).device
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:  # made on the CPU, so that the meta device gets the same shapes
        return torch.randn(shape, generator=g).to(device)

    if name == "clip":
        return lambda: encode_text(net, [PROMPT])
    t = torch.tensor([TIMESTEP], device=device)
    if name == "prior":
        d, n = cfg.prior.embed_dim, cfg.prior.num_tokens
        kwargs = {"text_embeds": randn(1, d), "text_hidden": randn(1, n, d),
                  "text_mask": torch.ones(1, n, dtype=torch.bool, device=device)}
        x = randn(1, d)
        return lambda: net(x, t, **kwargs)
    f, size = evaluation_shape(name, cfg)
    f = f if frames is None else frames
    x = randn(1, cfg.decoder.channels if name == "decoder" else 3, f, size, size)
    if name in ("decoder", "interpolation"):
        kwargs = {"image_embeds": randn(1, cfg.decoder.image_embed_dim), "fps": torch.tensor([FPS], device=device)}
        if name == "interpolation":
            known = torch.zeros(1, f, dtype=torch.bool)
            known[:, :: cfg.interpolation.skip] = True
            kwargs["cond_frames"] = infill_inputs(torch.randn(1, 3, f, size, size, generator=g), known).to(device)
    else:
        noise_level = getattr(cfg, name).noise_level
        kwargs = {"cond_frames": randn(1, 3, f, size, size),
                  "noise_level": torch.tensor([float(noise_level)], device=device)}
    return lambda: net(x, t, **kwargs)


def evaluations_per_sample(name: str, cfg: CascadeConfig) -> int:
    """Network evaluations one sample costs in the full stage (a guided step is two: conditional and not)."""
    if name == "clip":
        return 2  # the prompt and the negative prompt, as the CLIP runner encodes them
    stage = getattr(cfg, name)
    steps = stage.diffusion.steps
    if name in ("prior", "decoder"):
        return steps * (2 if stage.diffusion.guidance != 1 else 1)
    if name == "sr_high":
        return steps * cfg.output_frames  # one evaluation per frame
    return steps  # ↑F and SR_l^t sample without an unconditional branch


def count_flops(name: str, cfg: CascadeConfig, frames: int | None = None) -> int:
    """FLOPs of one evaluation for one sample, counted on the meta device (no memory, no time)."""
    with torch.device("meta"):
        net = build_stage(name, getattr(cfg, name))
    return module_flops(network_call(name, net, cfg, frames))


def module_flops(call: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        call()
    return counter.get_total_flops()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_evaluation(name: str, cfg: CascadeConfig, device: str | torch.device, reps: int = 2,
                           dtype: torch.dtype = torch.float32) -> float:
    """Median wall seconds of one evaluation on ``device`` (fresh weights, after one untimed warm-up call),
    under ``dtype`` autocast unless it is float32; on CUDA the network is in channels-last memory, as the
    runners keep it.

    A video stage that runs out of device memory at the preset's frame count is timed on half as many frames,
    and so on; the time is then scaled by the FLOPs of the full evaluation over those of the timed one.
    """
    device = torch.device(device)
    with torch.device(device):
        net = build_stage(name, getattr(cfg, name)).eval()
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    full = evaluation_shape(name, cfg)[0] if name in VIDEO_STAGES else None
    frames = full
    try:
        while True:
            try:
                seconds = _timed(name, net, cfg, device, frames, reps, dtype)
                return seconds if frames == full else seconds * count_flops(name, cfg) / count_flops(name, cfg, frames)
            except torch.OutOfMemoryError:
                if not frames or frames <= 2:
                    raise
                frames = max(2, frames // 2)
                torch.cuda.empty_cache()
    finally:
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _timed(name: str, net: nn.Module, cfg: CascadeConfig, device: torch.device, frames: int | None,
           reps: int, dtype: torch.dtype) -> float:
    call = network_call(name, net, cfg, frames)
    walls = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        call()
        _synchronize(device)
        for _ in range(reps):
            start = time.perf_counter()
            call()
            _synchronize(device)
            walls.append(time.perf_counter() - start)
    return statistics.median(walls)
