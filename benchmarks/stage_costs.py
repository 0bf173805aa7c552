"""Cost of each cascade stage (parameters, FLOPs, seconds) and of pseudo-3D against full 3D layers.

    .venv/bin/python benchmarks/stage_costs.py --out benchmarks/results-stages.json
    .venv/bin/python benchmarks/stage_costs.py --sections paper --paper-frames 4   # any of: cpu paper factorisation

Sections (figures go into BENCHMARKS.md, "Stages"):

cpu            CPU preset (cluster/presets/cpu.yaml), fresh weights, one sample: each stage run in full through
               its function in stages/cascade.py (all sampling steps, guidance as configured), its input the
               previous stage's output. Median of --reps runs; the first, cold, is each stage's first call.
paper          Paper preset (cluster/presets/paper.yaml), fresh weights: ONE network evaluation (one denoising
               step, batch 1, no guidance pair) per stage. The video stages run on --paper-frames frames, not the
               paper's 16 or 76; the table gives both shapes and the FLOPs of both, and scales no time. SR_h's
               sample is one 768x768 frame. Each stage runs in a fresh process (so peak memory is its own); the
               first evaluation is timed and further ones follow while the stage's time stays under
               --paper-budget seconds, up to --reps.
factorisation  At the paper decoder's shapes, on --factorisation-frames frames: (a) PseudoConv3d (3x3 Conv2d on
               each frame + k=3 Conv1d over frames, eq. 2) against nn.Conv3d 3x3x3, at level 0 (320 channels,
               64x64); (b) spatial
               self-attention on each frame followed by TemporalAttention (eq. 3) against self-attention over all
               f·h·w tokens, at level 1 (640 channels, 32x32, heads of 64), the decoder's first attention level.
               Timing: median of --reps rounds, each round running the four layers in turn. Memory: one call
               per layer, each in a fresh process.

FLOPs are torch.utils.flop_counter.FlopCounterMode's count (matrix products and convolutions; a multiply-add is
2 FLOPs) of one forward at batch 1, taken on the meta device: there F.scaled_dot_product_attention decomposes
into the bmm's the counter sees, whereas its CPU kernel is not counted at all.

Peak memory is measured in a fresh process per measurement: the kernel's peak resident set (VmHWM, reset through
/proc/self/clear_refs just before the call) less the resident set just before it, with the network and its inputs
already allocated. Where the kernel refuses the reset, the figure is marked "≤" if the peak did not move (the
process had peaked higher before the call, so the call's own peak is not seen).

Timings use torch.inference_mode and 2 torch threads; each timing gives wall seconds and the CPU seconds of the
process (all threads), which a busy machine inflates less. On a shared machine compare only figures of one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import nn

from stages.cascade import (
    build_stage,
    decode,
    encode_text,
    generate_image_embeds,
    interpolate,
    super_resolve_frames,
    super_resolve_video,
)
from stages.config import STAGE_NAMES, CascadeConfig
from stages.costs import (
    FPS,
    PROMPT,
    count_flops,
    evaluation_shape,
    evaluations_per_sample,
    module_flops,
    network_call,
)
from stages.temporal import FrameContext, PseudoConv3d, TemporalAttention
from workflows.presets import load_preset

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SECTIONS = ("cpu", "paper", "factorisation")
THREADS = 2
LABELS = {"clip": "CLIP text", "prior": "P", "decoder": "D^t", "interpolation": "↑F", "sr_low": "SR_l^t",
          "sr_high": "SR_h"}


# -- what one network evaluation is --------------------------------------------------------------

def describe(name: str, cfg: CascadeConfig, frames: int | None = None) -> str:
    """The input of one evaluation in words, e.g. ``16×64²``; ``frames`` overrides the preset's frame count."""
    if name == "clip":
        return f"{cfg.clip.resolved_context_length} tokens"
    if name == "prior":
        return f"y_e, {cfg.prior.num_tokens} tokens"
    f, size = evaluation_shape(name, cfg)
    return f"{f if frames is None else frames}×{size}²"


def parameters(name: str, net: nn.Module) -> int:
    """Parameters used at inference: for CLIP, the text tower only (the image tower serves training)."""
    if name == "clip":
        return sum(p.numel() for n, p in net.named_parameters() if not n.startswith("model.visual.")
                   and n not in ("model.logit_scale", "model.logit_bias"))
    return sum(p.numel() for p in net.parameters())


