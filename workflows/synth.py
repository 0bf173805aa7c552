"""A small synthetic world for tests, examples and the demo model: captioned still images of coloured
shapes, and separate uncaptioned videos of such shapes moving.

    mav data synth --out s3://bucket/shapes --images 2000 --videos 200

Writes ``OUT/images/part-NNNNN.parquet`` (columns ``image``: PNG bytes, ``caption``) or, with
``--format tar``, WebDataset-style ``OUT/images/shard-NNNNN.tar`` (``KEY.png`` + ``KEY.txt``), and
``OUT/videos/video-NNNNN.mp4`` (no captions: the video stages never see text).
"""

from __future__ import annotations

import io
import tarfile

import numpy as np

from workflows.outputs import join, write_bytes_atomic

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
FPS = 30  # frame rate of the rendered videos
SPEED = (0.2, 0.8)  # speeds of the moving shapes, frame widths per second


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape} on a white background"


def draw(shape: str, colour: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """One ``size x size x 3`` uint8 image: the shape (radius r, centre cx, cy, in pixels) on white."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    elif shape == "square":
        inside = (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    elif shape == "triangle":
        top, bottom = cy - r, cy + r * 0.8
        half = (yy - top) / (bottom - top) * r
        inside = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    img[inside] = COLOURS[colour]
    return img


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def random_image(rng: np.random.Generator, size: int, combos: list[tuple[str, str]]) -> tuple[np.ndarray, str]:
    colour, shape = combos[rng.integers(len(combos))]
    r = rng.uniform(0.15, 0.3) * size
    cx, cy = rng.uniform(r, size - r, 2)
    return draw(shape, colour, cx, cy, r, size), caption(colour, shape)


def random_video(rng: np.random.Generator, size: int, frames: int, speed: tuple[float, float] = SPEED) -> np.ndarray:
    """uint8 ``3 f h w``: a random shape of a random colour moving (see :func:`moving_video`)."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    return moving_video(rng, size, frames, colour, shape, speed)


def moving_video(rng: np.random.Generator, size: int, frames: int, colour: str, shape: str,
                 speed: tuple[float, float] = SPEED) -> np.ndarray:
    """uint8 ``3 f h w``: one ``colour`` ``shape`` moving in a straight line at constant speed, bouncing off
    the edges; its radius, start, direction and speed (uniform in ``speed``, frame widths per second at
    ``FPS``) are drawn from ``rng``."""
    r = rng.uniform(0.15, 0.25) * size
    pos = rng.uniform(r, size - r, 2)
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(*speed) * size / FPS  # pixels per frame at FPS
    vel = np.array([np.cos(angle), np.sin(angle)]) * speed
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        out[t] = draw(shape, colour, pos[0], pos[1], r, size)
        pos = pos + vel
        for k in range(2):
            if pos[k] < r or pos[k] > size - r:
                vel[k] = -vel[k]
                pos[k] = np.clip(pos[k], r, size - r)
    return out.transpose(3, 0, 1, 2)


def parse_combo(text: str) -> tuple[str, str]:
    """``"red triangle"`` -> ``("red", "triangle")``; ValueError naming the text unless it is a palette colour
    and a known shape."""
    words = text.split()
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
        raise ValueError(f"held-out combination {text!r}: expected 'COLOUR SHAPE' with COLOUR one of "
                         f"{', '.join(COLOURS)} and SHAPE one of {', '.join(SHAPES)}")
    return words[0], words[1]


def parse_holdout(items) -> list[tuple[str, str]]:
    """Held-out colour×shape combinations given as ``"colour shape"`` strings."""
    return [parse_combo(text) for text in items]


def check_speed(speed) -> tuple[float, float]:
    """``(low, high)`` frame widths per second, 0 < low <= high; ValueError otherwise."""
    try:
        low, high = (float(v) for v in speed)
    except (TypeError, ValueError):
        raise ValueError(f"speed must be two numbers, frame widths per second (low, high), got {speed!r}") from None
    if not 0 < low <= high:
        raise ValueError(f"speed must satisfy 0 < low <= high, got {low:g}, {high:g}")
    return low, high


def synth(out: str, *, images: int, videos: int, size: int = 64, frames: int = 96, fmt: str = "parquet",
          shard: int = 256, seed: int = 0, holdout: list[tuple[str, str]] | None = None,
          speed: tuple[float, float] = SPEED, progress=None) -> dict:
    """Write the synthetic data set under ``out``; ``holdout`` colour×shape pairs get no captioned image;
    the videos' shapes move at ``speed`` (low, high) frame widths per second.

    Held-out pairs still move in the uncaptioned videos (the video stages never see a caption), so only the
    text side (CLIP, the prior) never meets them: that is what compositional generalisation is measured on.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows.video import encode_mp4

    if size % 2 or size < 8:
        raise ValueError(f"size must be even and >= 8, got {size}")
    if fmt not in ("parquet", "tar"):
        raise ValueError(f"format must be parquet or tar, got {fmt!r}")
    speed = check_speed(speed)
    rng = np.random.default_rng(seed)
    held = set(holdout or [])
    for colour, shape in held:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"held-out combination {(colour, shape)!r}: not a palette colour and a known shape")
    combos = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]
    if images and not combos:
        raise ValueError("holdout leaves no colour×shape combination for the captioned images")
    written = {"images": 0, "videos": 0}
    for start in range(0, images, shard):
        n = min(shard, images - start)
        pairs = [random_image(rng, size, combos) for _ in range(n)]
        index = start // shard
        if fmt == "parquet":
            table = pa.table({"image": [png(img) for img, _ in pairs], "caption": [c for _, c in pairs]})
            buf = io.BytesIO()
            pq.write_table(table, buf)
            write_bytes_atomic(join(out, "images", f"part-{index:05d}.parquet"), buf.getvalue())
        else:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for i, (img, cap) in enumerate(pairs):
                    for ext, data in (("png", png(img)), ("txt", cap.encode())):
                        info = tarfile.TarInfo(f"{start + i:08d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            write_bytes_atomic(join(out, "images", f"shard-{index:05d}.tar"), buf.getvalue())
        written["images"] += n
        if progress:
            progress("images", written["images"], images)
    for i in range(videos):
        video = random_video(rng, size, frames, speed)
        write_bytes_atomic(join(out, "videos", f"video-{i:05d}.mp4"), encode_mp4(video, FPS))
        written["videos"] += 1
        if progress:
            progress("videos", written["videos"], videos)
    return written
