"""A prepared check of the cascade on one GPU, in at most about 8 minutes, written as one JSON file.

    .venv/bin/python benchmarks/gpu_check.py --out benchmarks/results-gpu.json          # on a CUDA machine
    .venv/bin/python benchmarks/gpu_check.py --smoke --out /tmp/gpu-check.json         # CPU, tiny sizes

Sections of the JSON (figures go into BENCHMARKS.md, "GPU check"):

device      the card (or CPU), torch version, total memory.
stages      per stage of the paper preset (fresh weights): seconds per network pass, measured at the stage's
            own shape (D^t 16×64², ↑F 76×64², SR_l^t 76×256², SR_h frames of 768², P and CLIP_text at batch 1),
            times the passes a video needs (steps × 2 where guidance doubles the batch; SR_h: steps × passes
            over the 76 frames), as seconds per video, in fp32 and bf16 (the runners' autocast) eager, and bf16
            under torch.compile while the time budget lasts; peak memory of the stage's passes beside the
            estimate runners check against (stages.memory); SR_l^t runs in frame windows (and SR_h in smaller
            passes) where the estimate says the device cannot hold it, as the runners do.
temporal    the temporal conv of eq. 2 at SR_l^t's widest level (128 channels, 76×256²), the layouts side by
            side: the first one (every pixel's frames as a Conv1d sequence, (b h w) c f, two copies), the
            (k,1,1) Conv3d on the b c f h w view of contiguous memory, and on channels-last memory (no copy):
            ms per call and peak memory above the input, fp32 and bf16.
temporal_attention
            the temporal attention of eq. 3 at SR_l^t's attention level (768 channels, 76×32², its heads), batch
            1 and 2, contiguous and channels-last input: the first layout (every pixel's frames rearranged to
            (b h w) f c and back) beside the layer's own (per-token ops on (b f) h w c, attention on strided
            views): ms per call, MiB copied to change layout (aten::clone, from the profiler), peak memory
            above the input (CUDA); on the CPU also the process's CPU ms per call, the layouts taken in turn.
training    data-parallel training steps of SR_l^t's network (the cpu preset's sizes, 8 frames of 64²) under
            DistributedDataParallel in a process group of ONE rank on the NCCL backend (two NCCL ranks cannot
            share one GPU), with the loop's reductions (workflows.train.loop.reduce_window's tensors
            all-reduced over the group at every log step, as the loop does with more than one worker): seconds
            per step. --smoke uses gloo on the CPU instead.

--smoke runs every section at the tiny preset's sizes on the CPU (compile skipped), so the script is tested;
--temporal-only C F S runs the temporal sections alone at that shape (--temporal-heads for the attention), on
the CPU where there is no GPU:

    .venv/bin/python benchmarks/gpu_check.py --temporal-only 16 76 64 --reps 5 --out /tmp/temporal.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages import cascade  # noqa: E402
from stages.diffusion import training_loss  # noqa: E402
from stages.memory import HEADROOM, FrameWindows, estimate_bytes, free_bytes, largest_fitting  # noqa: E402
from stages.temporal import FrameContext, PseudoConv3d, TemporalAttention, frame_positions  # noqa: E402
from workflows.presets import load_preset  # noqa: E402
from workflows.runners import compute_in  # noqa: E402
from workflows.train.loop import reduce_window  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Clock:
    """Wall time left of the check's budget."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.perf_counter() + budget_s

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory measurement; returns the memory in use now (0 on the CPU, where no peak is read)."""
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_mib(device: torch.device, base: int) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def timed(fn, device: torch.device, reps: int) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - start)
    return runs


# -- stages ----------------------------------------------------------------------------------------

def stage_inputs(name: str, preset, batch: int, device: torch.device, text: dict) -> tuple[dict, int, int, int]:
    """(keyword inputs of one pass, frames per pass, size, passes per video) of stage ``name``."""
    d = preset.decoder
    frames = (d.frames - 1) * preset.interpolation.skip + 1
    if name == "prior":
        cfg = preset.prior
        guided = 2 if cfg.diffusion.guidance != 1 else 1
        n = batch * guided
        inputs = {"x": torch.randn(n, cfg.embed_dim, device=device), **{k: v.repeat(n, *[1] * (v.ndim - 1))
                                                                       for k, v in text.items()}}
        return inputs, 1, 0, cfg.diffusion.steps
    if name == "decoder":
        guided = 2 if d.diffusion.guidance != 1 else 1
        n = batch * guided
        x = torch.randn(n, 3, d.frames, d.size, d.size, device=device)
        return ({"x": x, "image_embeds": torch.randn(n, d.image_embed_dim, device=device),
                 "fps": torch.full((n,), 5.0, device=device)}, n * d.frames, d.size, d.diffusion.steps)
    if name == "interpolation":
        cfg = preset.interpolation
        x = torch.randn(batch, 3, frames, d.size, d.size, device=device)
        return ({"x": x, "cond_frames": torch.randn(batch, 4, frames, d.size, d.size, device=device),
                 "image_embeds": torch.randn(batch, cfg.image_embed_dim, device=device),
                 "fps": torch.full((batch,), 25.0, device=device)}, batch * frames, d.size, cfg.diffusion.steps)
    if name == "sr_low":
        cfg = preset.sr_low
        x = torch.randn(batch, 3, frames, cfg.out_size, cfg.out_size, device=device)
        return ({"x": x, "cond_frames": torch.randn_like(x), "noise_level": torch.full((batch,), 100.0, device=device)},
                batch * frames, cfg.out_size, cfg.diffusion.steps)
    cfg = preset.sr_high
    return {}, cfg.frame_batch, cfg.out_size, cfg.diffusion.steps  # SR_h's pass is sized from memory below


def measure_stage(name: str, preset, device: torch.device, clock: Clock, *, compile_ok: bool, reps: int) -> dict:
    cfg = getattr(preset, name)
    with torch.device(device):
        net = cascade.build_stage(name, cfg).eval()
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in net.parameters())
    clip = None
    text = {}
    if name == "prior":
        with torch.device(device):
            clip = cascade.build_stage("clip", preset.clip).eval()
        with torch.inference_mode():
            enc = cascade.encode_text(clip, ["a red circle moving to the right"])
        text = {k: enc[k].to(device) for k in ("text_embeds", "text_hidden", "text_mask")}
        del clip
    inputs, frames, size, steps = stage_inputs(name, preset, 1, device, text)
    unet = getattr(cfg, "unet", None)
    passes = steps
    out: dict = {"parameters": params, "steps": steps}
    results = {}
    for mode in ("fp32", "bf16", "bf16-compiled"):
        dtype = DTYPES[mode.split("-")[0]]
        if mode.endswith("compiled") and not compile_ok:
            results[mode] = {"skipped": "compile not run (--smoke or --no-compile)"}
            continue
        if clock.left() < (120 if mode.endswith("compiled") else 30):
            results[mode] = {"skipped": "time budget spent"}
            continue
        runner_net = _fresh_forward(net)
        if name in ("sr_low", "sr_high"):
            budget = HEADROOM * free_bytes(device)
            need = lambda n: estimate_bytes(params, unet, frames=n, size=size, dtype=dtype)  # noqa: E731
            if name == "sr_high":
                total = (preset.decoder.frames - 1) * preset.interpolation.skip + 1
                per_pass = max(1, largest_fitting(need, 16 if device.type == "cuda" else cfg.frame_batch, budget))
                x = torch.randn(per_pass, 3, 1, size, size, device=device)
                inputs = {"x": x, "cond_frames": torch.randn_like(x),
                          "noise_level": torch.full((per_pass,), 100.0, device=device)}
                frames, passes = per_pass, steps * -(-total // per_pass)
                out["frames_per_pass"] = per_pass
            elif need(frames) > budget:
                window = max(2, largest_fitting(need, frames, budget))
                runner_net = FrameWindows(net, window, min(8, window // 2))
                out["frame_window"] = window
        if name == "prior":
            out["text_encoder"] = "CLIP_text built for the prior's text features, not timed"
        call_net = compute_in(_fresh_forward(runner_net), dtype) if runner_net is not net else compute_in(net, dtype)
        if mode.endswith("compiled"):
            call_net = torch.compile(call_net)
        t = torch.full((inputs["x"].shape[0],), 500, device=device, dtype=torch.long)
        kwargs = {k: v for k, v in inputs.items() if k != "x"}

        def one_pass():
            with torch.inference_mode():
                call_net(inputs["x"], t, **kwargs)

        base = reset_peak(device)
        start = time.perf_counter()
        try:
            runs = timed(one_pass, device, reps)
        except torch.OutOfMemoryError as e:
            results[mode] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            continue
        first = time.perf_counter() - start - sum(runs)
        per_pass = sorted(runs)[len(runs) // 2]
        results[mode] = {"s_per_pass": per_pass, "runs": runs, "first_call_s": first, "passes_per_video": passes,
                         "s_per_video": per_pass * passes, "peak_mib": peak_mib(device, base),
                         "estimate_mib": estimate_bytes(params, unet, frames=frames, size=size, dtype=dtype) / 2**20}
        torch.compiler.reset()
    out.update(results)
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _fresh_forward(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with its forward restored to the class's, so each mode's autocast wraps it once."""
    net.__dict__.pop("forward", None)
    return net


