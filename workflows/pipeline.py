"""The in-process pipeline: the six stage runners chained in one process.

    from workflows.pipeline import Pipeline, Request
    pipe = Pipeline()                       # CPU preset, fresh weights; or Pipeline(checkpoint="s3://...")
    [video] = pipe.generate([Request(prompt="a red ball bouncing", seed=0)])
    video.frames  # uint8 (3, 76, 192, 192); video.fps == 25.0
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from stages.config import FRAME_STAGES, STAGE_NAMES
from stages.errors import UserError
from workflows.presets import DEFAULT_PRESET
from workflows.runners import RUNNER_OF, StageProgress, StageRunner

MAX_SEED = 2**63 - 1
DEFAULT_FPS = 5


@dataclass(frozen=True, kw_only=True)
class Request:
    prompt: str
    seed: int = 0
    fps: int = DEFAULT_FPS          # keyframe rate D^t is conditioned on (1..30); the video plays at fps × skip
    steps: int | None = None        # sampling steps for every diffusion stage (None: each stage's preset value)
    guidance: float | None = None   # decoder guidance scale w (None: the preset's)
    negative_prompt: str = ""       # the prior's unconditional branch
    motion: tuple[float, float] | None = None  # motion guidance (dy, dx), frame sizes per keyframe; None: off
    id: str = ""

    def __post_init__(self) -> None:
        validate_request(self)


def validate_request(r: Request) -> None:
    """Raise UserError (a ValueError) naming the field if a request is out of range."""
    if not isinstance(r.prompt, str) or not r.prompt.strip():
        raise UserError("prompt: must be a non-empty string")
    if not isinstance(r.negative_prompt, str):
        raise UserError("negative_prompt: must be a string")
    if isinstance(r.seed, bool) or not isinstance(r.seed, (int, np.integer)) or not 0 <= r.seed <= MAX_SEED:
        raise UserError(f"seed: must be an integer in 0..{MAX_SEED}, got {r.seed!r}")
    if isinstance(r.fps, bool) or not isinstance(r.fps, (int, np.integer)) or not 1 <= r.fps <= 30:
        raise UserError(f"fps: must be an integer in 1..30, got {r.fps!r}")
    if r.steps is not None and (isinstance(r.steps, bool) or not isinstance(r.steps, (int, np.integer)) or not 1 <= r.steps <= 1000):
        raise UserError(f"steps: must be an integer in 1..1000, got {r.steps!r}")
    if r.guidance is not None and (
        isinstance(r.guidance, bool) or not isinstance(r.guidance, (int, float)) or not math.isfinite(r.guidance)
        or not 0 <= r.guidance <= 50
    ):
        raise UserError(f"guidance: must be a number in 0..50, got {r.guidance!r}")
    if r.motion is not None:
        check_motion(r.motion)


MAX_MOTION = 0.5  # frame sizes per keyframe: faster than this, neighbouring keyframes share no noise


def check_motion(motion) -> tuple[float, float]:
    """Motion guidance as the user gave it -> (dy, dx) in frame sizes per keyframe; UserError naming
    ``motion`` if it is not two finite numbers in [-MAX_MOTION, MAX_MOTION]."""
    ok = isinstance(motion, (list, tuple, np.ndarray)) and len(motion) == 2 and all(
        not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)
        and abs(v) <= MAX_MOTION for v in motion)
    if not ok:
        raise UserError(f"motion: must be two numbers [dy, dx] in -{MAX_MOTION}..{MAX_MOTION} (frame sizes per "
                         f"keyframe), got {motion!r}")
    return float(motion[0]), float(motion[1])


def to_batch(requests: list[Request]) -> dict[str, np.ndarray]:
    """Requests -> the row columns the runners take."""
    return {
        "id": np.array([r.id for r in requests], dtype=object),
        "prompt": np.array([r.prompt for r in requests], dtype=object),
        "negative_prompt": np.array([r.negative_prompt for r in requests], dtype=object),
        "seed": np.array([r.seed for r in requests], dtype=np.int64),
        "fps": np.array([r.fps for r in requests], dtype=np.int64),
        "steps": np.array([r.steps or 0 for r in requests], dtype=np.int64),
        "guidance": np.array([np.nan if r.guidance is None else r.guidance for r in requests], dtype=np.float32),
        "motion": np.array([(np.nan, np.nan) if r.motion is None else r.motion for r in requests],
                           dtype=np.float32).reshape(len(requests), 2),
    }


@dataclass
class Video:
    frames: np.ndarray              # uint8 (3, f, h, w)
    fps: float
    truncated: bool                 # the prompt was longer than the text encoder's context
    stage_seconds: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """The cascade ŷ = SR_h ∘ SR_l^t ∘ ↑F ∘ D^t ∘ P ∘ (x̂, CLIP_text(x)) in one process."""

    def __init__(
        self,
        *,
        checkpoint: str | Mapping[str, str] | None = None,
        preset: str = DEFAULT_PRESET,
        device: str | torch.device | None = None,
        progress: StageProgress | None = None,
        until: str = "sr_high",
        dtype: str = "auto",
        compile: bool = False,
    ) -> None:
        """``checkpoint``: one bundle for every stage, or a bundle per stage name (e.g. an image-only
        baseline's decoder with the other stages of a trained bundle). ``until``: the last stage to run,
        whose output is the video (``decoder``: D^t's keyframes, at the requested fps). ``dtype`` and
        ``compile``: every runner's (``workflows.runners.StageRunner``)."""
        if until not in FRAME_STAGES:
            raise ValueError(f"until must be one of {', '.join(FRAME_STAGES)}, got {until!r}")
        stages = STAGE_NAMES[: STAGE_NAMES.index(until) + 1]
        per_stage = checkpoint if isinstance(checkpoint, Mapping) else dict.fromkeys(STAGE_NAMES, checkpoint)
        self.runners: list[StageRunner] = [
            RUNNER_OF[s](checkpoint=per_stage[s], preset=preset, device=device, progress=progress, dtype=dtype,
                         compile=compile)
            for s in stages
        ]

    def run(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        seconds = {}
        for runner in self.runners:
            start = time.perf_counter()
            batch = runner(batch)
            seconds[runner.stage] = time.perf_counter() - start
        return batch, seconds

    def generate(self, requests: list[Request]) -> list[Video]:
        if not requests:
            return []
        out, seconds = self.run(to_batch(requests))
        fps = out.get("video_fps", out["fps"])  # D^t's keyframes play at the rate they were made for
        return [
            Video(frames=out["video"][i], fps=float(fps[i]), truncated=bool(out["truncated"][i]),
                  stage_seconds=seconds)
            for i in range(len(requests))
        ]
