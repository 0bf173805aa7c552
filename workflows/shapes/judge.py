"""The judge: does a video show the object its prompt asks for, moving coherently? Pixel statistics of the
synthetic world (world.py), no learned classifier. Per frame of a uint8 ``3 f h w`` video:

  * foreground: pixels some channel of which lies ``FG_DISTANCE`` or more below white, cleaned of specks by
    a 3×3 opening in frames of ``OPEN_MIN_SIZE`` pixels or more;
  * colour: the palette colour nearest (RGB distance) to the foreground's median colour;
  * shape: a triangle (apex up) has its centroid 1/6 of its height below its bounding box's middle, a circle
    or square none (measured on world.py's renderer at 32 and 64 px: triangles 0.11–0.17, others ≤ 0.04);
    of those two, a square fills the corners of its bounding box and a circle leaves them empty (the fill
    ratio of the whole box, square ≈ 1, circle ≈ π/4, triangle ≈ 1/2, is reported too, but a generated
    square's soft edges bring it down to ≈ 0.9, which the corners do not mind);
  * position: the foreground's centroid, in units of the frame size;
  * objects: how many 4-connected parts of the foreground cover ``OBJECT_AREA`` of the frame or more.

Per video (:func:`video_metrics`): text fidelity (the majority colour / shape over the frames equals the
prompt's), temporal coherence (share of frames showing the object, share agreeing with the majority colour /
shape, share of those showing exactly one object (``one_object``: a second object appearing, or one
splitting, lowers it), and the centroid's step from each frame showing the object to the next one that does
(across frames where it is missing: vanishing and reappearing elsewhere is a jump): mean, variance, mean
|second difference| and the largest step, which a single jump dominates however smooth the rest of the video
is, and ``jump``, whether that exceeds ``JUMP_STEP``; ``travel``, the distance from the first frame's
centroid to the last's, ``reach``, the farthest any frame's centroid gets from the first's (an object that
crosses the frame and bounces back travels little but reaches far; one that jitters in place does neither),
and ``straightness``, travel / path length: 1 for a straight path, near 0 for an object that jitters in
place, so that stillness does not pass for smooth motion). :func:`judge_accuracy` scores the judge itself on
ground-truth videos rendered by world.py, whose temporal figures are the reference for generated ones.
"""

from __future__ import annotations

import numpy as np

from workflows.shapes.world import COLOURS, FPS, SHAPES, SPEED, moving_video

FG_DISTANCE = 96        # foreground: some channel at least this far below white (255)
OPEN_MIN_SIZE = 48      # frames at least this large are cleaned by a 3×3 opening (smaller shapes lose their tips)
MIN_AREA = 0.004        # a frame shows an object when its foreground covers at least this share of it
OBJECT_AREA = 0.01      # a connected part of the foreground this large (share of the frame) counts as an object
JUMP_STEP = 0.2         # a longer centroid step (share of the frame) is a jump; real 5 fps keyframes' largest: 0.12
OFFSET_TRIANGLE = 0.08  # centroid this far below the bounding box's middle (share of its height): a triangle
CORNER = 0.12           # otherwise, the bounding box's four corner squares of this share of its side...
CORNER_SQUARE = 0.5     # ...filled above this share: a square (≈ 1; a circle leaves them empty)
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)


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
    """The judge on ground truth: ``videos`` world.py videos (every colour×shape in turn, moving at ``speed``)
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
