"""Latte's ablation on the shapes world at a reduced budget: one D^t per row, judged on its keyframes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latte_ablation.py --work /tmp/latte-ablation \\
        --image-steps 300 --video-steps 120                # every row in turn (docs/latte.md); a rerun continues
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latte_ablation.py --work /tmp/latte-ablation/seed1 \\
        --data /tmp/latte-ablation/data --seed 1 --rows unet latte-v1    # the same rows, another training seed
    .venv/bin/python benchmarks/latte_ablation.py --work /tmp/latte-ablation --table   # the table of what ran
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latte_ablation.py --cost   # seconds per sample, cpu presets

What every row shares: the recipe's synthetic data (`mav data synth` with cluster/recipes/shapes.yaml's data
and held-out pairs), the shipped CLIP and P (cluster/models/shapes), the recipe's `decoder` and
`decoder-video` training settings with --image-steps and --video-steps steps in place of its 5,000 and
1,500 and a warm-up of a tenth of the steps in place of its 100 (batch sizes, learning rate, EMA, clips at
15–30 fps and Min-SNR-5 as the recipe has them),
one worker of one CPU, and sampling as the shapes preset samples D^t. What differs is D^t's network. Each
row runs the commands a user runs, in Make-A-Video's order:

  1. ``mav train decoder``: the image D (temporal parts off) from the shapes preset with the row's backbone.
     Rows whose image network is one and the same share it: the two U-Net rows, and Latte's variants 1, 2
     and 3 with patches and adaLN (with the temporal parts off each is the same stack of spatial blocks; the
     D trained as variant 1 is saved again as variant 2 and 3, its weights loaded strictly and its output
     checked equal). Variant 4 (half its heads pass their value through in an image model), tubelets and
     condition tokens train their own.
  2. ``mav train decoder-video --init D``: D^t, its temporal parts switched on at identity, on the videos
     (with ``joint_images`` for the joint rows).
  3. ``mav eval --until decoder --no-baseline`` on the 54 prompts of cluster/recipes/shapes-eval.jsonl
     (learned-only sampling: no motion guidance; classifier-free guidance as the preset has it), on a bundle
     of the shipped stages with the row's D^t.

Steps whose output exists are skipped, so a rerun continues. Logs go to WORK/logs/, per-row timings to
WORK/rows/ROW/seconds.json, the table to WORK/table.md. The joint row of Latte takes --joint-variant, or
else the variant (1–4) whose keyframes jump in the fewest videos, ties to the smaller largest step.
Parameters and GFLOPs per sample are benchmarks/latte_cost.py's count of the row's D^t.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from latte_cost import cost, evaluations
from stages.cascade import build_stage
from stages.checkpoint import load_stage, load_stage_config, save_stage
from stages.config import LatteConfig, dump_yaml
from workflows.presets import load_preset
from workflows.shapes.recipe import load_recipe, recipe_path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "cluster" / "models" / "shapes"
PROMPTS = ROOT / "cluster" / "recipes" / "shapes-eval.jsonl"
MAV = str(Path(sys.executable).with_name("mav"))
JOINT_IMAGES = 4

# Image networks: name -> the shapes preset's D backbone (None: its U-Net) and LatteConfig changes.
IMAGE_NETS = {
    "unet": None,
    "latte": {},                       # variants 1, 2 and 3 with patches and adaLN: one image network
    "latte-v4": {"variant": 4},
    "latte-tubelet": {"patch_embedding": "tubelet"},
    "latte-tokens": {"conditioning": "tokens"},
}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    label: str
    image_net: str
    variant: int | None = None         # a Latte D^t's variant, where its image net is shared
    joint: int = 0


ROWS = (
    Row("unet", "U-Net", "unet"),
    Row("latte-v1", "Latte variant 1 (interleaved)", "latte", 1),
    Row("latte-v2", "Latte variant 2 (late fusion)", "latte", 2),
    Row("latte-v3", "Latte variant 3 (spatial + temporal attention, one MLP)", "latte", 3),
    Row("latte-v4", "Latte variant 4 (heads split)", "latte-v4"),
    Row("latte-v1-tubelet", "Latte variant 1, tubelets of 2 frames", "latte-tubelet"),
    Row("latte-v1-tokens", "Latte variant 1, condition tokens", "latte-tokens"),
    Row("latte-joint", "Latte, best variant, joint images", "latte", None, JOINT_IMAGES),
    Row("unet-joint", "U-Net, joint images", "unet", None, JOINT_IMAGES),
)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def mav(work: Path, logname: str, *args: str) -> float:
    """Run ``mav ARGS`` with one thread, its output in WORK/logs/LOGNAME.log; returns its wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    path = work / "logs" / f"{logname}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"mav {' '.join(args)}  (log {path})")
    start = time.perf_counter()
    with open(path, "w") as out:
        rc = subprocess.run([MAV, *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    seconds = time.perf_counter() - start
    if rc:
        sys.exit(f"mav {args[0]} failed (exit {rc}); see {path}")
    return seconds


def step_seconds(bundle: Path, stage: str, batch_size: int) -> float:
    """Seconds of the training steps alone (no start-up), from the run's metrics.csv (items / items per s)."""
    with open(bundle / "_train" / stage / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    total, last = 0.0, 0
    for r in rows:
        step = int(r["step"])
        total += (step - last) * batch_size / float(r["samples_per_s"])
        last = step
    return total


def batch_size(config: Path) -> int:
    return yaml.safe_load(config.read_text())["batch_size"]


def write_inputs(work: Path, image_steps: int, video_steps: int, seed: int, data_from: Path | None) -> None:
    """The data set (once; or a link to ``data_from``), a preset per image network, the two training configs."""
    recipe = load_recipe(recipe_path("shapes"))
    d = recipe.data
    data = work / "data"
    if data_from is not None and not data.exists():
        work.mkdir(parents=True, exist_ok=True)
        data.symlink_to(data_from.resolve())
        (work / "data.done").write_text("")
    if not (work / "data.done").exists():
        holdout = list(recipe.holdout)
        mav(work, "synth", "data", "synth", "--out", str(data), "--images", str(d.images), "--videos", str(d.videos),
            "--size", str(d.size), "--frames", str(d.frames), "--seed", str(d.seed),
            "--speed", str(d.speed[0]), str(d.speed[1]), "--holdout", *holdout)
        (work / "data.done").write_text("")
    base = load_preset(recipe.preset)
    for name, change in IMAGE_NETS.items():
        preset = base
        if change is not None:
            network = {"backbone": "latte", "latte": dataclasses.replace(LatteConfig(), **change)}
            preset = dataclasses.replace(base, decoder=dataclasses.replace(base.decoder, **network),
                                         interpolation=dataclasses.replace(base.interpolation, **network))
        (work / "presets").mkdir(parents=True, exist_ok=True)
        (work / "presets" / f"{name}.yaml").write_text(dump_yaml(preset))
    for stage, steps in (("decoder", image_steps), ("decoder-video", video_steps)):
        cfg = dataclasses.replace(recipe.stages[stage], max_steps=steps, warmup_steps=max(1, steps // 10),
                                  checkpoint_every=steps, log_every=25, seed=seed)
        (work / f"{stage}.yaml").write_text(dump_yaml(cfg))


def train_image(work: Path, name: str) -> Path:
    out = work / "image" / name
    if not (out / "decoder" / "config.yaml").exists():
        shutil.rmtree(out, ignore_errors=True)
        seconds = mav(work, f"image-{name}", "train", "decoder", "--data", str(work / "data"), "--output", str(out),
                      "--preset", str(work / "presets" / f"{name}.yaml"), "--config", str(work / "decoder.yaml"),
                      "--clip", str(SHIPPED), "--workers", "1", "--cpus-per-worker", "1")
        steps = step_seconds(out, "decoder", batch_size(work / "decoder.yaml"))
        (out / "seconds.json").write_text(json.dumps({"wall": seconds, "steps": steps}))
    return out


def as_variant(image: Path, variant: int, out: Path) -> Path:
    """The Latte image D of ``image`` saved as ``variant`` (1–3: the same network with the temporal parts off)."""
    if (out / "decoder" / "config.yaml").exists():
        return out
    cfg, net = load_stage(str(image), "decoder")
    if cfg.latte.variant == variant:
        return image
    other_cfg = dataclasses.replace(cfg, latte=dataclasses.replace(cfg.latte, variant=variant))
    other = build_stage("decoder", other_cfg)
    other.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(2, 3, 1, cfg.size, cfg.size, generator=torch.Generator().manual_seed(0))
    kwargs = {"image_embeds": torch.randn(2, cfg.image_embed_dim, generator=torch.Generator().manual_seed(1)),
              "fps": torch.tensor([0.0, 0.0])}
    with torch.no_grad():
        if not torch.equal(net.eval()(x, torch.tensor([10, 900]), **kwargs),
                           other.eval()(x, torch.tensor([10, 900]), **kwargs)):
            sys.exit(f"the image D of {image} is not the same network as variant {variant}")
    save_stage(str(out), "decoder", other_cfg, other)
    return out


def eval_bundle(work: Path, row: Row, trained: Path) -> Path:
    """The shipped bundle with the row's D^t (symbolic links; mav eval --until decoder reads clip, prior, decoder)."""
    bundle = work / "bundles" / row.name
    bundle.mkdir(parents=True, exist_ok=True)
    for entry in SHIPPED.iterdir():
        link = bundle / entry.name
        if not link.exists():
            link.symlink_to(trained / "decoder" if entry.name == "decoder" else entry)
    return bundle


def run_row(work: Path, row: Row) -> None:
    report = work / "eval" / row.name / "report.json"
    if report.exists():
        log(f"{row.name}: done in an earlier run")
        return
    image = train_image(work, row.image_net)
    init = image if row.variant is None else as_variant(image, row.variant, work / "image" / f"latte-as-v{row.variant}")
    out = work / "rows" / row.name
    if not (out / "decoder" / "config.yaml").exists():
        shutil.rmtree(out, ignore_errors=True)
        config = work / "decoder-video.yaml"
        if row.joint:
            config = work / f"decoder-video-joint{row.joint}.yaml"
            text = (work / "decoder-video.yaml").read_text().replace("joint_images: 0", f"joint_images: {row.joint}")
            config.write_text(text)
        seconds = mav(work, f"video-{row.name}", "train", "decoder-video", "--data", str(work / "data"),
                      "--output", str(out), "--init", str(init), "--clip", str(SHIPPED),
                      "--preset", str(work / "presets" / f"{row.image_net}.yaml"), "--config", str(config),
                      "--workers", "1", "--cpus-per-worker", "1")
        steps = step_seconds(out, "decoder-video", batch_size(config))
        (out / "seconds.json").write_text(json.dumps({"wall": seconds, "steps": steps}))
    bundle = eval_bundle(work, row, out)
    seconds = mav(work, f"eval-{row.name}", "eval", "--checkpoint", str(bundle), "--prompts", str(PROMPTS),
                  "--out", str(work / "eval" / row.name), "--until", "decoder", "--no-baseline")
    (work / "eval" / row.name / "seconds.json").write_text(json.dumps({"wall": seconds}))


def best_variant(work: Path) -> int | None:
    """The Latte variant (1–4) whose keyframes jump in the fewest videos, ties to the smaller largest step."""
    scores = {}
    for v in (1, 2, 3, 4):
        path = work / "eval" / f"latte-v{v}" / "report.json"
        if path.exists():
            o = json.loads(path.read_text())["models"]["video"]["overall"]
            scores[v] = (o["jump"], o["largest_step"])
    return min(scores, key=scores.get) if scores else None


def _pct(x) -> str:
    return "" if x is None else f"{x:.0%}"


def _num(x, digits=3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def table(work: Path) -> str:
    head = ("| D^t | parameters | GFLOPs per sample | training s (D + D^t) | colour | shape | one object | present "
            "| step per frame | largest step | jumps | reach | travel | straightness |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    reference = None
    for row in ROWS:
        path = work / "eval" / row.name / "report.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        reference = report["judge"]["reference"]
        video = report["models"]["video"]
        o = video["overall"]
        jumps = sum(bool(p["jump"]) for p in video["prompts"])
        cfg = load_stage_config(str(work / "rows" / row.name), "decoder")
        params, gflops = cost("decoder", cfg, cfg.frames, cfg.size)
        image_s = json.loads((work / "image" / row.image_net / "seconds.json").read_text())["steps"]
        video_s = json.loads((work / "rows" / row.name / "seconds.json").read_text())["steps"]
        label = row.label
        if row.image_net == "latte" and row.variant is None:
            label = f"Latte variant {cfg.latte.variant}, joint images ({row.joint} per clip)"
        elif row.joint:
            label = f"{row.label} ({row.joint} per clip)"
        lines.append(f"| {label} | {params:,} | {gflops * evaluations(cfg):,.1f} | {image_s:.0f} + {video_s:.0f} "
                     f"| {_pct(o['colour_accuracy'])} | {_pct(o['shape_accuracy'])} | {_pct(o['one_object'])} "
                     f"| {_pct(o['present'])} | {_num(o['displacement_mean'])} | {_num(o['largest_step'])} "
                     f"| {jumps} | {_num(o['reach'])} | {_num(o['travel'])} | {_num(o['straightness'], 2)} |")
    if reference is not None:
        r = reference
        lines.append(f"| (real keyframes, the judge's reference) | | | | | | {_pct(r['one_object'])} "
                     f"| {_pct(r['present'])} | {_num(r['displacement_mean'])} | {_num(r['largest_step'])} "
                     f"| {_pct(r['jump'])} of videos | {_num(r['reach'])} | {_num(r['travel'])} "
                     f"| {_num(r['straightness'], 2)} |")
    return "\n".join(lines)


def seconds_per_sample(presets: list[str], reps: int, max_evaluations: int | None, frames: int | None) -> None:
    """D^t and ↑F of each preset, fresh weights, batch 1 at the stage's full shape (or on ``frames`` frames),
    one thread: seconds of the network evaluations a sample takes (the sampler's own arithmetic is negligible
    beside them). With ``max_evaluations`` only that many are timed and the rest extrapolated (marked so)."""
    torch.set_num_threads(1)
    print("| preset | stage | parameters | one evaluation on | evaluations per sample | s per evaluation "
          "| s per sample | runs (s) |")
    print("|---|---|---:|---|---:|---:|---:|---|")
    for name in presets:
        preset = load_preset(name)
        for stage, cfg, full in (("decoder", preset.decoder, preset.decoder.frames),
                                 ("interpolation", preset.interpolation, preset.output_frames)):
            net = build_stage(stage, cfg).eval()
            size, f = preset.decoder.size, frames or full
            x = torch.randn(1, 3, f, size, size, generator=torch.Generator().manual_seed(0))
            kwargs = {"image_embeds": torch.zeros(1, cfg.image_embed_dim), "fps": torch.full((1,), 8.0)}
            if stage == "interpolation":
                kwargs["cond_frames"] = torch.zeros(1, 4, f, size, size)
            n = evaluations(cfg)
            timed = n if max_evaluations is None else min(n, max_evaluations)
            runs = []
            with torch.inference_mode():
                net(x, torch.full((1,), 500), **kwargs)  # warm-up
                for _ in range(reps):
                    start = time.perf_counter()
                    for _ in range(timed):
                        net(x, torch.full((1,), 500), **kwargs)
                    runs.append((time.perf_counter() - start) / timed)
            per = statistics.median(runs)
            params = sum(p.numel() for p in net.parameters())
            mark = "" if timed == n else f" (extrapolated from {timed})"
            sample = f"{per * n:.3g}{mark}" if f == full else f"not measured ({f} of {full} frames)"
            print(f"| `{name}` ({cfg.backbone}) | {stage} | {params:,} | {f}×{size}² | {n} | {per:.3g} | {sample} "
                  f"| {', '.join(f'{r:.3g}' for r in runs)} |", flush=True)
            del net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/latte-ablation"), help="where everything goes")
    parser.add_argument("--image-steps", type=int, default=300, help="mav train decoder steps of every image D")
    parser.add_argument("--video-steps", type=int, default=120, help="mav train decoder-video steps of every D^t")
    parser.add_argument("--seed", type=int, default=0, help="training seed of both stages (the recipe's: 0)")
    parser.add_argument("--data", type=Path, help="an existing data set of the recipe's (default: synthesised)")
    parser.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS], help="these rows only, in this order")
    parser.add_argument("--joint-variant", type=int, choices=(1, 2, 3, 4),
                        help="the Latte variant of the joint row (default: the best of the variant rows)")
    parser.add_argument("--table", action="store_true", help="print the table of the rows that ran; train nothing")
    parser.add_argument("--cost", nargs="*", metavar="PRESET",
                        help="seconds per sample of D^t and ↑F at these presets (default cpu cpu-latte); no ablation")
    parser.add_argument("--cost-reps", type=int, default=3)
    parser.add_argument("--cost-max-evaluations", type=int, help="time at most this many evaluations per sample")
    parser.add_argument("--cost-frames", type=int, help="time the networks on this many frames, not the stage's")
    args = parser.parse_args()
    if args.cost is not None:
        seconds_per_sample(args.cost or ["cpu", "cpu-latte"], args.cost_reps, args.cost_max_evaluations,
                           args.cost_frames)
        return
    work = args.work.resolve()
    if not args.table:
        write_inputs(work, args.image_steps, args.video_steps, args.seed, args.data)
        for row in [r for r in ROWS if args.rows is None or r.name in args.rows]:
            if row.image_net == "latte" and row.variant is None:
                variant = args.joint_variant or best_variant(work)
                if variant is None:
                    log(f"{row.name}: no variant row has run and no --joint-variant; skipped")
                    continue
                row = dataclasses.replace(row, variant=variant)
            run_row(work, row)
            (work / "table.md").write_text(table(work) + "\n")
            log(f"{row.name}: done; table in {work / 'table.md'}")
    print(table(work))


if __name__ == "__main__":
    main()
