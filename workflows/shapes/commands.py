"""The shapes world's commands (recipe.py, evaluate.py and data.py say what each does):

    mav data synth --out s3://bucket/shapes --images 2000 --videos 200
    mav recipe shapes --output models/shapes
    mav recipe shapes --output models/shapes-latte3 --decoder-backbone latte --latte-variant 3 --joint-images 4
    mav eval --checkpoint models/shapes --prompts cluster/recipes/shapes-eval.jsonl --out eval/shapes
"""

from __future__ import annotations

import dataclasses
import sys

from stages.checkpoint import load_bundle_config, load_stage_config
from stages.config import BACKBONES, CONDITIONINGS, FRAME_STAGES, PATCH_EMBEDDINGS, TEMPORAL_POSITIONS, ConfigError
from stages.errors import UserError
from stages.fsio import join
from workflows.errors import EXIT_USAGE, CliError
from workflows.pipeline import DEFAULT_FPS, check_motion
from workflows.presets import load_preset
from workflows.ray_cluster import init_ray
from workflows.shapes import evaluate, recipe
from workflows.shapes.data import synth
from workflows.shapes.world import SPEED, check_speed, parse_holdout
from workflows.train import cpus_needed

# The Latte settings `mav recipe` takes on its command line: (flag, LatteConfig field, type, choices).
LATTE_FLAGS = (("variant", "variant", int, (1, 2, 3, 4)), ("patch-embedding", "patch_embedding", str, PATCH_EMBEDDINGS),
               ("conditioning", "conditioning", str, CONDITIONINGS),
               ("temporal-position", "temporal_position", str, TEMPORAL_POSITIONS))


def add_parsers(sub) -> None:
    """Register ``recipe``, ``eval`` and ``data synth`` on the ``mav`` subparsers ``sub``."""
    rec = sub.add_parser("recipe", help="synthesise data and train every stage into one bundle (the demo model)")
    rec.add_argument("name", help="recipe under cluster/recipes (shapes)")
    rec.add_argument("--output", required=True, metavar="URL", help="checkpoint bundle to write")
    rec.add_argument("--size", default="full", choices=recipe.SIZES,
                     help="full (the demo model) or smoke (minutes, for CI)")
    rec.add_argument("--config", metavar="FILE", help="a recipe YAML of your own instead of NAME's")
    rec.add_argument("--data", metavar="URL", help="where the synthetic data goes (default OUTPUT/_data)")
    rec.add_argument("--preset", help="stage preset instead of the recipe's (name or YAML path)")
    rec.add_argument("--workers", type=int, help="Ray Train workers per stage (default: the recipe's)")
    rec.add_argument("--cpus-per-worker", type=float,
                     help="CPUs per worker, also its thread count (default: the recipe's)")
    rec.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    rec.add_argument("--decoder-backbone", choices=BACKBONES,
                     help="D^t's and ↑F's network (default: the preset's); latte: sized by the preset's decoder.latte")
    for flag, field_name, kind, choices in LATTE_FLAGS:
        rec.add_argument(f"--latte-{flag}", type=kind, choices=choices,
                         help=f"with --decoder-backbone latte: the Latte's {field_name} (stages.config.LatteConfig)")
    rec.add_argument("--joint-images", type=int, metavar="N",
                     help="decoder-video: N still images from the image data trained beside every clip")
    rec.set_defaults(func=cmd_recipe)

    ev = sub.add_parser("eval", help="generate from prompts and measure text fidelity and temporal coherence")
    ev.add_argument("--checkpoint", required=True, metavar="URL", help="the trained bundle (e.g. from mav recipe)")
    ev.add_argument("--prompts", nargs="+", required=True, metavar="FILE",
                    help="prompt files (.txt/.jsonl/.csv/.parquet); each prompt names one colour and one shape")
    ev.add_argument("--out", required=True, metavar="DIR", help="where report.json, report.png and the videos go")
    ev.add_argument("--baseline", metavar="URL", help="bundle of the image-only stages (default CHECKPOINT/_image)")
    ev.add_argument("--no-baseline", action="store_true", help="evaluate the trained bundle only")
    ev.add_argument("--holdout", nargs="*", metavar="'COLOUR SHAPE'",
                    help="held-out pairs (default: the recipe's, from CHECKPOINT/_recipe/recipe.json)")
    ev.add_argument("--seed", type=int, default=0, help="base of the seeds of rows without a seed column")
    ev.add_argument("--steps", type=int, help="sampling steps for every diffusion stage (default: the bundle's)")
    ev.add_argument("--fps", type=int, default=DEFAULT_FPS,
                    help=f"keyframe rate of rows without an fps column (default {DEFAULT_FPS})")
    ev.add_argument("--motion", type=float, nargs=2, metavar=("DY", "DX"),
                    help="motion guidance for rows without a motion column: the noise's common part moves DY, DX "
                         "frame sizes per keyframe; the report is labelled motion-guided (default: off, "
                         "learned-only sampling)")
    ev.add_argument("--batch-size", type=int, default=4, help="prompts per forward pass (default 4)")
    ev.add_argument("--judge-videos", type=int, default=54, help="ground-truth videos the judge is scored on")
    ev.add_argument("--speed", type=float, nargs=2, metavar=("LOW", "HIGH"),
                    help="speeds of the ground-truth videos, frame widths per second (default: the recipe's, "
                         "from CHECKPOINT/_recipe/recipe.json)")
    ev.add_argument("--until", choices=FRAME_STAGES, default="sr_high",
                    help="judge the cascade's output after this stage (decoder: D^t's keyframes; default sr_high, "
                         "the finished video)")
    ev.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="data utilities")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    syn = dsub.add_parser("synth", help="write the synthetic shapes data set")
    syn.add_argument("--out", required=True, metavar="URL")
    syn.add_argument("--images", type=int, default=1000, help="captioned still images (default 1000)")
    syn.add_argument("--videos", type=int, default=100, help="uncaptioned videos (default 100)")
    syn.add_argument("--size", type=int, default=64, help="image and video size in pixels (default 64)")
    syn.add_argument("--frames", type=int, default=96, help="frames per video, at 30 fps (default 96)")
    syn.add_argument("--speed", type=float, nargs=2, default=list(SPEED), metavar=("LOW", "HIGH"),
                     help=f"the shapes' speeds, frame widths per second (default {SPEED[0]:g} {SPEED[1]:g})")
    syn.add_argument("--format", default="parquet", choices=("parquet", "tar"), help="image shard format")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--holdout", nargs="*", default=[], metavar="'COLOUR SHAPE'",
                     help="colour×shape pairs left out of the captioned images (e.g. 'red triangle')")
    syn.set_defaults(func=cmd_synth)


