"""The synthetic shapes world: one coloured shape on white, still (captioned) or moving in a straight line
and bouncing off the frame's edges (uncaptioned). Everything else in this package draws from here: the data
set (data.py), the judge's palette and ground truth (judge.py), the prompts it can judge (evaluate.py)."""

from __future__ import annotations

import numpy as np

from stages.errors import UserError

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


def prompt_target(prompt: str) -> tuple[str, str]:
    """The (colour, shape) a prompt asks for; ValueError unless it names exactly one of each."""
    words = [w.strip(".,;:!?\"'").lower() for w in prompt.split()]
    colours = sorted({w for w in words if w in COLOURS})
    shapes = sorted({w for w in words if w in SHAPES})
    if len(colours) != 1 or len(shapes) != 1:
        raise UserError(f"prompt {prompt!r} must name one colour ({', '.join(COLOURS)}) and one shape "
                         f"({', '.join(SHAPES)})")
    return colours[0], shapes[0]


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


def random_image(rng: np.random.Generator, size: int, combos: list[tuple[str, str]]) -> tuple[np.ndarray, str]:
    """A still of one of ``combos`` (colour, shape) at a random size and place, and its caption."""
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
        raise UserError(f"held-out combination {text!r}: expected 'COLOUR SHAPE' with COLOUR one of "
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
        raise UserError(f"speed must be two numbers, frame widths per second (low, high), got {speed!r}") from None
    if not 0 < low <= high:
        raise UserError(f"speed must satisfy 0 < low <= high, got {low:g}, {high:g}")
    return low, high