# -- measurement in a fresh process --------------------------------------------------------------

def status_mib(key: str) -> float:
    """A size from /proc/self/status (VmRSS: resident set, VmHWM: its peak), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024  # kB
    raise ValueError(f"no {key!r} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Set the kernel's peak resident set (VmHWM) to the current one; False where this kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(call: Callable[[], Any]) -> tuple[Any, float, float]:
    """``call()``'s result, wall seconds and CPU seconds (this process, all its threads).

    On an idle machine CPU seconds are about threads × wall; when other processes take the cores, wall grows
    while CPU seconds grow less (threads waiting at a barrier spin for a while, which counts as CPU).
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def summary(walls: list[float], cpus: list[float], load: float) -> dict[str, Any]:
    return {"seconds": walls, "cpu_seconds": cpus, "median_s": statistics.median(walls),
            "median_cpu_s": statistics.median(cpus), "load_1min": load}


def measure(call: Callable[[], Any], reps: int, budget: float) -> dict[str, Any]:
    """Time ``call`` (first call included) and the first call's peak memory above the resident set before it.

    Calls after the first follow while the wall time spent stays under ``budget`` seconds, up to ``reps`` calls.
    """
    load = os.getloadavg()[0]
    reset = reset_peak_rss()
    before, peak_before = status_mib("VmRSS"), status_mib("VmHWM")
    walls, cpus = [], []
    with torch.inference_mode():
        _, wall, cpu = timed(call)
        walls.append(wall), cpus.append(cpu)
        peak = status_mib("VmHWM")
        while len(walls) < reps and sum(walls) + walls[-1] <= budget:
            _, wall, cpu = timed(call)
            walls.append(wall), cpus.append(cpu)
    return {**summary(walls, cpus, load), "peak_mib": peak - before, "peak_seen": reset or peak > peak_before}


def in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a new spawned interpreter, so that its peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def paper_stage_worker(name: str, frames: int | None, reps: int, budget: float) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    cfg = load_preset("paper")
    start, rss = time.perf_counter(), status_mib("VmRSS")
    net = build_stage(name, getattr(cfg, name)).eval()
    built = time.perf_counter() - start
    call = network_call(name, net, cfg, frames)
    return {"build_s": built, "weights_mib": status_mib("VmRSS") - rss, **measure(call, reps, budget)}


# -- pseudo-3D against full 3D -------------------------------------------------------------------