# -- temporal layouts ------------------------------------------------------------------------------

def conv1d_layout(layer: PseudoConv3d, x: torch.Tensor, frames: int) -> torch.Tensor:
    """The temporal conv's first layout: ``(b f) c h w -> (b h w) c f``, Conv1d, and back (two copies)."""
    h, w = x.shape[-2:]
    seq = rearrange(x, "(b f) c h w -> (b h w) c f", f=frames)
    y = layer.temporal_conv(seq)
    return rearrange(y, "(b h w) c f -> (b f) c h w", h=h, w=w).contiguous()


def conv3d_layout(layer: PseudoConv3d, x: torch.Tensor, frames: int) -> torch.Tensor:
    conv = layer.temporal_conv
    video = rearrange(x, "(b f) c h w -> b c f h w", f=frames)
    y = F.conv3d(video, conv.weight[..., None, None], conv.bias, padding=(conv.padding[0], 0, 0))
    return rearrange(y, "b c f h w -> (b f) c h w")


def measure_temporal(channels: int, frames: int, size: int, device: torch.device, reps: int) -> list[dict]:
    context = FrameContext()
    context.frames = frames
    rows = []
    for dtype_name, dtype in DTYPES.items():
        layer = PseudoConv3d(torch.nn.Conv2d(channels, channels, 3, padding=1), context).to(device, dtype)
        with torch.no_grad():
            layer.temporal_conv.weight.add_(torch.randn_like(layer.temporal_conv.weight) * 0.01)
        x = torch.randn(frames, channels, size, size, device=device, dtype=dtype)
        ref = None
        for name, fn, memory_format in (("conv1d (b h w) c f", conv1d_layout, torch.contiguous_format),
                                        ("conv3d (k,1,1), contiguous", conv3d_layout, torch.contiguous_format),
                                        ("conv3d (k,1,1), channels-last", conv3d_layout, torch.channels_last)):
            inp = x.contiguous(memory_format=memory_format)
            with torch.inference_mode():
                base = reset_peak(device)
                y = fn(layer, inp, frames)
                peak = peak_mib(device, base)
                ref = y if ref is None else ref
                err = float((y.float() - ref.float()).abs().max())
                runs = timed(lambda: fn(layer, inp, frames), device, reps)
            rows.append({"layout": name, "dtype": dtype_name, "ms": 1e3 * sorted(runs)[len(runs) // 2],
                         "runs_ms": [1e3 * r for r in runs], "peak_mib_above_input": peak,
                         "max_abs_diff_vs_conv1d": err, "shape": [channels, frames, size, size]})
            del y
    return rows


def einops_attention(layer: TemporalAttention, x: torch.Tensor, frames: int) -> torch.Tensor:
    """The temporal attention's first layout: ``(b f) c h w -> (b h w) f c``, attention, and back."""
    h, w = x.shape[-2:]
    tokens = rearrange(x, "(b f) c h w -> (b h w) f c", f=frames)
    y = layer.norm(tokens) + frame_positions(frames, tokens.shape[-1], x.device, x.dtype)
    q, k, v = rearrange(layer.to_qkv(y), "n f (three nh d) -> three n nh f d", three=3, nh=layer.heads)
    y = layer.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "n nh f d -> n f (nh d)"))
    return rearrange(tokens + y, "(b h w) f c -> (b f) c h w", h=h, w=w)