def cmd_recipe(args) -> int:
    """``mav recipe NAME --output URL``: see recipe.py."""
    try:
        rc = recipe.load_recipe(args.config or recipe.recipe_path(args.name, args.size))
        overrides = {k: v for k, v in (("preset", args.preset), ("workers", args.workers),
                                       ("cpus_per_worker", args.cpus_per_worker)) if v is not None}
        rc = dataclasses.replace(rc, **overrides)
        load_preset(rc.preset)
        rc = _with_backbone(rc, args)
    except UserError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    init_ray(args.address, cpus_needed(rc.workers, rc.cpus_per_worker), log_to_driver=True)
    try:
        state = recipe.run_recipe(rc, args.output, data=args.data)
    except KeyboardInterrupt:
        print(f"mav: interrupted; rerun the same command to continue (state: {join(args.output, recipe.STATE_FILE)})",
              file=sys.stderr)
        return 130
    print("\n".join(["[recipe] seconds per step:", *recipe.summary_lines(state)]), file=sys.stderr)
    return 0


def _with_backbone(rc: recipe.RecipeConfig, args) -> recipe.RecipeConfig:
    """``rc`` with the command line's --decoder-backbone, --latte-* and --joint-images."""
    latte = {name: getattr(args, f"latte_{name}") for _, name, _, _ in LATTE_FLAGS
             if getattr(args, f"latte_{name}") is not None}
    backbone = args.decoder_backbone or rc.backbone
    if latte and backbone != "latte":
        raise ConfigError("the --latte-* flags need --decoder-backbone latte")
    if backbone is not None:
        base = rc.latte or load_preset(rc.preset).decoder.latte
        rc = dataclasses.replace(rc, backbone=backbone,
                                 latte=dataclasses.replace(base, **latte) if backbone == "latte" else None)
    if args.joint_images is not None:
        video = dataclasses.replace(rc.stages["decoder-video"], joint_images=args.joint_images)
        rc = dataclasses.replace(rc, stages={**rc.stages, "decoder-video": video})
    return rc


def cmd_eval(args) -> int:
    """``mav eval --checkpoint URL --prompts FILE --out DIR``: see evaluate.py."""
    try:
        load_bundle_config(args.checkpoint)
        baseline = None if args.no_baseline else args.baseline or evaluate.default_baseline(args.checkpoint)
        if baseline is not None:
            load_stage_config(baseline, "decoder")
        holdout = (tuple(parse_holdout(args.holdout)) if args.holdout is not None
                   else evaluate.default_holdout(args.checkpoint))
        speed = check_speed(args.speed) if args.speed is not None else evaluate.default_speed(args.checkpoint)
        if args.judge_videos < 1:
            raise UserError(f"--judge-videos must be >= 1, got {args.judge_videos}")
        motion = None if args.motion is None else check_motion(args.motion)
        spec = evaluate.EvalSpec(checkpoint=args.checkpoint, prompts=tuple(args.prompts), out=args.out,
                                 baseline=baseline, holdout=holdout, seed=args.seed, steps=args.steps, fps=args.fps,
                                 motion=motion, batch_size=args.batch_size, judge_videos=args.judge_videos,
                                 until=args.until, speed=speed)
        evaluate.read_requests(spec)
    except UserError as e:
        raise CliError(str(e)) from None
    if baseline is None and not args.no_baseline:
        print("mav: no image-only baseline (no CHECKPOINT/_image; pass --baseline URL to compare)", file=sys.stderr)
    report = evaluate.evaluate(spec)
    print(f"wrote {join(args.out, 'report.json')} and {join(args.out, 'report.png')}", file=sys.stderr)
    print("\n".join(evaluate.summary_lines(report)), file=sys.stderr)
    return 0


def cmd_synth(args) -> int:
    """``mav data synth --out URL``: see data.py."""
    if args.images < 0 or args.videos < 0:
        raise CliError("--images and --videos must be >= 0")

    def progress(kind: str, done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            print(f"{kind}: {done}/{total}", file=sys.stderr)

    try:
        written = synth(args.out, images=args.images, videos=args.videos, size=args.size, frames=args.frames,
                        fmt=args.format, seed=args.seed, holdout=parse_holdout(args.holdout), speed=args.speed,
                        progress=progress)
    except UserError as e:
        raise CliError(str(e)) from None
    print(f"wrote {written['images']} images and {written['videos']} videos under {args.out}", file=sys.stderr)
    return 0
