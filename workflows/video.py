"""Video tensors <-> uint8 frames <-> H.264 MP4 bytes (yuv420p, plays in browsers)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """``b c f h w`` in [-1, 1] -> uint8 ``b c f h w``."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def from_uint8(video: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``b c f h w`` -> ``b c f h w`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(video)).to(dtype) / 127.5 - 1


def encode_mp4(video: np.ndarray, fps: float) -> bytes:
    """uint8 ``c f h w`` (RGB) -> H.264 MP4 bytes, yuv420p, ``fps`` frames per second.

    The same frames and fps always give the same bytes (bit-exact muxing, no timestamps in metadata).
    """
    import imageio_ffmpeg

    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected uint8 video of shape (3, f, h, w), got {video.dtype} {video.shape}")
    _, f, h, w = video.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {h}x{w}")
    frames = np.ascontiguousarray(video.transpose(1, 2, 3, 0))  # f h w c
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            path,
            (w, h),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            macro_block_size=2,
            ffmpeg_log_level="error",
            output_params=["-crf", "18", "-threads", "1", "-fflags", "+bitexact", "-map_metadata", "-1",
                           "-movflags", "+faststart"],
        )
        writer.send(None)
        for frame in frames:
            writer.send(frame)
        writer.close()
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(path)


def decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    """MP4 bytes -> (uint8 frames ``f h w 3``, fps)."""
    import imageio_ffmpeg

    fd, path = tempfile.mkstemp(suffix=".mp4")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    try:
        reader = imageio_ffmpeg.read_frames(path)
        meta = reader.__next__()
        w, h = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
        return np.stack(frames), float(meta["fps"])
    finally:
        os.unlink(path)
