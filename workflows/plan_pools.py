"""``mav plan-pools``: a pools file for ``mav batch`` whose stage throughputs match on N GPUs.

    mav plan-pools --gpus 8 --preset paper --out pools-8.yaml
    mav batch --prompts prompts.txt --output out/ --preset paper --pools pools-8.yaml

Each stage's cost is what one video costs one of its actors: on a machine with a GPU, a timed network
evaluation at the model's sizes times the evaluations a video needs (``stages.costs``); without one, the
FLOPs of those evaluations, counted on the meta device (the output says which). Starting from one actor per
stage, the GPUs go to whichever stage is slowest until the next actor does not fit (``workflows.balance.plan``),
so the plan maximises the chain's rate, its slowest stage's. Batch sizes, CPUs and GPUs per actor come from
``--pools`` (default ``cluster/pools.yaml``); a stage without GPUs there keeps its pool as it is.

The file starts each pool at the planned count (``actors.initial``) and lets the engine move actors between
``min: 1`` and twice the plan as it measures the stages at run time.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from dataclasses import dataclass

import torch

from stages.config import STAGE_NAMES, CascadeConfig
from stages.costs import count_flops, evaluations_per_sample, seconds_per_evaluation
from stages.fsio import write_bytes_atomic
from workflows.balance import StageLoad, chain_rate, plan
from workflows.errors import CliError
from workflows.pools import PoolConfig, load_pools, parse_pools
from workflows.presets import DEFAULT_MODEL, choose_model, load_preset
from workflows.runners import DTYPES, network_dtype

LABELS = {"clip": "CLIP text", "prior": "P", "decoder": "D^t", "interpolation": "↑F", "sr_low": "SR_l^t",
          "sr_high": "SR_h", "writer": "MP4 writer"}
ASSUMED_FLOPS = 4e14   # FLOP/s per GPU for a rate from FLOP counts: about 40% of an H100's dense bf16 peak


@dataclass(frozen=True)
class Costs:
    per_video: dict[str, float | None]   # stage -> one video's cost on one actor; None: not costed
    unit: str                            # "s" (measured) or "FLOP" (counted)
    how: str                             # one line saying where the figures come from
    notes: dict[str, str]                # stage -> why it was not costed


def stage_costs(cfg: CascadeConfig, device: str | None, reps: int = 2, dtype: torch.dtype = torch.float32) -> Costs:
    """Each stage's cost per video: seconds timed on ``device`` (median of ``reps``, under ``dtype``), or FLOPs
    counted when it is None."""
    per_video: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    for name in STAGE_NAMES:
        try:
            one = seconds_per_evaluation(name, cfg, device, reps, dtype) if device else count_flops(name, cfg)
        except ValueError as e:   # a stage whose network is not built from its config alone
            per_video[name], notes[name] = None, str(e)
            continue
        per_video[name] = one * evaluations_per_sample(name, cfg)
    if device:
        gpu = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else str(device)
        arithmetic = "bf16 autocast" if dtype == torch.bfloat16 else "fp32"
        how = f"seconds per video measured on {gpu} (fresh weights, one timed evaluation per stage, {arithmetic})"
        return Costs(per_video, "s", how, notes)
    how = ("FLOPs per video counted from the model's sizes: no GPU on this machine, so the plan assumes every "
           "stage runs at the same FLOP/s (run plan-pools on a GPU node to plan from measured seconds)")
    return Costs(per_video, "FLOP", how, notes)


def allocate(costs: Costs, pools: dict[str, PoolConfig], gpus: float) -> dict[str, int]:
    """Actors per GPU stage that maximise the slowest stage's rate within ``gpus``."""
    planned = [s for s in STAGE_NAMES if pools[s].gpus > 0 and costs.per_video.get(s) is not None]
    fixed = sum(pools[s].gpus * pools[s].start_actors for s in STAGE_NAMES if s not in planned)
    needed = fixed + sum(pools[s].gpus for s in planned)
    check_fits(needed, gpus)
    loads = [StageLoad(name=s, seconds_per_row=costs.per_video[s], actors=1, min_actors=1,
                       max_actors=max(1, int((gpus + 1e-9) // pools[s].gpus)), need={"GPU": pools[s].gpus})
             for s in planned]
    counts = plan(loads, {"GPU": gpus - needed}, surplus=math.inf)
    return dict(zip(planned, counts))


def check_fits(needed: float, gpus: float) -> None:
    if needed > gpus + 1e-9:
        raise CliError(f"--gpus {gpus:g}: one actor of every GPU stage needs {needed:g} GPUs; give --gpus "
                       f"{math.ceil(needed - 1e-9)} or more, or fewer GPUs per actor in --pools")


def render(command: str, costs: Costs, pools: dict[str, PoolConfig], counts: dict[str, int], gpus: float) -> str:
    """The pools file: a header with the costs and the plan's rates, then one section per stage."""
    loads = {s: StageLoad(name=s, seconds_per_row=costs.per_video[s], actors=n) for s, n in counts.items()}
    chain = chain_rate(list(loads.values()), list(counts.values())) if counts else 0.0
    used = sum(pools[s].gpus * counts.get(s, pools[s].start_actors) for s in STAGE_NAMES)
    lines = [f"# {command}", *textwrap.wrap(f"Costs: {costs.how}.", 110, initial_indent="# ", subsequent_indent="# "),
             "#",
             f"# {'stage':<11} {'cost per video':>15} {'actors':>6} {'GPUs':>5}  rate / chain's rate"]
    for s in STAGE_NAMES:
        cost = costs.per_video.get(s)
        n = counts.get(s, pools[s].start_actors)
        text = "not costed" if cost is None else _cost(cost, costs.unit)
        rate = f"{loads[s].rate(n) / chain:,.2f}" if s in loads and chain else "-"
        lines.append(f"# {LABELS[s]:<11} {text:>15} {n:>6} {pools[s].gpus * n:>5g}  {rate}")
    bottleneck = min(loads, key=lambda s: loads[s].rate(counts[s])) if loads else None
    lines.append("#")
    if bottleneck:
        speed = (f"{60 * chain:,.2f} videos/min" if costs.unit == "s"
                 else f"{60 * chain * ASSUMED_FLOPS:,.2f} videos/min if every GPU sustains {ASSUMED_FLOPS / 1e12:g} "
                      f"TFLOP/s")
        lines.append(f"# Bottleneck {LABELS[bottleneck]}: the chain makes {speed}. GPUs used: {used:g} of {gpus:g}.")
    for s, note in costs.notes.items():
        lines.append(f"# {LABELS[s]} keeps its pool as given: {note}")
    lines.append("# actors.initial is the plan; the engine moves actors within min..max as it measures the stages.")
    for s in (*STAGE_NAMES, "writer"):
        p = pools[s]
        if s in counts:
            n = counts[s]
            actors = f"{{min: 1, max: {2 * n}, initial: {n}}}"
        elif p.min_actors == p.max_actors:
            actors = str(p.min_actors)
        else:
            initial = "" if p.initial_actors is None else f", initial: {p.initial_actors}"
            actors = f"{{min: {p.min_actors}, max: {p.max_actors}{initial}}}"
        lines += [f"{s}:", f"  actors: {actors}"]
        if p.gpus:
            lines.append(f"  gpus: {p.gpus:g}")
        lines += [f"  cpus: {p.cpus:g}", f"  batch_size: {p.batch_size}"]
        if p.queue_depth != PoolConfig().queue_depth:
            lines.append(f"  queue_depth: {p.queue_depth}")
        if p.resources:
            lines.append("  resources: {" + ", ".join(f"{k}: {v:g}" for k, v in p.resources.items()) + "}")
        if p.compile:
            lines.append("  compile: true")
    text = "\n".join(lines) + "\n"
    parse_pools(text, "the planned pools")   # what mav batch will read
    return text


def _cost(cost: float, unit: str) -> str:
    if unit == "s":
        return f"{cost:.3g} s"
    return f"{cost / 1e12:,.1f} TFLOP" if cost >= 1e12 else f"{cost / 1e9:.3g} GFLOP"


def cmd_plan_pools(args: argparse.Namespace) -> int:
    if not args.gpus > 0:
        raise CliError(f"--gpus must be > 0, got {args.gpus:g}")
    pools = load_pools(args.pools)
    check_fits(sum(p.gpus for s, p in pools.items() if s in STAGE_NAMES), args.gpus)
    checkpoint, preset = choose_model(args.checkpoint, args.preset)
    if checkpoint:
        from stages.checkpoint import load_bundle_config

        cfg = load_bundle_config(checkpoint)
    else:
        cfg = load_preset(preset)
    device = "cuda" if torch.cuda.is_available() and not args.flops else None
    dtype = network_dtype(args.dtype, torch.device(device or "cpu"))
    if device:
        torch.set_float32_matmul_precision("high")   # TF32 matmuls, as the runners compute on CUDA
    costs = stage_costs(cfg, device, dtype=dtype)
    counts = allocate(costs, pools, args.gpus)
    model = f"--checkpoint {checkpoint}" if checkpoint else f"--preset {preset}"
    command = f"mav plan-pools --gpus {args.gpus:g} {model}" + (" --flops" if args.flops else "") + (
        f" --dtype {args.dtype}" if args.dtype != "auto" else "")
    text = render(command, costs, pools, counts, args.gpus)
    if args.out:
        write_bytes_atomic(args.out, text.encode())
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``mav plan-pools`` on the ``mav`` command's subparsers."""
    p = subparsers.add_parser("plan-pools", help="print a pools file for mav batch with balanced stages on N GPUs")
    p.add_argument("--gpus", type=float, required=True, help="GPUs the batch job's pools may hold in all")
    p.add_argument("--preset", help="the model's sizes from this stage preset name or YAML path")
    p.add_argument("--checkpoint", help="the model's sizes from this checkpoint bundle directory/URL (default: the "
                                        f"shipped demo model cluster/models/{DEFAULT_MODEL}, unless --preset is given)")
    p.add_argument("--pools", help="batch sizes, CPUs and GPUs per actor (default cluster/pools.yaml)")
    p.add_argument("--flops", action="store_true", help="plan from FLOP counts even on a machine with a GPU")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="arithmetic of the timed evaluations, as mav batch's --dtype (default auto: bf16 on CUDA)")
    p.add_argument("--out", help="write the pools file here (local path or fsspec URL) instead of printing it")
    p.set_defaults(func=cmd_plan_pools)
    return p