def cpu_timed(calls: dict, reps: int) -> dict[str, list[float]]:
    """CPU seconds of the process in each of ``reps`` calls of every function in ``calls``, taken in turn so
    each sees the same load: on a shared machine, steadier than wall time taken one function after another."""
    runs = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            start = time.process_time()
            fn()
            runs[name].append(time.process_time() - start)
    return runs


def copied_mib(fn) -> float:
    """MiB that one call of ``fn`` copies to change a tensor's layout (``aten::clone``: reshape, contiguous)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    return sum(max(e.cpu_memory_usage, e.device_memory_usage) for e in prof.key_averages()
               if e.key == "aten::clone") / 2**20


def measure_temporal_attention(channels: int, frames: int, size: int, heads: int, device: torch.device,
                               reps: int) -> list[dict]:
    """TemporalAttention (eq. 3's ATTN_1D) in its first layout and in the layer's own, at batch 1 and 2."""
    context = FrameContext()
    context.frames = frames
    layouts = (("(b h w) f c rearranged, contiguous", einops_attention, torch.contiguous_format),
               ("(b h w) f c rearranged, channels-last", einops_attention, torch.channels_last),
               ("per-token on (b f) h w c, contiguous", TemporalAttention.attend, torch.contiguous_format),
               ("per-token on (b f) h w c, channels-last", TemporalAttention.attend, torch.channels_last))
    rows = []
    for dtype_name, dtype in DTYPES.items():
        layer = TemporalAttention(channels, heads, context).to(device, dtype)
        with torch.no_grad():
            layer.to_out.weight.normal_(0.0, 0.02)  # nonzero, so the attention shows in the output
        for batch in (1, 2):
            x = torch.randn(batch * frames, channels, size, size, device=device, dtype=dtype)
            calls, ref = {}, None
            for name, fn, memory_format in layouts:
                calls[name] = (lambda fn=fn, inp=x.contiguous(memory_format=memory_format): fn(layer, inp, frames))
                with torch.inference_mode():
                    base = reset_peak(device)
                    y = calls[name]()
                    peak = peak_mib(device, base)
                    ref = y if ref is None else ref
                    err = float((y.float() - ref.float()).abs().max())
                    del y
                    copied = copied_mib(calls[name])
                    runs = timed(calls[name], device, reps)
                rows.append({"layout": name, "dtype": dtype_name, "batch": batch, "ms": 1e3 * sorted(runs)[len(runs) // 2],
                             "runs_ms": [1e3 * r for r in runs], "copied_mib": copied, "peak_mib_above_input": peak,
                             "max_abs_diff_vs_first": err, "shape": [channels, frames, size, size], "heads": heads})
            if device.type == "cpu":
                with torch.inference_mode():
                    cpu = cpu_timed(calls, reps)
                for row in rows[-len(layouts):]:
                    runs = sorted(cpu[row["layout"]])
                    row.update(cpu_ms_min=1e3 * runs[0], cpu_ms_median=1e3 * runs[len(runs) // 2])
    return rows


# -- training under a process group ----------------------------------------------------------------

def measure_training(preset, device: torch.device, backend: str, frames: int, steps: int, log_every: int) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        cfg = preset.sr_low
        with torch.device(device):
            net = cascade.build_stage("sr_low", cfg).train()
        model = DistributedDataParallel(net, device_ids=[device.index or 0] if device.type == "cuda" else None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator(device=device).manual_seed(0)
        size = cfg.out_size
        x0 = torch.rand(1, 3, frames, size, size, device=device, generator=g) * 2 - 1
        cond = {"cond_frames": torch.rand(1, 3, frames, size, size, device=device, generator=g) * 2 - 1,
                "noise_level": torch.full((1,), 100.0, device=device)}
        loss_sum = torch.zeros((), device=device)
        runs, reductions = [], []
        for step in range(1, steps + 1):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = training_loss(model, x0, cfg=cfg.diffusion, cond=cond, generator=torch.Generator().manual_seed(step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().float()
            if step % log_every == 0:
                total, counts = reduce_window(loss_sum, (log_every, log_every, 0), device, 1)
                dist.all_reduce(total)
                dist.all_reduce(counts)
                reductions.append({"step": step, "loss": float(total) / log_every, "counts": counts.tolist(),
                                   "device": str(total.device)})
                loss_sum.zero_()
            sync(device)
            runs.append(time.perf_counter() - start)
        return {"backend": backend, "world_size": dist.get_world_size(), "device": str(device),
                "network": f"sr_low of the preset, {frames} frames of {size}x{size}, batch 1",
                "s_per_step": sorted(runs[1:])[len(runs[1:]) // 2], "runs": runs, "reductions": reductions}
    finally:
        dist.destroy_process_group()


# -- the check -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, no compile: a test of the script")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall time for the stage section (default 420)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--reps", type=int, default=2, help="timed passes after the warm-up (default 2)")
    parser.add_argument("--temporal-only", type=int, nargs=3, metavar=("CHANNELS", "FRAMES", "SIZE"),
                        help="only the temporal layouts, at this shape, on the device at hand (CPU without CUDA)")
    parser.add_argument("--temporal-heads", type=int, default=4, help="heads of --temporal-only's attention (default 4)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.temporal_only:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = measure_temporal(*args.temporal_only, device, args.reps)
        attention = measure_temporal_attention(*args.temporal_only, args.temporal_heads, device, args.reps)
        Path(args.out).write_text(json.dumps({"device": str(device), "load": os.getloadavg(), "temporal": rows,
                                              "temporal_attention": attention}, indent=1))
        return 0
    if args.smoke:
        device = torch.device("cpu")
        preset, train_preset = load_preset("tiny"), load_preset("tiny")
        temporal_shape, train_frames, backend, train_steps = (8, 7, 16), 4, "gloo", 4
        attention_shape = (8, 7, 16, 2)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; run it with --smoke on a CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
        torch.set_float32_matmul_precision("high")
        preset, train_preset = load_preset("paper"), load_preset("cpu")
        temporal_shape, train_frames, backend, train_steps = (128, 76, 256), 8, "nccl", 12
        attention_shape = (768, 76, 32, preset.sr_low.unet.temporal_heads)
    report: dict = {
        "device": {"name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__,
                   "memory_gib": (torch.cuda.get_device_properties(device).total_memory / 2**30
                                  if device.type == "cuda" else None),
                   "smoke": args.smoke},
    }
    clock = Clock(args.budget_s)
    report["stages"] = {}
    for name in ("prior", "decoder", "interpolation", "sr_low", "sr_high"):
        print(f"gpu_check: stage {name}", file=sys.stderr)
        report["stages"][name] = measure_stage(name, preset, device, clock, compile_ok=not (args.smoke or args.no_compile),
                                               reps=args.reps)
    print("gpu_check: temporal layouts", file=sys.stderr)
    report["temporal"] = measure_temporal(*temporal_shape, device, args.reps)
    report["temporal_attention"] = measure_temporal_attention(*attention_shape, device, args.reps)
    print(f"gpu_check: training on {backend}", file=sys.stderr)
    report["training"] = measure_training(train_preset, device, backend, train_frames, steps=train_steps,
                                          log_every=train_steps // 2)
    report["wall_s"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"gpu_check: wrote {args.out} in {report['wall_s']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