class SpatialThenTemporal(nn.Module):
    """ATTN_P3D (eq. 3): self-attention over the h·w tokens of each frame, then TemporalAttention at each pixel."""

    def __init__(self, channels: int, head_dim: int, temporal_heads: int, frames: int) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        context = FrameContext()
        context.frames = frames
        self.spatial = Attention(query_dim=channels, heads=channels // head_dim, dim_head=head_dim)
        self.temporal = TemporalAttention(channels, temporal_heads, context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(b f) c h w`` -> same shape."""
        h = x.shape[-2]
        tokens = rearrange(x, "bf c h w -> bf (h w) c")
        tokens = tokens + self.spatial(tokens)
        return self.temporal(rearrange(tokens, "bf (h w) c -> bf c h w", h=h))


class FullAttention(nn.Module):
    """Self-attention over all f·h·w tokens of a video at once."""

    def __init__(self, channels: int, head_dim: int) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn = Attention(query_dim=channels, heads=channels // head_dim, dim_head=head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``b c f h w`` -> same shape."""
        f, h = x.shape[2:4]
        tokens = rearrange(x, "b c f h w -> b (f h w) c")
        tokens = tokens + self.attn(tokens)
        return rearrange(tokens, "b (f h w) c -> b c f h w", f=f, h=h)


FACTORISATION = {
    # label: (layer, channels, size); the paper decoder's level 0 has convs only, level 1 its first attention
    "pseudo-3D conv (Conv2d 3x3 + Conv1d 3)": ("pseudo_conv", 320, 64),
    "full Conv3d 3x3x3": ("conv3d", 320, 64),
    "spatial attn + temporal attn": ("factorised_attention", 640, 32),
    "full spatiotemporal attn": ("full_attention", 640, 32),
}
HEAD_DIM = 64


def factorisation_layer(kind: str, channels: int, size: int, frames: int, device: str = "cpu") -> Callable[[], Any]:
    """A closure running one layer of the factorisation section on a random ``frames × size²`` input."""
    temporal_heads = load_preset("paper").decoder.unet.temporal_heads
    with torch.device(device):
        if kind == "pseudo_conv":
            context = FrameContext()
            context.frames = frames
            layer = PseudoConv3d(nn.Conv2d(channels, channels, 3, padding=1), context, kernel=3)
            x = torch.randn(frames, channels, size, size)  # (b f) c h w
        elif kind == "conv3d":
            layer = nn.Conv3d(channels, channels, 3, padding=1)
            x = torch.randn(1, channels, frames, size, size)  # b c f h w
        elif kind == "factorised_attention":
            layer = SpatialThenTemporal(channels, HEAD_DIM, temporal_heads, frames)
            x = torch.randn(frames, channels, size, size)
        elif kind == "full_attention":
            layer = FullAttention(channels, HEAD_DIM)
            x = torch.randn(1, channels, frames, size, size)
        else:
            kinds = ", ".join(k for k, _, _ in FACTORISATION.values())
            raise ValueError(f"unknown layer {kind!r}; expected one of {kinds}")
    layer.eval()
    return lambda: layer(x)


def factorisation_worker(kind: str, channels: int, size: int, frames: int) -> dict[str, Any]:
    """One call's peak memory (and time) in this process."""
    torch.set_num_threads(THREADS)
    return measure(factorisation_layer(kind, channels, size, frames), reps=1, budget=0.0)


# -- sections ------------------------------------------------------------------------------------

def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def giga(flops: int) -> str:
    return f"{flops / 1e9:,.1f}" if flops >= 1e10 else f"{flops / 1e9:.3g}"


def runs(seconds: list[float]) -> str:
    return ", ".join(f"{x:.3g}" for x in seconds)


def memory(r: dict[str, Any]) -> str:
    return f"{'' if r['peak_seen'] else '≤ '}{r['peak_mib']:,.0f}"


def section_cpu(reps: int) -> dict[str, Any]:
    cfg = load_preset("cpu")
    print(f"\n## CPU preset: full stage per sample, median of {reps} runs (the first one cold)\n")
    nets = {name: build_stage(name, getattr(cfg, name)).eval() for name in STAGE_NAMES}
    seeds = [0]
    fps = torch.tensor([FPS])
    out: dict[str, Any] = {}  # each stage's output of its first run is the next stage's input

    def split(enc: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        return {k: v[i : i + 1] for k, v in enc.items()}

    full = {
        "clip": lambda: encode_text(nets["clip"], [PROMPT, ""]),
        "prior": lambda: generate_image_embeds(nets["prior"], split(out["clip"], 0), split(out["clip"], 1), seeds),
        "decoder": lambda: decode(nets["decoder"], cfg.decoder, out["prior"], fps, seeds),
        "interpolation": lambda: interpolate(nets["interpolation"], cfg.interpolation, out["decoder"], out["prior"],
                                             fps, seeds)[0],
        "sr_low": lambda: super_resolve_video(nets["sr_low"], cfg.sr_low, out["interpolation"], seeds),
        "sr_high": lambda: super_resolve_frames(nets["sr_high"], cfg.sr_high, out["sr_low"], seeds),
    }
    samples = {"clip": "prompt + negative prompt", "prior": "y_e",
               **{name: f"{describe(name, cfg)} video" for name in ("decoder", "interpolation", "sr_low")},
               "sr_high": f"{cfg.output_frames}×{cfg.sr_high.out_size}² video"}
    rows = {}
    print("| stage | parameters | one evaluation on | GFLOPs per evaluation | sample | evaluations per sample "
          "| s per sample (full stage) | runs (s) | CPU s | load |")
    print("|---|---:|---|---:|---|---:|---:|---|---:|---:|")
    for name in STAGE_NAMES:
        load, walls, cpus = os.getloadavg()[0], [], []
        with torch.inference_mode():
            for _ in range(reps):
                result, wall, cpu = timed(full[name])
                walls.append(wall), cpus.append(cpu)
                out.setdefault(name, result)
        row = {"parameters": parameters(name, nets[name]), "evaluation": describe(name, cfg),
               "flops_per_evaluation": count_flops(name, cfg), "sample": samples[name],
               "evaluations_per_sample": evaluations_per_sample(name, cfg), **summary(walls, cpus, load)}
        rows[name] = row
        print(f"| {LABELS[name]} | {row['parameters']:,} | {row['evaluation']} | {giga(row['flops_per_evaluation'])} "
              f"| {row['sample']} | {row['evaluations_per_sample']} | {row['median_s']:.3f} | {runs(walls)} "
              f"| {row['median_cpu_s']:.3f} | {load:.1f} |", flush=True)
    total = sum(r["median_s"] for r in rows.values())
    print(f"\nSum of the stage medians: {total:.2f} s per video. CLIP's sample is the prompt and the negative prompt "
          f"in one call, as the CLIP runner encodes them; SR_h's sample is the whole {cfg.output_frames}-frame video "
          f"({cfg.sr_high.frame_batch} frames per forward). Load average after: {load_average()}")
    return {"stages": rows, "sum_median_s": total}


def section_paper(reps: int, frames: int, budget: float) -> dict[str, Any]:
    cfg = load_preset("paper")
    print(f"\n## Paper preset: one network evaluation (one denoising step) per sample, batch 1, fresh weights, "
          f"video stages on {frames} frames\n")
    rows = {}
    print("| stage | parameters | one evaluation at paper shape | TFLOPs (paper shape) | evaluations per sample "
          "(full stage) | measured on | TFLOPs (measured) | s per evaluation (measured) | runs (s) | CPU s "
          "| GFLOP/s | peak MiB above weights+inputs | weights MiB | load |")
    print("|---|---:|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name in STAGE_NAMES:
        timed_frames = None
        if name in ("decoder", "interpolation", "sr_low"):
            paper_frames = evaluation_shape(name, cfg)[0]
            if frames > paper_frames:
                raise ValueError(f"--paper-frames={frames} exceeds {name}'s {paper_frames} frames")
            timed_frames = frames
        with torch.device("meta"):
            params = parameters(name, build_stage(name, getattr(cfg, name)))
        paper_flops = count_flops(name, cfg)
        timed_flops = count_flops(name, cfg, timed_frames) if timed_frames is not None else paper_flops
        result = in_fresh_process(paper_stage_worker, name, timed_frames, reps, budget)
        # SR_h's sample here is one frame, which costs one evaluation per step
        evaluations = cfg.sr_high.diffusion.steps if name == "sr_high" else evaluations_per_sample(name, cfg)
        row = {"parameters": params, "evaluation": describe(name, cfg), "flops_per_evaluation": paper_flops,
               "evaluations_per_sample": evaluations,
               "measured_on": describe(name, cfg, timed_frames), "flops_measured": timed_flops, **result}
        rows[name] = row
        print(f"| {LABELS[name]} | {params:,} | {row['evaluation']} | {paper_flops / 1e12:.3g} "
              f"| {row['evaluations_per_sample']} | {row['measured_on']} | {timed_flops / 1e12:.3g} "
              f"| {row['median_s']:.3f} | {runs(row['seconds'])} | {row['median_cpu_s']:.3f} "
              f"| {timed_flops / 1e9 / row['median_s']:.1f} | {memory(row)} | {row['weights_mib']:,.0f} "
              f"| {row['load_1min']:.1f} |", flush=True)
    print(f"\nVideo stages measured on {frames} frames instead of the paper's ({cfg.decoder.frames} for D^t, "
          f"{cfg.output_frames} for ↑F "
          f"and SR_l^t): the time is for the measured shape and is not scaled. SR_h's sample is ONE "
          f"{cfg.sr_high.out_size}x{cfg.sr_high.out_size} frame (its evaluations per sample are per frame; a video has "
          f"{cfg.output_frames}). CLIP's evaluation is one prompt; guided steps (P, D^t) cost two evaluations. "
          f"Load average after: {load_average()}")
    return {"frames": frames, "stages": rows}


def section_factorisation(reps: int, frames: int) -> dict[str, Any]:
    print(f"\n## Pseudo-3D against full 3D, paper decoder shapes, {frames} frames, batch 1: median of {reps} runs, "
          f"the four layers interleaved in each round; peak memory of one call in a fresh process per layer\n")
    calls = {label: factorisation_layer(kind, channels, size, frames)
             for label, (kind, channels, size) in FACTORISATION.items()}
    load = os.getloadavg()[0]
    walls: dict[str, list[float]] = {label: [] for label in calls}
    cpus: dict[str, list[float]] = {label: [] for label in calls}
    with torch.inference_mode():
        for _ in range(reps):  # interleaved, so that a busy spell of the shared machine hits every layer
            for label, call in calls.items():
                _, wall, cpu = timed(call)
                walls[label].append(wall), cpus[label].append(cpu)
    del calls
    rows = {}
    print("| layer | input (channels, frames×size²) | GFLOPs | s (median) | runs (s) | CPU s "
          "| peak MiB above input |")
    print("|---|---|---:|---:|---|---:|---:|")
    for label, (kind, channels, size) in FACTORISATION.items():
        flops = module_flops(factorisation_layer(kind, channels, size, frames, device="meta"))
        peak = in_fresh_process(factorisation_worker, kind, channels, size, frames)
        row = {"kind": kind, "channels": channels, "size": size, "frames": frames, "flops": flops,
               **summary(walls[label], cpus[label], load), "peak_mib": peak["peak_mib"], "peak_seen": peak["peak_seen"]}
        rows[label] = row
        print(f"| {label} | {channels}, {frames}×{size}² | {giga(flops)} | {row['median_s']:.3f} "
              f"| {runs(row['seconds'])} "
              f"| {row['median_cpu_s']:.3f} | {memory(row)} |", flush=True)
    labels = list(FACTORISATION)
    for factorised, full in ((labels[0], labels[1]), (labels[2], labels[3])):
        a, b = rows[factorised], rows[full]
        print(f"\n{full} / {factorised}: time {b['median_s'] / a['median_s']:.2f}x, CPU time "
              f"{b['median_cpu_s'] / a['median_cpu_s']:.2f}x, FLOPs {b['flops'] / a['flops']:.2f}x, "
              f"peak memory {b['peak_mib'] / a['peak_mib']:.2f}x")
    print(f"\nLoad average before: {load:.1f}, after: {load_average()}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, any of: {', '.join(SECTIONS)}")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per measurement (medians are printed)")
    parser.add_argument("--paper-frames", type=int, default=2,
                        help="frames of D^t, ↑F and SR_l^t in the paper section (the paper's are 16 and 76)")
    parser.add_argument("--paper-budget", type=float, default=60.0,
                        help="paper section: further runs of a stage only while its time stays under this (s)")
    parser.add_argument("--factorisation-frames", type=int, default=16)
    parser.add_argument("--out", help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"--sections must name some of {', '.join(SECTIONS)}; got {args.sections!r}")
    for name in ("reps", "paper_frames", "factorisation_frames"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.paper_frames < 2:
        raise ValueError(f"--paper-frames must be >= 2 (one frame switches the temporal layers off), "
                         f"got {args.paper_frames}")

    torch.set_num_threads(THREADS)
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__, "load_average": load_average(),
            "command": " ".join([os.path.relpath(sys.executable, ROOT), os.path.relpath(sys.argv[0], ROOT),
                                 *sys.argv[1:]])}
    print(" ".join(f"{k} {v}" for k, v in info.items() if k != "command"))
    print(f"command: {info['command']}")
    results: dict[str, Any] = {"info": info}
    started = time.perf_counter()
    for section in sections:
        t = time.perf_counter()
        if section == "cpu":
            results["cpu"] = section_cpu(args.reps)
        elif section == "paper":
            results["paper"] = section_paper(args.reps, args.paper_frames, args.paper_budget)
        elif section == "factorisation":
            results["factorisation"] = section_factorisation(args.reps, args.factorisation_frames)
        print(f"\n({section}: {time.perf_counter() - t:.0f} s)", flush=True)
    results["total_s"] = time.perf_counter() - started
    print(f"\ntotal {results['total_s']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
