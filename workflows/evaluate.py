"""``mav eval``: does the model make the object the prompt asks for, moving coherently? Measured, not looked at.

    mav eval --checkpoint models/shapes --prompts cluster/recipes/shapes-eval.jsonl --out eval/shapes
    mav eval --checkpoint models/shapes --prompts cluster/recipes/shapes-eval.jsonl --out eval/keyframes --until decoder

Generates one video per prompt with the trained bundle (``video``: D^t and SR_l^t fine-tuned on unlabeled
video) and with the image-only baseline (``image_baseline``: the bundle with the image-trained D and SR_l
of ``CHECKPOINT/_image``, i.e. D^t with its temporal layers at identity, which makes every keyframe on its
own), and judges every frame by pixel statistics of the synthetic world (workflows/synth.py), no learned
classifier:

  * foreground: pixels some channel of which lies ``FG_DISTANCE`` or more below white, cleaned of specks by
    a 3×3 opening in frames of ``OPEN_MIN_SIZE`` pixels or more;
  * colour: the palette colour nearest (RGB distance) to the foreground's median colour;
  * shape: a triangle (apex up) has its centroid 1/6 of its height below its bounding box's middle, a circle
    or square none (measured on synth.py's renderer at 32 and 64 px: triangles 0.11–0.17, others ≤ 0.04);
    of those two, a square fills the corners of its bounding box and a circle leaves them empty (the fill
    ratio of the whole box, square ≈ 1, circle ≈ π/4, triangle ≈ 1/2, is reported too, but a generated
    square's soft edges bring it down to ≈ 0.9, which the corners do not mind);
  * position: the foreground's centroid, in units of the frame size;
  * objects: how many 4-connected parts of the foreground cover ``OBJECT_AREA`` of the frame or more.

Per video: text fidelity (the majority colour / shape over the frames equals the prompt's), temporal
coherence (share of frames showing the object, share agreeing with the majority colour / shape, share of
those showing exactly one object (``one_object``: a second object appearing, or one splitting, lowers it),
and the centroid's step from each frame showing the object to the next one that does (across frames where it is
missing: vanishing and reappearing elsewhere is a jump): mean, variance, mean |second difference| and the largest
step, which a single jump dominates however smooth the rest of the video is, and ``jump``, whether that exceeds
``JUMP_STEP``; ``travel``, the distance from the first frame's centroid to the last's, ``reach``, the farthest
any frame's centroid gets from the first's (an object that crosses the frame and bounces back travels little
but reaches far; one that jitters in place does neither), and ``straightness``, travel / path length: 1 for a
straight path, near 0 for an object that jitters in place, so that stillness does not pass for smooth motion). The
judge itself is scored on ground-truth videos rendered by synth.py at the same size, length and frame rate
(``judge`` in the report), with the same temporal figures as a reference. ``--until decoder`` judges D^t's
keyframes instead of the finished videos. Writes ``OUT/report.json``, ``OUT/report.png`` (the figures),
``OUT/samples.png`` (frames of a few videos of each model), ``OUT/samples.gif`` (the trained model's first
videos, playing) and ``OUT/videos/MODEL/*.mp4``. Held-out
colour×shape pairs (``CHECKPOINT/_recipe/recipe.json`` or ``--holdout``) are reported separately.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from dataclasses import dataclass

import numpy as np

from stages.checkpoint import CheckpointError, join, load_stage_config, write_bytes_atomic
from stages.config import FRAME_STAGES, STAGE_NAMES
from workflows.synth import COLOURS, FPS, SHAPES, SPEED, check_speed, moving_video, parse_holdout

FG_DISTANCE = 96        # foreground: some channel at least this far below white (255)
OPEN_MIN_SIZE = 48      # frames at least this large are cleaned by a 3×3 opening (smaller shapes lose their tips)
MIN_AREA = 0.004        # a frame shows an object when its foreground covers at least this share of it
OBJECT_AREA = 0.01      # a connected part of the foreground this large (share of the frame) counts as an object
JUMP_STEP = 0.2         # a longer centroid step (share of the frame) is a jump; real 5 fps keyframes' largest: 0.12
OFFSET_TRIANGLE = 0.08  # centroid this far below the bounding box's middle (share of its height): a triangle
CORNER = 0.12           # otherwise, the bounding box's four corner squares of this share of its side...
CORNER_SQUARE = 0.5     # ...filled above this share: a square (≈ 1; a circle leaves them empty)
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
MODELS = ("video", "image_baseline")


# -- the judge ------------------------------------------------------------------------------------

def _open3(mask: np.ndarray) -> np.ndarray:
    """Morphological opening of masks ``f h w`` by a 3×3 square: removes specks and one-pixel lines (a
    generated frame's stray pixels, often along its border) and keeps solid shapes."""
    def apply(m: np.ndarray, op) -> np.ndarray:
        h, w = m.shape[1:]
        p = np.pad(m, ((0, 0), (1, 1), (1, 1)))
        out = p[:, 1 : h + 1, 1 : w + 1].copy()
        for dy in range(3):
            for dx in range(3):
                out = op(out, p[:, dy : dy + h, dx : dx + w])
        return out

    return apply(apply(mask, np.logical_and), np.logical_or)


def _count_objects(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Per frame of masks ``f h w``: how many 4-connected parts have at least ``min_pixels`` pixels. Each
    pixel takes the largest label among itself and its neighbours until nothing changes."""
    f, h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(1, h, w), 0)
    while True:
        p = np.pad(labels, ((0, 0), (1, 1), (1, 1)))
        grown = np.where(mask, np.maximum.reduce([p[:, 1:-1, 1:-1], p[:, :-2, 1:-1], p[:, 2:, 1:-1],
                                                  p[:, 1:-1, :-2], p[:, 1:-1, 2:]]), 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    counts = np.zeros(f, dtype=np.int64)
    for t in range(f):
        _, sizes = np.unique(labels[t][labels[t] > 0], return_counts=True)
        counts[t] = int((sizes >= min_pixels).sum())
    return counts


def judge_frames(video: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame judgement of a uint8 ``3 f h w`` video.

    Returns arrays over frames: ``present`` (bool), ``colour`` and ``shape`` (indices into COLOURS / SHAPES,
    −1 where nothing is present), ``fill`` (foreground / bounding-box area), ``area`` (share of the frame),
    ``objects`` (connected parts of the foreground of ``OBJECT_AREA`` or more) and ``centroid`` (``f 2``: x, y
    in units of the frame size, of the whole foreground).
    """
    frames = np.ascontiguousarray(video.transpose(1, 2, 3, 0))  # f h w 3
    f, h, w, _ = frames.shape
    mask = (255 - frames.astype(np.int16)).max(axis=-1) >= FG_DISTANCE
    if min(h, w) >= OPEN_MIN_SIZE:
        mask = _open3(mask)
    area = mask.sum(axis=(1, 2))
    present = area >= MIN_AREA * h * w
    colour = np.full(f, -1)
    shape = np.full(f, -1)
    fill = np.zeros(f)
    centroid = np.full((f, 2), np.nan)
    yy, xx = np.mgrid[0:h, 0:w]
    for t in np.flatnonzero(present):
        m = mask[t]
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        height = rows[-1] - rows[0] + 1
        fill[t] = area[t] / (height * (cols[-1] - cols[0] + 1))
        offset = (yy[m].mean() + 0.5 - rows[0]) / height - 0.5
        median = np.median(frames[t][m].astype(np.float32), axis=0)
        colour[t] = int(np.argmin(((PALETTE - median) ** 2).sum(axis=1)))
        k = max(1, round(CORNER * min(height, cols[-1] - cols[0] + 1)))
        box = m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        corners = np.concatenate([box[:k, :k], box[:k, -k:], box[-k:, :k], box[-k:, -k:]], axis=None).mean()
        name = "triangle" if offset > OFFSET_TRIANGLE else "square" if corners > CORNER_SQUARE else "circle"
        shape[t] = SHAPES.index(name)
        centroid[t] = (xx[m].mean() + 0.5) / w, (yy[m].mean() + 0.5) / h
    return {"present": present, "colour": colour, "shape": shape, "fill": fill, "area": area / (h * w),
            "objects": _count_objects(mask, OBJECT_AREA * h * w), "centroid": centroid}


def _majority(values: np.ndarray) -> int:
    values = values[values >= 0]
    return int(np.bincount(values).argmax()) if len(values) else -1


def video_metrics(judged: dict[str, np.ndarray], colour: str, shape: str) -> dict:
    """Text fidelity and temporal coherence of one judged video whose prompt asked for ``colour`` ``shape``."""
    present = judged["present"]
    c_major, s_major = _majority(judged["colour"]), _majority(judged["shape"])
    n = max(int(present.sum()), 1)
    # The path through the frames that show the object: an object that vanishes and reappears elsewhere has
    # jumped, however many blank frames lie between, so a step spans them (and travel <= path length).
    shown = np.flatnonzero(present)
    c = judged["centroid"][shown]
    disp = np.linalg.norm(c[1:] - c[:-1], axis=1)
    accel = np.linalg.norm(c[2:] - 2 * c[1:-1] + c[:-2], axis=1)
    travel = float(np.linalg.norm(c[-1] - c[0])) if len(shown) > 1 else None
    reach = float(np.linalg.norm(c - c[0], axis=1).max()) if len(shown) > 1 else None
    return {
        "colour": list(COLOURS)[c_major] if c_major >= 0 else None,
        "shape": SHAPES[s_major] if s_major >= 0 else None,
        "colour_ok": c_major >= 0 and list(COLOURS)[c_major] == colour,
        "shape_ok": s_major >= 0 and SHAPES[s_major] == shape,
        "colour_frames_ok": float((judged["colour"] == list(COLOURS).index(colour)).mean()),
        "shape_frames_ok": float((judged["shape"] == SHAPES.index(shape)).mean()),
        "present": float(present.mean()),
        "colour_identity": float((judged["colour"][present] == c_major).sum() / n),
        "shape_identity": float((judged["shape"][present] == s_major).sum() / n),
        "one_object": float((judged["objects"][present] == 1).sum() / n),
        "displacement_mean": float(disp.mean()) if len(disp) else None,
        "displacement_var": float(disp.var()) if len(disp) else None,
        "acceleration_mean": float(accel.mean()) if len(accel) else None,
        "largest_step": float(disp.max()) if len(disp) else None,
        "jump": bool(disp.max() > JUMP_STEP) if len(disp) else None,
        "travel": travel,
        "reach": reach,
        "straightness": travel / float(disp.sum()) if travel is not None and disp.sum() > 0 else None,
        "fill_median": float(np.median(judged["fill"][present])) if present.any() else None,
    }


# The temporal figures, which the judge also reports for ground-truth videos (its ``reference``).
COHERENCE_KEYS = ("present", "colour_identity", "shape_identity", "one_object", "displacement_mean", "displacement_var",
                  "acceleration_mean", "largest_step", "jump", "travel", "reach", "straightness")
SUMMARY_KEYS = ("colour_ok", "shape_ok", "colour_frames_ok", "shape_frames_ok", *COHERENCE_KEYS)


def summarise(rows: list[dict]) -> dict:
    """Means over videos (``colour_ok`` → colour accuracy, ...); figures a video lacks are left out of its mean."""
    out: dict = {"videos": len(rows)}
    for key in SUMMARY_KEYS:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        name = {"colour_ok": "colour_accuracy", "shape_ok": "shape_accuracy"}.get(key, key)
        out[name] = float(np.mean(values)) if values else None
    return out


def judge_accuracy(size: int, frames: int, videos: int, seed: int = 0, fps: float = FPS,
                   speed: tuple[float, float] = SPEED) -> dict:
    """The judge on ground truth: ``videos`` synth.py videos (every colour×shape in turn, moving at ``speed``)
    at ``size`` and ``frames``, played at ``fps`` (every round(FPS / fps)-th frame of the renderer's FPS):
    per-frame and per-video accuracy, each shape's fill ratios, and the temporal figures of real motion
    (``reference``)."""
    stride = max(1, round(FPS / fps))
    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    rows, colour_hits, shape_hits, n_frames = [], 0, 0, 0
    fills: dict[str, list[float]] = {s: [] for s in SHAPES}
    for i in range(videos):
        colour, shape = combos[i % len(combos)]
        judged = judge_frames(moving_video(rng, size, (frames - 1) * stride + 1, colour, shape, speed)[:, ::stride])
        rows.append(video_metrics(judged, colour, shape))
        colour_hits += int((judged["colour"] == list(COLOURS).index(colour)).sum())
        shape_hits += int((judged["shape"] == SHAPES.index(shape)).sum())
        n_frames += frames
        fills[shape] += judged["fill"][judged["present"]].tolist()
    ref = summarise(rows)
    return {
        "size": size, "frames": frames, "fps": FPS / stride, "videos": videos, "speed": list(speed),
        "frame_colour_accuracy": colour_hits / n_frames, "frame_shape_accuracy": shape_hits / n_frames,
        "video_colour_accuracy": ref["colour_accuracy"], "video_shape_accuracy": ref["shape_accuracy"],
        "fill": {s: {"min": float(np.min(v)), "median": float(np.median(v)), "max": float(np.max(v))}
                 for s, v in fills.items() if v},
        "thresholds": {"fg_distance": FG_DISTANCE, "corner": CORNER, "corner_square": CORNER_SQUARE,
                       "offset_triangle": OFFSET_TRIANGLE, "object_area": OBJECT_AREA,
                       "min_area": MIN_AREA, "open_min_size": OPEN_MIN_SIZE},
        "reference": {k: ref[k] for k in COHERENCE_KEYS},
    }


def prompt_target(prompt: str) -> tuple[str, str]:
    """The (colour, shape) a prompt asks for; ValueError unless it names exactly one of each."""
    words = [w.strip(".,;:!?\"'").lower() for w in prompt.split()]
    colours = sorted({w for w in words if w in COLOURS})
    shapes = sorted({w for w in words if w in SHAPES})
    if len(colours) != 1 or len(shapes) != 1:
        raise ValueError(f"prompt {prompt!r} must name one colour ({', '.join(COLOURS)}) and one shape "
                         f"({', '.join(SHAPES)})")
    return colours[0], shapes[0]


# -- generation ----------------------------------------------------------------------------------

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


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    checkpoint: str
    prompts: tuple[str, ...]                    # prompt files (workflows.inputs formats)
    out: str
    baseline: str | None = None                 # bundle of the image-only stages; None: no baseline
    holdout: tuple[tuple[str, str], ...] = ()   # colour×shape pairs the captions left out
    seed: int = 0                               # base of the per-row seeds of rows without a seed
    steps: int | None = None
    fps: int = 5
    batch_size: int = 4
    judge_videos: int = 54                      # ground-truth videos the judge is scored on
    until: str = "sr_high"                      # the last stage run: its output is judged (decoder: keyframes)
    speed: tuple[float, float] = SPEED          # the ground truth's speeds (the videos the bundle learned from)


def default_baseline(checkpoint: str) -> str | None:
    from workflows.recipe import IMAGE_DIR

    url = join(checkpoint, IMAGE_DIR)
    try:
        load_stage_config(url, "decoder")
        return url
    except CheckpointError:
        return None


def default_holdout(checkpoint: str) -> tuple[tuple[str, str], ...]:
    from workflows.recipe import read_state

    state = read_state(checkpoint)
    return tuple(parse_holdout(state["settings"]["holdout"])) if state else ()


def default_speed(checkpoint: str) -> tuple[float, float]:
    """The speeds of the recipe's videos (from CHECKPOINT/_recipe/recipe.json), else synth.py's."""
    from workflows.recipe import read_state

    state = read_state(checkpoint)
    return check_speed(state["settings"]["data"].get("speed", SPEED)) if state else SPEED


def read_requests(spec: EvalSpec) -> list:
    from workflows.batch import to_request
    from workflows.inputs import open_inputs, read_rows

    requests = []
    for row in read_rows(open_inputs(list(spec.prompts))):
        if row.error:
            raise ValueError(f"{row.source}: {row.error}")
        fields = {"fps": spec.fps, **({"steps": spec.steps} if spec.steps else {}), **row.fields}
        req = to_request(dataclasses.replace(row, fields=fields), spec.seed)
        prompt_target(req.prompt)
        requests.append(req)
    if not requests:
        raise ValueError(f"no prompts in {', '.join(spec.prompts)}")
    return requests


def evaluate(spec: EvalSpec, log=None) -> dict:
    """Generate, judge and report (see the module docstring); returns the report."""
    from workflows.outputs import safe_name
    from workflows.pipeline import Pipeline
    from workflows.video import encode_mp4

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    requests = read_requests(spec)
    held = {tuple(p) for p in spec.holdout}
    models = {"video": stage_checkpoints(spec.checkpoint, None)}
    if spec.baseline:
        models["image_baseline"] = stage_checkpoints(spec.checkpoint, spec.baseline)
    report: dict = {"checkpoint": spec.checkpoint, "baseline": spec.baseline, "until": spec.until,
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
                         "target_shape": shape, "held_out": (colour, shape) in held, "video": path,
                         **video_metrics(judge_frames(video), colour, shape)})
        groups = {"overall": rows, "seen": [r for r in rows if not r["held_out"]],
                  "held_out": [r for r in rows if r["held_out"]]}
        report["models"][model] = {"stages": checkpoints, "seconds": round(seconds, 1),
                                   **{g: summarise(rs) for g, rs in groups.items()}, "prompts": rows}
        samples[model], rates[model] = videos, fps
        o = report["models"][model]["overall"]
        log(f"[eval] {model}: {len(rows)} videos in {seconds:.0f}s; colour {o['colour_accuracy']:.0%}, "
            f"shape {o['shape_accuracy']:.0%}, displacement {_fmt(o['displacement_mean'])} "
            f"± {_fmt(o['displacement_var'], sqrt=True)}, largest step {_fmt(o['largest_step'])}, "
            f"{_fmt_share(o['jump'])} of videos jump")
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


def _fmt(value, sqrt: bool = False) -> str:
    return "n/a" if value is None else f"{(value ** 0.5 if sqrt else value):.4f}"


def _fmt_share(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


# -- figures --------------------------------------------------------------------------------------

def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def plot(report: dict) -> bytes:
    """A PNG of the report's figures: grouped bars per model (seen / held-out prompts), and the motion
    figures (per frame; over the whole video) beside the ground truth's."""
    from PIL import Image, ImageDraw

    colours = {"video": (40, 90, 200), "image_baseline": (220, 120, 30), "ground truth": (90, 90, 90)}
    img = Image.new("RGB", (1470, 420), "white")
    d = ImageDraw.Draw(img)

    def panel(x0, title, names, series, top):
        """series: [(label, colour, [value or None per name])]; bars scaled to ``top``."""
        y0, hgt, width = 60, 260, 440
        d.text((x0, 20), title, fill="black")
        d.line([(x0, y0 + hgt), (x0 + width, y0 + hgt)], fill="black")
        d.text((x0 - 5, y0 - 12), f"{top:.3g}", fill="gray")
        group = width / len(names)
        bar = (group - 10) / max(len(series), 1)
        for i, name in enumerate(names):
            for k, (_, colour, values) in enumerate(series):
                v = values[i]
                if v is None:
                    continue
                x = x0 + i * group + 5 + k * bar
                d.rectangle([x, y0 + hgt - min(v / top, 1) * hgt, x + bar - 2, y0 + hgt], fill=colour)
            for j, part in enumerate(name.split("\n")):
                d.text((x0 + i * group + 4, y0 + hgt + 6 + 12 * j), part, fill="black")
        for k, (label, colour, _) in enumerate(series):
            d.rectangle([x0 + 150 * (k % 3), 385 + 16 * (k // 3), x0 + 150 * (k % 3) + 10, 395 + 16 * (k // 3)],
                        fill=colour)
            d.text((x0 + 150 * (k % 3) + 14, 384 + 16 * (k // 3)), label, fill="black")

    names = ["colour\nseen", "colour\nheld-out", "shape\nseen", "shape\nheld-out", "colour\nidentity",
             "shape\nidentity", "object\npresent", "one\nobject"]
    series = []
    for model, m in report["models"].items():
        series.append((model, colours[model], [m["seen"]["colour_accuracy"], m["held_out"]["colour_accuracy"],
                                               m["seen"]["shape_accuracy"], m["held_out"]["shape_accuracy"],
                                               m["overall"]["colour_identity"], m["overall"]["shape_identity"],
                                               m["overall"]["present"], m["overall"]["one_object"]]))
    panel(30, "text fidelity and identity across frames (share)", names, series, 1.0)
    per_frame = [("displacement_mean", "step\nmean"), ("displacement_var", "step\nstd"),
                 ("acceleration_mean", "|2nd diff|\nmean"), ("largest_step", "largest\nstep")]
    whole = [("travel", "travel\nfirst-last"), ("reach", "reach\nfrom first"), ("straightness", "straight-\nness")]

    def values(figures, motion):
        return [None if figures[k] is None else (figures[k] ** 0.5 if k.endswith("var") else figures[k])
                for k, _ in motion]

    for x0, title, motion in ((520, "per frame, frame sizes (std, 2nd diff, largest: lower = smoother)", per_frame),
                              (1010, "over the video: travel, reach (frame sizes), travel / path", whole)):
        series = [(model, colours[model], values(m["overall"], motion)) for model, m in report["models"].items()]
        series.append(("ground truth", colours["ground truth"], values(report["judge"]["reference"], motion)))
        top = max([v for _, _, vs in series for v in vs if v is not None] + [1e-3])
        panel(x0, title, [n for _, n in motion], series, top)
    return _png(img)


def sample_sheet(samples: dict[str, list[np.ndarray]], requests: list, prompts: int = 6, frames: int = 8) -> bytes:
    """A PNG grid: for the first ``prompts`` prompts, ``frames`` evenly spaced frames of each model's video."""
    from PIL import Image, ImageDraw

    first = next(iter(samples.values()))[0]
    _, f, h, w = first.shape
    pick = np.linspace(0, f - 1, frames).round().astype(int)
    rows = [(model, i) for i in range(min(prompts, len(requests))) for model in samples]
    label_w = 260
    img = Image.new("RGB", (label_w + frames * (w + 2), len(rows) * (h + 2)), "white")
    d = ImageDraw.Draw(img)
    for r, (model, i) in enumerate(rows):
        y = r * (h + 2)
        d.text((4, y + 2), requests[i].prompt[:40], fill="black")
        d.text((4, y + 16), model, fill="gray")
        for k, t in enumerate(pick):
            img.paste(Image.fromarray(samples[model][i][:, t].transpose(1, 2, 0)), (label_w + k * (w + 2), y))
    return _png(img)


def sample_gif(videos: list[np.ndarray], requests: list, fps: float, prompts: int = 6, scale: int = 2,
               columns: int = 3) -> bytes:
    """An animated GIF: the first ``prompts`` videos side by side (``scale``× nearest-neighbour), each with its
    prompt's colour and shape written under it, playing at ``fps``."""
    from PIL import Image, ImageDraw

    videos = videos[:prompts]
    _, f, h, w = videos[0].shape
    label_h = 14
    rows = -(-len(videos) // columns)
    tile_w, tile_h = w * scale + 4, h * scale + label_h + 4
    canvases = []
    for t in range(f):
        img = Image.new("RGB", (min(columns, len(videos)) * tile_w, rows * tile_h), "white")
        d = ImageDraw.Draw(img)
        for i, (video, req) in enumerate(zip(videos, requests)):
            x, y = (i % columns) * tile_w + 2, (i // columns) * tile_h + 2
            frame = Image.fromarray(np.ascontiguousarray(video[:, t].transpose(1, 2, 0)))
            img.paste(frame.resize((w * scale, h * scale), Image.NEAREST), (x, y))
            d.rectangle([x - 1, y - 1, x + w * scale, y + h * scale], outline=(200, 200, 200))
            d.text((x, y + h * scale + 2), " ".join(prompt_target(req.prompt)), fill="black")
        canvases.append(img)
    # One palette for every frame (the middle frame's 15 main colours, plus black for the labels) keeps the
    # file small: the frames' sampling noise would otherwise fill per-frame palettes.
    middle = canvases[f // 2].quantize(colors=15, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    palette = Image.new("P", (1, 1))
    palette.putpalette(middle.getpalette()[: 15 * 3] + [0, 0, 0])
    frames = [img.quantize(palette=palette, dither=Image.Dither.NONE) for img in canvases]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


# -- the command ----------------------------------------------------------------------------------

def add_parsers(sub) -> None:
    """The ``mav eval`` subcommand."""
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
    ev.add_argument("--fps", type=int, default=5, help="keyframe rate of rows without an fps column (default 5)")
    ev.add_argument("--batch-size", type=int, default=4, help="prompts per forward pass (default 4)")
    ev.add_argument("--judge-videos", type=int, default=54, help="ground-truth videos the judge is scored on")
    ev.add_argument("--speed", type=float, nargs=2, metavar=("LOW", "HIGH"),
                    help="speeds of the ground-truth videos, frame widths per second (default: the recipe's, "
                         "from CHECKPOINT/_recipe/recipe.json)")
    ev.add_argument("--until", choices=FRAME_STAGES, default="sr_high",
                    help="judge the cascade's output after this stage (decoder: D^t's keyframes; default sr_high, "
                         "the finished video)")
    ev.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from stages.checkpoint import load_bundle_config
    from workflows.errors import CliError
    from workflows.inputs import InputError

    try:
        load_bundle_config(args.checkpoint)
        baseline = None if args.no_baseline else args.baseline or default_baseline(args.checkpoint)
        if baseline is not None:
            load_stage_config(baseline, "decoder")
        holdout = tuple(parse_holdout(args.holdout)) if args.holdout is not None else default_holdout(args.checkpoint)
        speed = check_speed(args.speed) if args.speed is not None else default_speed(args.checkpoint)
        if args.judge_videos < 1:
            raise ValueError(f"--judge-videos must be >= 1, got {args.judge_videos}")
        spec = EvalSpec(checkpoint=args.checkpoint, prompts=tuple(args.prompts), out=args.out, baseline=baseline,
                        holdout=holdout, seed=args.seed, steps=args.steps, fps=args.fps, batch_size=args.batch_size,
                        judge_videos=args.judge_videos, until=args.until, speed=speed)
        read_requests(spec)
    except (CheckpointError, InputError, ValueError) as e:
        raise CliError(str(e)) from None
    if baseline is None and not args.no_baseline:
        print("mav: no image-only baseline (no CHECKPOINT/_image; pass --baseline URL to compare)", file=sys.stderr)
    report = evaluate(spec)
    print(f"wrote {join(args.out, 'report.json')} and {join(args.out, 'report.png')}", file=sys.stderr)
    for model, m in report["models"].items():
        for group in ("seen", "held_out"):
            g = m[group]
            if g["videos"]:
                print(f"{model:<15} {group:<9} {g['videos']:>3} videos  colour {g['colour_accuracy']:.0%}  "
                      f"shape {g['shape_accuracy']:.0%}  "
                      f"identity {g['colour_identity']:.0%}/{g['shape_identity']:.0%}  "
                      f"step {_fmt(g['displacement_mean'])} ± {_fmt(g['displacement_var'], sqrt=True)}  "
                      f"largest {_fmt(g['largest_step'])}  jumps {_fmt_share(g['jump'])}  reach {_fmt(g['reach'])}",
                      file=sys.stderr)
    return 0
