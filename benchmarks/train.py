"""Training throughput: samples/s per stage with 1 vs 2 Ray Train workers, and the data loader alone.

    .venv/bin/python benchmarks/train.py --out benchmarks/results-train.json

Uses the CPU preset's network sizes (``--preset``) on synthetic shapes data written to a temporary
directory. Each stage runs ``--steps`` optimizer steps per worker count; samples/s is the logged
figure of the last log window (start-up excluded). The loader figure is rows/s of iterating the
decoded Ray Data set with no training attached, per data kind.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

STAGES = ("clip", "prior", "decoder", "sr-low", "sr-high", "decoder-video", "sr-low-video", "interpolation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--out", help="write the figures as JSON here too")
    args = ap.parse_args()

    from stages.training import TrainConfig
    from workflows.presets import load_preset
    from workflows.ray_cluster import init_ray
    from workflows.shapes.data import synth
    from workflows.train import TrainJob, read_metrics, run_training
    from workflows.train.data import image_dataset, video_dataset

    preset = load_preset(args.preset)
    init_ray(None, cpus_needed=4)
    work = tempfile.mkdtemp(prefix="mav-bench-train-")
    data = os.path.join(work, "shapes")
    size = max(preset.sr_high.out_size, preset.clip.image_size)
    synth(data, images=128, videos=8, size=size, frames=96, seed=0)
    results: dict = {"preset": args.preset, "batch_size_per_worker": args.batch_size, "steps": args.steps,
                     "stages": {}, "loader": {}}

    for kind, ds in (("images", image_dataset([data], preset.decoder.size)),
                     ("videos", video_dataset([data], preset.decoder.size, max_frames=96))):
        ds = ds.materialize()
        rows, start = 0, time.perf_counter()
        for _ in range(3):
            for batch in ds.iter_batches(batch_size=args.batch_size, batch_format="numpy"):
                rows += len(batch["ok"])
        results["loader"][kind] = rows / (time.perf_counter() - start)
        print(f"loader {kind}: {results['loader'][kind]:.0f} rows/s", flush=True)

    bundle = os.path.join(work, "model")
    cfg = TrainConfig(batch_size=args.batch_size, max_steps=args.steps, log_every=max(1, args.steps // 3),
                      checkpoint_every=args.steps, frames=16)
    for stage in args.stages.split(","):
        init = bundle if stage in ("decoder-video", "sr-low-video", "interpolation") else None
        row = {}
        for workers in [int(w) for w in args.workers.split(",")]:
            out = bundle if workers == 1 else os.path.join(work, f"model-{stage}-{workers}")
            if out != bundle:
                _copy_bundle(bundle, out)
            job = TrainJob(stage=stage, data=(data,), output=out, config=cfg, preset=args.preset, init=init,
                           clip=bundle, workers=workers)
            start = time.perf_counter()
            run_training(job)
            wall = time.perf_counter() - start
            log = read_metrics(out, stage)
            row[workers] = {"samples_per_s": log[-1]["samples_per_s"], "wall_s": wall}
            print(f"{stage:<14} workers {workers}: {log[-1]['samples_per_s']:7.2f} samples/s  (run {wall:.0f}s)", flush=True)
        if len(row) > 1:
            ws = sorted(row)
            row["speedup"] = row[ws[-1]]["samples_per_s"] / row[ws[0]]["samples_per_s"]
        results["stages"][stage] = row

    print("\n| stage | samples/s, 1 worker | samples/s, 2 workers | 2 vs 1 |")
    print("|---|---|---|---|")
    for stage, row in results["stages"].items():
        one, two = row.get(1, {}).get("samples_per_s"), row.get(2, {}).get("samples_per_s")
        print(f"| {stage} | {one:.2f} | {two:.2f} | {row.get('speedup', float('nan')):.2f}x |"
              if one and two else f"| {stage} | {one} | {two} | |")
    print(f"\nloader alone: images {results['loader']['images']:.0f} rows/s, videos {results['loader']['videos']:.0f} rows/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=float)


def _copy_bundle(src: str, dst: str) -> None:
    import shutil

    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not name.startswith("_"):
            shutil.copytree(os.path.join(src, name), os.path.join(dst, name), dirs_exist_ok=True)


if __name__ == "__main__":
    main()
