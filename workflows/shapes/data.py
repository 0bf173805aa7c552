"""The synthetic data set: captioned still images of coloured shapes, and separate uncaptioned videos of
such shapes moving (rendered by world.py).

    mav data synth --out s3://bucket/shapes --images 2000 --videos 200

Writes ``OUT/images/part-NNNNN.parquet`` (columns ``image``: PNG bytes, ``caption``) or, with
``--format tar``, WebDataset-style ``OUT/images/shard-NNNNN.tar`` (``KEY.png`` + ``KEY.txt``), and
``OUT/videos/video-NNNNN.mp4`` (no captions: the video stages never see text).
"""

from __future__ import annotations

import io
import tarfile

import numpy as np

from stages.fsio import join, write_bytes_atomic
from workflows.shapes.world import COLOURS, FPS, SHAPES, SPEED, check_speed, random_image, random_video


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


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
