"""``mav tune VIDEO_URL --caption TEXT --output URL`` and ``mav edit --tuned URL PROMPT ... --out URL``
(see ``workflows.tune``)."""

from __future__ import annotations

import random
import sys
import time

from stages.tuning import TRAINABLE
from workflows.errors import CliError
from workflows.outputs import video_paths, write_videos
from workflows.pipeline import MAX_SEED
from workflows.progress import StageBars
from workflows.ray_cluster import init_ray
from workflows.train import cpus_needed
from workflows.tune.edit import run_edits
from workflows.tune.job import CONDITIONS, TuneOptions, run_tune

DEFAULTS = TuneOptions()


def add_parsers(sub) -> None:
    """The ``mav tune`` and ``mav edit`` subcommands."""
    tu = sub.add_parser("tune", help="tune the decoder D^t on one video (Tune-A-Video), for mav edit")
    tu.add_argument("video", metavar="VIDEO_URL", help="the source clip (an MP4, local or any fsspec URL)")
    tu.add_argument("--caption", required=True, help="what the clip shows, e.g. 'a red circle on a white background'")
    tu.add_argument("--output", required=True, metavar="URL", help="the tuned bundle to write (a new directory/prefix)")
    tu.add_argument("--checkpoint", metavar="BUNDLE", help="the bundle tuned from (default: the shipped demo model)")
    tu.add_argument("--steps", type=int, default=DEFAULTS.steps,
                    help=f"optimizer steps (default {DEFAULTS.steps}; 0: no tuning, the base D^t's inversion only)")
    tu.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"learning rate (default {DEFAULTS.lr:g})")
    tu.add_argument("--train", choices=TRAINABLE, default=DEFAULTS.train,
                    help="parameters trained: the attention queries and temporal attention (default), the temporal "
                         "layers, or all of D^t")
    tu.add_argument("--fps", type=int, default=DEFAULTS.fps, help="keyframe rate the clip is sampled at, 1..30 "
                    f"(default {DEFAULTS.fps})")
    tu.add_argument("--condition", choices=CONDITIONS, default=DEFAULTS.condition,
                    help="D^t's source condition: the keyframes' CLIP image embedding (default) or the caption "
                         "through CLIP_text and P")
    tu.add_argument("--seed", type=int, default=DEFAULTS.seed, help="training noise; P's sample of the caption")
    tu.add_argument("--workers", type=int, default=DEFAULTS.workers, help="Ray Train workers (default 1)")
    tu.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: CPU)")
    tu.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    tu.set_defaults(func=cmd_tune)

    ed = sub.add_parser("edit", help="edit a tuned bundle's source video with new prompts")
    ed.add_argument("prompts", nargs="+", metavar="PROMPT")
    ed.add_argument("--tuned", required=True, metavar="URL", help="a bundle written by mav tune")
    ed.add_argument("--out", required=True, help="an .mp4 path/URL for one prompt, or a directory/prefix")
    ed.add_argument("--seed", type=int, help="seed of the first prompt (prompt i uses seed+i); random if omitted")
    ed.add_argument("--steps", type=int, help="sampling steps for every diffusion stage (default: the bundle's)")
    ed.add_argument("--guidance", type=float, help="D^t's classifier-free guidance scale (default: the bundle's)")
    ed.add_argument("--no-inversion", action="store_true",
                    help="D^t starts from fresh noise instead of the source's inverted noise")
    ed.set_defaults(func=cmd_edit)


def cmd_tune(args) -> int:
    options = TuneOptions(steps=args.steps, lr=args.lr, train=args.train, fps=args.fps, condition=args.condition,
                          seed=args.seed, workers=args.workers, gpus_per_worker=args.gpus_per_worker)
    settings = run_tune(args.video, args.caption, args.output, options, checkpoint=args.checkpoint,
                        log=lambda line: print(line, file=sys.stderr),
                        connect=lambda: init_ray(args.address, cpus_needed(args.workers, 1.0)))
    done = (f"tuned {len(settings.parameters)} parameter tensors in {settings.steps} steps, final loss "
            f"{settings.loss:.4f}" if settings.steps else "inverted the source untuned (--steps 0)")
    print(f"{done}, {settings.seconds:.0f}s; wrote {args.output}", file=sys.stderr)
    return 0


def cmd_edit(args) -> int:
    prompts = list(args.prompts)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(0, 2**31)
    if not 0 <= seed <= MAX_SEED - len(prompts):
        raise CliError(f"--seed must be in 0..{MAX_SEED - len(prompts)}, got {seed}")
    paths = video_paths(args.out, prompts)
    start = time.perf_counter()
    videos = run_edits(args.tuned, prompts, seed=seed, steps=args.steps, guidance=args.guidance,
                       inversion=not args.no_inversion, progress=StageBars())
    write_videos(paths, videos, prompts)
    # The seed is said with the result, so that a refused input stays a one-line error.
    print(f"seed {seed}" + (f" (prompt i uses {seed}+i)" if len(prompts) > 1 else "")
          + f"; done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0
