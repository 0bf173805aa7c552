"""``mav train STAGE --data URL --output BUNDLE [...]``: one stage on Ray Train (see ``workflows.train``)."""

from __future__ import annotations

import dataclasses
import sys
import time

from stages.fsio import join
from stages.training import TRAINING_STAGES
from workflows.errors import CliError, sigterm_as_interrupt
from workflows.presets import DEFAULT_PRESET, load_preset
from workflows.ray_cluster import init_ray
from workflows.resources import Need, WaitWatch, check_cluster, fmt, print_waits, waiting_placement_groups
from workflows.train.job import TrainJob, cpus_needed, load_train_config, run_training

RECIPE_ORDER = ("clip", "prior", "decoder", "sr-low", "sr-high", "decoder-video", "sr-low-video", "interpolation")


def add_parsers(sub) -> None:
    """The ``mav train`` subcommand."""
    tr = sub.add_parser("train", help="train one stage on Ray Train (paper recipe order: " + " -> ".join(RECIPE_ORDER)
                        + ")")
    tr.add_argument("stage", choices=list(TRAINING_STAGES))
    tr.add_argument("--data", nargs="+", required=True, metavar="URL",
                    help="training data: synthetic-data roots, directories, files or globs (local or fsspec URLs)")
    tr.add_argument("--output", required=True, metavar="URL", help="checkpoint bundle the stage is written into")
    tr.add_argument("--config", help="training config YAML (fields of stages.training.TrainConfig)")
    tr.add_argument("--preset", default=DEFAULT_PRESET, help="stage preset giving the network sizes (default cpu)")
    tr.add_argument("--workers", type=int, default=1, help="data-parallel workers (default 1)")
    tr.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: CPU with gloo)")
    tr.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker, also its thread count")
    tr.add_argument("--max-steps", type=int, help="optimizer steps (overrides the config's max_steps)")
    tr.add_argument("--resume", action="store_true", help="continue this stage's run under --output")
    tr.add_argument("--init", metavar="URL", help="bundle to start from (video stages and interpolation)")
    tr.add_argument("--clip", metavar="URL", help="bundle holding the CLIP stage (default: --output)")
    tr.add_argument("--vae", metavar="DIR", help="decoder: a diffusers AutoencoderKL folder (safetensors); D^t then "
                    "diffuses its latents and the bundle keeps a copy (docs/latte.md)")
    tr.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    tr.set_defaults(func=run)


def run(args) -> int:
    """Bad arguments, data or bundles raise UserError (the CLI prints one line, exit 2) before training starts."""
    if args.workers < 1:
        raise CliError("--workers must be >= 1")
    cfg = load_train_config(args.config, args.stage)
    if args.max_steps is not None:
        cfg = dataclasses.replace(cfg, max_steps=args.max_steps)
    load_preset(args.preset)
    job = TrainJob(stage=args.stage, data=tuple(args.data), output=args.output, config=cfg, preset=args.preset,
                   init=args.init, clip=args.clip, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                   cpus_per_worker=args.cpus_per_worker, vae=args.vae)
    init_ray(args.address, cpus_needed(args.workers, args.cpus_per_worker), log_to_driver=True)  # rank 0's log lines
    worker = {"CPU": args.cpus_per_worker, "GPU": args.gpus_per_worker}
    check_cluster([Need("training workers", args.workers, worker), Need("Ray Data reader", 1, {"CPU": 1.0})],
                  what="the training job", fix="ask for fewer --workers or --cpus-per-worker")
    start = time.perf_counter()
    try:
        with sigterm_as_interrupt() as stop, WaitWatch(_waiting_workers, print_waits()):
            metrics = run_training(job, resume=args.resume)
    except KeyboardInterrupt:
        what, status = stop.status()
        print(f"mav: {what}; the run's checkpoints are kept under {job.run_dir}: rerun with --resume to continue",
              file=sys.stderr)
        return status
    resumed = int(metrics.get("resumed_from", 0))  # a worker or node lost, or --resume: went on from a checkpoint
    print(f"[{args.stage}] done: {int(metrics.get('step', 0))} steps in {time.perf_counter() - start:.0f}s"
          f"{f' (resumed from the checkpoint of step {resumed})' if resumed else ''}, "
          f"final loss {metrics.get('loss', float('nan')):.4f}, {int(metrics.get('skipped_items', 0))} items skipped; "
          f"wrote {join(args.output, job.spec.produces)}; metrics in {job.run_dir}", file=sys.stderr)
    return 0


def _waiting_workers() -> str:
    """What of the training job waits for resources: Ray Train's worker groups not yet placed."""
    return ", ".join(f"training workers {len(bundles)} x ({fmt(bundles[0])} each)"
                     for bundles in waiting_placement_groups() if bundles)
