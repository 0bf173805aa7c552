"""The ``mav`` command.

    mav generate "a blue square on a white background" --out sq.mp4        # the shipped demo model
    mav generate "a red ball" "a blue square" --out videos/ --seed 7 --preset cpu   # fresh weights
    mav generate "a red ball" --out s3://bucket/videos/ball.mp4 --checkpoint s3://bucket/models/shapes
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
import warnings

from stages.errors import UserError
from workflows import plan_pools, serve, shapes, train, tune
from workflows.batch import JobSpec, run_job
from workflows.importers import unclip as import_unclip
from workflows.errors import EXIT_FAILED, EXIT_USAGE, CliError, sigterm_as_interrupt
from workflows.outputs import check_writable, video_paths, write_videos
from workflows.pipeline import DEFAULT_FPS, MAX_MOTION, MAX_SEED, Pipeline, Request
from workflows.pools import load_pools
from workflows.presets import DEFAULT_MODEL, choose_model
from workflows.progress import RowBars, StageBars
from workflows.ray_cluster import init_ray
from workflows.runners import DTYPES


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("diffusers", "torch", "ray", "fsspec", "s3fs", "botocore"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = list(args.prompts)
    for i, p in enumerate(prompts, 1):
        if not p.strip():
            raise CliError(f"prompt {i} is empty")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(0, 2**31)
    if not 0 <= seed <= MAX_SEED - len(prompts):
        raise CliError(f"--seed must be in 0..{MAX_SEED - len(prompts)}, got {seed}")
    try:
        requests = [
            Request(prompt=p, seed=seed + i, fps=args.fps, steps=args.steps, guidance=args.guidance,
                    motion=None if args.motion is None else tuple(args.motion))
            for i, p in enumerate(prompts)
        ]
    except UserError as e:  # the message names the field; here it is the option of that name
        raise CliError(f"--{e}") from None
    checkpoint, preset = choose_model(args.checkpoint, args.preset)

    paths = video_paths(args.out, prompts)

    start = time.perf_counter()
    pipe = Pipeline(checkpoint=checkpoint, preset=preset, progress=StageBars(), dtype=args.dtype)
    decoder = next(r for r in pipe.runners if r.stage == "decoder")
    if args.motion is not None and not decoder.cfg.frame_noise.sampling_shared:
        raise CliError("--motion: motion guidance moves the noise's common part, and this model's decoder D^t "
                       "shares no noise between frames when sampling (its frame_noise.sample_shared, or else "
                       "shared, is 0)")
    print(f"seed {seed}" + (f" (prompt i uses {seed}+i)" if len(prompts) > 1 else ""), file=sys.stderr)
    videos = []
    for i in range(0, len(requests), args.batch_size):
        videos += pipe.generate(requests[i : i + args.batch_size])
    write_videos(paths, videos, prompts)
    print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    pools = load_pools(args.pools)
    checkpoint, preset = choose_model(args.checkpoint, args.preset)
    try:
        check_writable(args.output)
    except Exception as e:
        raise CliError(f"cannot write to {args.output}: {e}") from None
    job = JobSpec(prompts=tuple(args.prompts), output=args.output, preset=preset, checkpoint=checkpoint,
                  seed=args.seed, dtype=args.dtype)
    try:
        init_ray(args.address, sum(p.cpus * p.start_actors for p in pools.values()))
    except Exception as e:
        raise CliError(f"cannot start or join Ray ({args.address or 'local'}): {e}", EXIT_FAILED) from None
    try:
        with sigterm_as_interrupt() as stop:  # ray job stop, Kubernetes: stop as Ctrl-C does
            result = run_job(job, pools, progress=RowBars())
    except KeyboardInterrupt:
        what, status = stop.status()
        print(f"mav: {what}; finished videos are kept, rerun the same command to resume "
              f"(manifest: {args.output})", file=sys.stderr)
        return status
    minutes = result.wall_seconds / 60
    made = result.ok - result.skipped
    print(f"videos: {result.ok} ok ({made} made now, {result.skipped} from an earlier run), {result.failed} failed, "
          f"{result.truncated} prompts truncated", file=sys.stderr)
    print(f"wall time {result.wall_seconds:.1f}s, throughput {made / max(minutes, 1e-9):.2f} videos/min", file=sys.stderr)
    if result.utilisation:
        print("utilisation " + ", ".join(f"{k} {v:.0%}" for k, v in result.utilisation.items()), file=sys.stderr)
    if result.actors_lost:
        print(f"faults: {result.actors_lost} stage actor(s) lost (a process or node died) and replaced, "
              f"{result.rows_retried} rows retried on the replacements", file=sys.stderr)
    print(f"manifest {result.manifest}", file=sys.stderr)
    for rec in result.records:
        if rec["status"] != "ok":
            print(f"failed {rec['id']}: {rec.get('error', '')}", file=sys.stderr)
            break
    return 0 if result.failed == 0 else EXIT_FAILED


DTYPE_HELP = ("the networks' arithmetic: bf16 (bfloat16 autocast; latents and sampler in float32), fp32, or auto: "
              "bf16 on CUDA, fp32 elsewhere (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mav", description="Make-A-Video: text-to-video on PyTorch and Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate videos from prompts on this machine")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--out", required=True, help="an .mp4 path/URL for one prompt, or a directory/prefix")
    gen.add_argument("--seed", type=int, help="seed of the first prompt (prompt i uses seed+i); random if omitted")
    gen.add_argument("--fps", type=int, default=DEFAULT_FPS, help="keyframe rate 1..30 the decoder is conditioned "
                     f"on; the video plays at fps x frame skip (default {DEFAULT_FPS})")
    gen.add_argument("--steps", type=int, help="sampling steps for every diffusion stage (default: the preset's)")
    gen.add_argument("--guidance", type=float, help="decoder classifier-free guidance scale (default: the preset's)")
    gen.add_argument("--motion", type=float, nargs=2, metavar=("DY", "DX"),
                     help="motion guidance: the noise's common part moves DY (vertically) and DX (horizontally) "
                          f"frame sizes per keyframe, each in -{MAX_MOTION}..{MAX_MOTION} (default: off, the motion "
                          "is the model's own)")
    gen.add_argument("--preset", help="fresh (untrained) weights from this stage preset name or YAML path")
    gen.add_argument("--checkpoint", help="checkpoint bundle directory/URL (default: the shipped demo model "
                                          f"cluster/models/{DEFAULT_MODEL}, unless --preset is given)")
    gen.add_argument("--batch-size", type=int, default=4, help="prompts per forward pass (default 4)")
    gen.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    gen.set_defaults(func=cmd_generate)

    bat = sub.add_parser("batch", help="generate one video per prompt of prompt files on a Ray cluster")
    bat.add_argument("--prompts", nargs="+", required=True, metavar="URL",
                     help=".txt/.jsonl/.csv/.parquet files or globs, local or any fsspec URL (s3://...). .txt: a "
                          "prompt per line; the others: a prompt column and optional id, seed, fps, steps, guidance, "
                          "negative_prompt and motion (motion guidance DY, DX: [dy, dx] in .jsonl, \"dy dx\" in .csv, "
                          "a list column in .parquet)")
    bat.add_argument("--output", required=True, metavar="URL", help="directory/prefix for videos and manifest.parquet")
    bat.add_argument("--pools", help="per-stage actor pools YAML (default cluster/pools.yaml)")
    bat.add_argument("--preset", help="fresh (untrained) weights from this stage preset name or YAML path")
    bat.add_argument("--checkpoint", help="checkpoint bundle directory/URL (default: the shipped demo model "
                                          f"cluster/models/{DEFAULT_MODEL}, unless --preset is given)")
    bat.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    bat.add_argument("--seed", type=int, default=0, help="base of the per-row seeds of rows without a seed column")
    bat.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    bat.set_defaults(func=cmd_batch)

    serve.add_parser(sub)
    train.add_parsers(sub)
    shapes.add_parsers(sub)  # recipe, eval, data synth
    tune.add_parsers(sub)  # tune, edit
    plan_pools.add_parser(sub)
    import_unclip.add_parser(sub)  # import unclip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        if getattr(args, "batch_size", 1) < 1:
            raise CliError("--batch-size must be >= 1")
        return args.func(args)
    except UserError as e:
        print(f"mav: error: {e}", file=sys.stderr)
        return getattr(e, "code", EXIT_USAGE)
    except KeyboardInterrupt:
        print("mav: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line unless MAV_DEBUG asks for the traceback
        if os.environ.get("MAV_DEBUG"):
            raise
        lines = [line for line in str(e).splitlines() if line.strip()]
        print(f"mav: error: {type(e).__name__}: {lines[0] if lines else ''} (MAV_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
