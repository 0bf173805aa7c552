"""``POST /v1/edits``: what the ingress does with an upload before and after its tuning.

Before: the form's text and the clip are checked (:class:`EditIntake`), so a bad upload is a 422 or 413 with
a message and nothing is written: the clip is decoded once, one frame at a time, within the app's bounds
(``max_clip_seconds``, ``max_clip_frames``, ``max_clip_side``; the body itself is bounded by
``workflows.serve.middleware.MAX_UPLOAD_BYTES``), and must hold D^t's frame count. After: the edit's videos
are written whole or not at all (:func:`write_videos`), and the edit's work directory (the clip and its tuned
bundle) is removed (:func:`remove_work`) however the edit ended.
"""

from __future__ import annotations

import fsspec
from starlette.exceptions import HTTPException

from stages.fsio import join, write_bytes_atomic
from workflows.pipeline import MAX_SEED
from workflows.serve.config import AppArgs
from workflows.tune.source import ClipInfo, ClipLimits, ClipTooLarge, TuneError, check_length, inspect_clip

MAX_PROMPTS = 8                     # prompts of one edit (each is one video)
MAX_TUNE_STEPS = 2000               # the most optimizer steps one edit may ask its tuning for


class EditIntake:
    """The checks of an edit's upload against the app's bounds and its D^t."""

    def __init__(self, args: AppArgs) -> None:
        self.limits = ClipLimits(seconds=args.max_clip_seconds, frames=args.max_clip_frames, side=args.max_clip_side)
        self.args = args
        self._frames: int | None = None

    @property
    def keyframes(self) -> int:
        """D^t's frame count: the fewest frames a clip may have."""
        if self._frames is None:
            from stages.checkpoint import load_bundle_config
            from workflows.presets import choose_model, load_preset

            checkpoint, preset = choose_model(self.args.checkpoint, self.args.preset)
            config = load_bundle_config(checkpoint) if checkpoint else load_preset(preset)
            self._frames = config.decoder.frames
        return self._frames

    @staticmethod
    def check_text(caption: str, prompts: list[str], seed: int) -> None:
        """422 naming the field: a blank caption or prompt, too many prompts, seeds past :data:`MAX_SEED`."""
        if not caption.strip():
            raise HTTPException(422, "caption: must not be blank: say what the clip shows")
        if not prompts:
            raise HTTPException(422, "prompt: give at least one")
        if len(prompts) > MAX_PROMPTS:
            raise HTTPException(422, f"prompt: at most {MAX_PROMPTS} prompts, got {len(prompts)}")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise HTTPException(422, f"prompt[{i}]: must not be blank")
        if seed > MAX_SEED - (len(prompts) - 1):
            raise HTTPException(422, f"seed: must be at most {MAX_SEED - (len(prompts) - 1)} for "
                                     f"{len(prompts)} prompts (prompt i uses seed + i)")

    def check_clip(self, data: bytes) -> ClipInfo:
        """The clip's frame count and rate; 422 (not a video, no frames, shorter than D^t's frames) or 413
        (over a bound) naming ``video``. Runs ffmpeg: call it off the event loop."""
        if not data:
            raise HTTPException(422, "video: the file is empty")
        try:
            info = inspect_clip(data, "video", self.limits)
            check_length("video", info.frames, self.keyframes)
        except ClipTooLarge as e:
            raise HTTPException(413, str(e)) from None
        except TuneError as e:
            raise HTTPException(422, str(e)) from None
        return info


def write_videos(output: str, edit_id: str, mp4s: list[bytes]) -> list[str]:
    """Each MP4 as ``OUTPUT/edits/ID/I.mp4``, all or none: a failed write removes those written before."""
    urls: list[str] = []
    try:
        for i, data in enumerate(mp4s):
            url = join(output, "edits", edit_id, f"{i}.mp4")
            write_bytes_atomic(url, data)
            urls.append(url)
    except BaseException:
        for url in urls:
            try:
                fs, path = fsspec.core.url_to_fs(url)
                fs.rm(path)
            except OSError:
                pass
        raise
    return urls


def remove_work(work: str, edit_id: str) -> None:
    """Remove the edit's work directory (its clip and tuned bundle), if there is one."""
    fs, path = fsspec.core.url_to_fs(join(work, edit_id))
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
