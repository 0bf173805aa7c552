"""The source clip of a tuning run: read from any fsspec URL, checked, and sampled to D^t's keyframes."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from stages.errors import UserError
from stages.fsio import read_bytes


class TuneError(UserError):
    """A source clip, caption, prompt or tuned bundle that cannot be used; the message says which and why."""


def read_clip(url: str) -> tuple[np.ndarray, float]:
    """The video at ``url`` as (uint8 frames ``n h w 3``, fps); TuneError if it is missing, not a video or empty."""
    import imageio_ffmpeg

    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise TuneError(f"{url}: no such file") from None
    except OSError as e:
        raise TuneError(f"cannot read {url}: {e}") from None
    fd, path = tempfile.mkstemp(suffix=".mp4")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            reader = imageio_ffmpeg.read_frames(path)
            meta = next(reader)
            w, h = meta["size"]
            frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
        except (RuntimeError, OSError, StopIteration, KeyError, ValueError):
            raise TuneError(f"{url}: not a video ffmpeg can read") from None
    finally:
        os.unlink(path)
    fps = float(meta.get("fps") or 0)
    if not frames:
        raise TuneError(f"{url}: the video has no frames")
    if fps <= 0:
        raise TuneError(f"{url}: the video has no frame rate")
    return np.stack(frames), fps


def sample_keyframes(url: str, frames: np.ndarray, src_fps: float, count: int, size: int,
                     fps: int) -> tuple[np.ndarray, float, list[int]]:
    """``count`` frames of ``frames`` (``n h w 3``) about ``fps`` apart from the start, each resized to
    ``size x size``: (uint8 ``3 count size size``, their fps, their indices). The stride is round(src_fps / fps),
    shortened where the clip is too short for it; TuneError if it has fewer than ``count`` frames."""
    from PIL import Image

    n = len(frames)
    if n < count:
        raise TuneError(f"{url}: {n} frames, too short for D^t's {count} keyframes")
    stride = max(1, min(round(src_fps / fps), (n - 1) // max(count - 1, 1)))
    indices = [i * stride for i in range(count)]
    out = np.stack([np.asarray(Image.fromarray(frames[i]).resize((size, size), Image.BICUBIC)) for i in indices])
    return np.ascontiguousarray(out.transpose(3, 0, 1, 2)), src_fps / stride, indices
