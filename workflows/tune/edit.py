"""Edits of a tuned bundle's source video: D^t from the source's inverted noise under each prompt's y_e, then
↑F, SR_l^t and SR_h, through the same runners and MP4 writer as ``mav generate``.

    videos = run_edits("tuned/", ["a blue square on a white background"], seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence

from stages.errors import UserError
from workflows.pipeline import Pipeline, Request, Video
from workflows.runners import StageProgress
from workflows.tune.job import load_settings
from workflows.tune.source import TuneError


def run_edits(tuned: str, prompts: Sequence[str], *, seed: int = 0, steps: int | None = None,
              guidance: float | None = None, inversion: bool = True,
              progress: StageProgress | None = None) -> list[Video]:
    """One video per prompt (prompt i with seed ``seed + i``) from the tuned bundle ``tuned``. ``inversion``
    false: D^t starts from fresh noise instead (the tuned network alone)."""
    requests = edit_requests(load_settings(tuned).fps, prompts, seed=seed, steps=steps, guidance=guidance)
    pipe = Pipeline(checkpoint=tuned, progress=progress)
    if not inversion:
        next(r for r in pipe.runners if r.stage == "decoder").inversion = None
    return pipe.generate(requests)


def edit_requests(source_fps: float, prompts: Sequence[str], *, seed: int = 0, steps: int | None = None,
                  guidance: float | None = None) -> list[Request]:
    """The cascade's requests of an edit of a tuned source whose keyframes are ``source_fps`` apart: prompt i
    with seed ``seed + i``, at that rate rounded (what ↑F is told; a tuned D^t keeps the exact rate).
    TuneError for an empty prompt or a setting out of range."""
    for i, p in enumerate(prompts, 1):
        if not p.strip():
            raise TuneError(f"prompt {i} is empty")
    fps = min(30, max(1, round(source_fps)))
    try:
        return [Request(prompt=p, seed=seed + i, fps=fps, steps=steps, guidance=guidance)
                for i, p in enumerate(prompts)]
    except UserError as e:  # the message names the field; here it is the option of that name
        raise TuneError(f"--{e}") from None
