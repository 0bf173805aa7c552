"""The source clip of a tuning run: read from any fsspec URL, checked, and sampled to D^t's keyframes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stages.errors import UserError
from stages.fsio import read_bytes


class TuneError(UserError):
    """A source clip, caption, prompt or tuned bundle that cannot be used; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class ClipLimits:
    """Bounds on a clip before it is decoded whole (None: unbounded)."""

    seconds: float | None = None    # longest duration
    frames: int | None = None       # most frames
    side: int | None = None         # largest width or height, pixels


class ClipTooLarge(TuneError):
    """A clip over one of its :class:`ClipLimits`."""


@dataclass(frozen=True)
class ClipInfo:
    frames: int                     # frames decoded
    fps: float
    width: int
    height: int

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


def read_clip(url: str) -> tuple[np.ndarray, float]:
    """The video at ``url`` as (uint8 frames ``n h w 3``, fps); TuneError if it is missing, not a video or empty."""
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise TuneError(f"{url}: no such file") from None
    except OSError as e:
        raise TuneError(f"cannot read {url}: {e}") from None
    return decode_clip(data, url)


def decode_clip(data: bytes, name: str, limits: ClipLimits = ClipLimits()) -> tuple[np.ndarray, float]:
    """The video file ``data`` as (uint8 frames ``n h w 3``, fps); TuneError naming ``name`` if it is not a
    video, is empty or has no frame rate, ClipTooLarge if it is over ``limits``."""
    frames: list[np.ndarray] = []
    info = _decode(data, name, limits, frames.append)
    return np.stack(frames), info.fps


def inspect_clip(data: bytes, name: str, limits: ClipLimits = ClipLimits()) -> ClipInfo:
    """What :func:`decode_clip` would read from ``data``, with the same errors, holding one frame at a time."""
    return _decode(data, name, limits, lambda frame: None)


def _decode(data: bytes, name: str, limits: ClipLimits, keep: Callable[[np.ndarray], None]) -> ClipInfo:
    import imageio_ffmpeg

    fd, path = tempfile.mkstemp(prefix="mav-clip-", suffix=".mp4")
    count, reader = 0, None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            reader = imageio_ffmpeg.read_frames(path)
            meta = next(reader)
            w, h = meta["size"]
            fps = float(meta.get("fps") or 0)
            _check_limits(name, limits, w, h, float(meta.get("duration") or 0), 0)
            for buf in reader:
                count += 1
                _check_limits(name, limits, w, h, count / fps if fps > 0 else 0, count)
                keep(np.frombuffer(buf, np.uint8).reshape(h, w, 3))
        except TuneError:
            raise
        except (RuntimeError, OSError, StopIteration, KeyError, ValueError):
            raise TuneError(f"{name}: not a video ffmpeg can read") from None
    finally:
        if reader is not None:
            reader.close()  # stops ffmpeg when the clip was refused part way
        os.unlink(path)
    if not count:
        raise TuneError(f"{name}: the video has no frames")
    if fps <= 0:
        raise TuneError(f"{name}: the video has no frame rate")
    return ClipInfo(frames=count, fps=fps, width=w, height=h)


def _check_limits(name: str, limits: ClipLimits, w: int, h: int, seconds: float, frames: int) -> None:
    if limits.side is not None and max(w, h) > limits.side:
        raise ClipTooLarge(f"{name}: {w}x{h} pixels; at most {limits.side} on a side")
    if limits.seconds is not None and seconds > limits.seconds:
        raise ClipTooLarge(f"{name}: longer than {limits.seconds:g} s; cut it shorter")
    if limits.frames is not None and frames > limits.frames:
        raise ClipTooLarge(f"{name}: more than {limits.frames} frames; cut it shorter")


def check_length(name: str, frames: int, count: int) -> None:
    """TuneError naming ``name`` if a clip of ``frames`` frames is too short for D^t's ``count`` keyframes."""
    if frames < count:
        raise TuneError(f"{name}: {frames} frames, too short for D^t's {count} keyframes")


def sample_keyframes(url: str, frames: np.ndarray, src_fps: float, count: int, size: int,
                     fps: int) -> tuple[np.ndarray, float, list[int]]:
    """``count`` frames of ``frames`` (``n h w 3``) about ``fps`` apart from the start, each resized to
    ``size x size``: (uint8 ``3 count size size``, their fps, their indices). The stride is round(src_fps / fps),
    shortened where the clip is too short for it; TuneError if it has fewer than ``count`` frames."""
    from PIL import Image

    n = len(frames)
    check_length(url, n, count)
    stride = max(1, min(round(src_fps / fps), (n - 1) // max(count - 1, 1)))
    indices = [i * stride for i in range(count)]
    out = np.stack([np.asarray(Image.fromarray(frames[i]).resize((size, size), Image.BICUBIC)) for i in indices])
    return np.ascontiguousarray(out.transpose(3, 0, 1, 2)), src_fps / stride, indices
