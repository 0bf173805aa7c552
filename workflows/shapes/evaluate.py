"""``mav eval``: does the model make the object the prompt asks for, moving coherently? Measured, not looked at.

    mav eval --checkpoint models/shapes --prompts cluster/recipes/shapes-eval.jsonl --out eval/shapes
    mav eval --checkpoint models/shapes --prompts cluster/recipes/shapes-eval.jsonl --out eval/keyframes --until decoder
    mav eval --checkpoint models/shapes --prompts cluster/recipes/shapes-eval.jsonl --out eval/guided --motion 0 0.1

Generates one video per prompt with the trained bundle (``video``: D^t and SR_l^t fine-tuned on unlabeled
video) and with the image-only baseline (``image_baseline``: the bundle with the image-trained D and SR_l
of ``CHECKPOINT/_image``, i.e. D^t with its temporal layers at identity, which makes every keyframe on its
own), and scores every video with the judge (judge.py), which is itself scored on ground-truth videos at the
same size, length and frame rate (``judge`` in the report). ``--until decoder`` judges D^t's keyframes instead
of the finished videos. Held-out colour×shape pairs (``CHECKPOINT/_recipe/recipe.json`` or ``--holdout``) are
reported separately.

Sampling uses only what the model learned unless motion guidance is asked for: ``--motion DY DX`` for the
rows without a ``motion`` column, or a row's own ``motion``. A run where any prompt is guided is labelled
``motion-guided`` (``sampling`` in the report, each prompt's ``motion``, the summary lines and the figures),
so that it is never read as the learned-only result.

Writes ``OUT/report.json``, ``OUT/report.png`` (the figures), ``OUT/samples.png`` (frames of a few videos of
each model), ``OUT/samples.gif`` (the trained model's first videos, playing) and ``OUT/videos/MODEL/*.mp4``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass

from stages.checkpoint import CheckpointError, load_stage_config
from stages.config import STAGE_NAMES
from stages.errors import UserError
from stages.fsio import join, write_bytes_atomic
from workflows.pipeline import DEFAULT_FPS
from workflows.shapes.judge import judge_accuracy, judge_frames, summarise, video_metrics
from workflows.shapes.recipe import IMAGE_DIR, read_state
from workflows.shapes.world import SPEED, check_speed, parse_holdout, prompt_target

LEARNED_ONLY = "learned-only"      # sampling from what the model learned, no guidance
MOTION_GUIDED = "motion-guided"    # some prompt's noise was moved along a given motion


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    checkpoint: str
    prompts: tuple[str, ...]                    # prompt files (workflows.inputs formats)
    out: str
    baseline: str | None = None                 # bundle of the image-only stages; None: no baseline
    holdout: tuple[tuple[str, str], ...] = ()   # colour×shape pairs the captions left out
    seed: int = 0                               # base of the per-row seeds of rows without a seed
    steps: int | None = None
    fps: int = DEFAULT_FPS                      # keyframe rate of rows without an fps
    motion: tuple[float, float] | None = None   # motion guidance (dy, dx) of rows without one; None: off
    batch_size: int = 4
    judge_videos: int = 54                      # ground-truth videos the judge is scored on
    until: str = "sr_high"                      # the last stage run: its output is judged (decoder: keyframes)
    speed: tuple[float, float] = SPEED          # the ground truth's speeds (the videos the bundle learned from)


def stage_checkpoints(checkpoint: str, override: str | None) -> dict[str, str]:
    """Per stage, the bundle to load it from: ``override``'s stages where it has them, else ``checkpoint``."""
    out = {}
    for name in STAGE_NAMES:
        url = checkpoint
        if override is not None:
            try:
                load_stage_config(override, name)
                url = override
            except CheckpointError:
                pass
        out[name] = url
    return out


def default_baseline(checkpoint: str) -> str | None:
    url = join(checkpoint, IMAGE_DIR)
    try:
        load_stage_config(url, "decoder")
        return url
    except CheckpointError:
        return None


def default_holdout(checkpoint: str) -> tuple[tuple[str, str], ...]:
    state = read_state(checkpoint)
    return tuple(parse_holdout(state["settings"]["holdout"])) if state else ()


def default_speed(checkpoint: str) -> tuple[float, float]:
    """The speeds of the recipe's videos (from CHECKPOINT/_recipe/recipe.json), else world.py's."""
    state = read_state(checkpoint)
    return check_speed(state["settings"]["data"].get("speed", SPEED)) if state else SPEED


def read_requests(spec: EvalSpec) -> list:
    """The prompt files' rows as requests, each naming one colour and one shape; ``spec``'s fps, steps and
    motion where a row gives none. ValueError naming the row otherwise."""
    from workflows.batch import to_request
    from workflows.inputs import open_inputs, read_rows

    requests = []
    for row in read_rows(open_inputs(list(spec.prompts))):
        if row.error:
            raise UserError(f"{row.source}: {row.error}")
        fields = {"fps": spec.fps, **({"steps": spec.steps} if spec.steps else {}), **row.fields}
        req = to_request(dataclasses.replace(row, fields=fields), spec.seed)
        if req.motion is None and spec.motion is not None:
            req = dataclasses.replace(req, motion=spec.motion)
        prompt_target(req.prompt)
        requests.append(req)
    if not requests:
        raise UserError(f"no prompts in {', '.join(spec.prompts)}")
    return requests


def sampling(requests: list) -> str:
    """``motion-guided`` if any request asks for motion guidance, else ``learned-only``."""
    return MOTION_GUIDED if any(r.motion is not None for r in requests) else LEARNED_ONLY


def evaluate(spec: EvalSpec, log=None) -> dict:
    """Generate, judge and report (see the module docstring); returns the report."""
    from workflows.outputs import safe_name
    from workflows.pipeline import Pipeline
    from workflows.shapes.figures import plot, sample_gif, sample_sheet
    from workflows.video import encode_mp4

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    requests = read_requests(spec)
    held = {tuple(p) for p in spec.holdout}
    models = {"video": stage_checkpoints(spec.checkpoint, None)}
    if spec.baseline:
        models["image_baseline"] = stage_checkpoints(spec.checkpoint, spec.baseline)
    report: dict = {"checkpoint": spec.checkpoint, "baseline": spec.baseline, "until": spec.until,
                    "sampling": sampling(requests), "motion": None if spec.motion is None else list(spec.motion),
                    "guided_prompts": sum(r.motion is not None for r in requests),
                    "holdout": [" ".join(p) for p in sorted(held)], "models": {}}
    samples, rates = {}, {}
    for model, checkpoints in models.items():
        start = time.perf_counter()
        pipe = Pipeline(checkpoint=checkpoints, until=spec.until)
        made = [v for i in range(0, len(requests), spec.batch_size)
                for v in pipe.generate(requests[i : i + spec.batch_size])]
        videos, fps = [v.frames for v in made], [v.fps for v in made]
        seconds = time.perf_counter() - start
        rows = []
        for i, (req, video, rate) in enumerate(zip(requests, videos, fps)):
            colour, shape = prompt_target(req.prompt)
            path = join(spec.out, "videos", model, f"{i:03d}-{safe_name(req.prompt)}.mp4")
            write_bytes_atomic(path, encode_mp4(video, rate))
            rows.append({"id": req.id, "prompt": req.prompt, "seed": int(req.seed), "target_colour": colour,
                         "target_shape": shape, "held_out": (colour, shape) in held,
                         "motion": None if req.motion is None else list(req.motion), "video": path,
                         **video_metrics(judge_frames(video), colour, shape)})
        groups = {"overall": rows, "seen": [r for r in rows if not r["held_out"]],
                  "held_out": [r for r in rows if r["held_out"]]}
        report["models"][model] = {"stages": checkpoints, "seconds": round(seconds, 1),
                                   **{g: summarise(rs) for g, rs in groups.items()}, "prompts": rows}
        samples[model], rates[model] = videos, fps
        o = report["models"][model]["overall"]
        log(f"[eval] {model} ({report['sampling']}): {len(rows)} videos in {seconds:.0f}s; "
            f"colour {o['colour_accuracy']:.0%}, shape {o['shape_accuracy']:.0%}, "
            f"displacement {_fmt(o['displacement_mean'])} ± {_fmt(o['displacement_var'], sqrt=True)}, "
            f"largest step {_fmt(o['largest_step'])}, {_fmt_share(o['jump'])} of videos jump")
    _, f, h, _ = samples["video"][0].shape
    report["judge"] = judge_accuracy(h, f, spec.judge_videos, fps=rates["video"][0], speed=spec.speed)
    j = report["judge"]
    log(f"[eval] judge on {j['videos']} ground-truth videos ({h}px, {f} frames at {j['fps']:g} fps): "
        f"colour {j['frame_colour_accuracy']:.1%}, shape {j['frame_shape_accuracy']:.1%} of frames")
    write_bytes_atomic(join(spec.out, "report.json"), json.dumps(report, indent=2).encode())
    write_bytes_atomic(join(spec.out, "report.png"), plot(report))
    write_bytes_atomic(join(spec.out, "samples.png"), sample_sheet(samples, requests))
    write_bytes_atomic(join(spec.out, "samples.gif"), sample_gif(samples["video"], requests, fps=rates["video"][0]))
    return report


def sampling_line(report: dict) -> str:
    """How the report's videos were sampled, in words."""
    if report["sampling"] == LEARNED_ONLY:
        return f"sampling: {LEARNED_ONLY} (no motion guidance)"
    given = "" if report["motion"] is None else f"--motion {report['motion'][0]:g} {report['motion'][1]:g}; "
    total = len(next(iter(report["models"].values()))["prompts"])
    return f"sampling: {MOTION_GUIDED} ({given}{report['guided_prompts']} of {total} prompts guided)"


def summary_lines(report: dict) -> list[str]:
    """How the videos were sampled, then one line per model and group of prompts (seen, held out)."""
    lines = [sampling_line(report)]
    for model, m in report["models"].items():
        for group in ("seen", "held_out"):
            g = m[group]
            if g["videos"]:
                lines.append(
                    f"{model:<15} {group:<9} {g['videos']:>3} videos  colour {g['colour_accuracy']:.0%}  "
                    f"shape {g['shape_accuracy']:.0%}  identity {g['colour_identity']:.0%}/{g['shape_identity']:.0%}  "
                    f"step {_fmt(g['displacement_mean'])} ± {_fmt(g['displacement_var'], sqrt=True)}  "
                    f"largest {_fmt(g['largest_step'])}  jumps {_fmt_share(g['jump'])}  reach {_fmt(g['reach'])}")
    return lines


def _fmt(value, sqrt: bool = False) -> str:
    return "n/a" if value is None else f"{(value ** 0.5 if sqrt else value):.4f}"


def _fmt_share(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"
