"""Training data through Ray Data, from any fsspec URL: text–image pairs (or images) and unlabeled videos.

Text–image pairs: Parquet files with ``image`` (encoded bytes) and ``caption`` columns, or
WebDataset-style tar shards (``KEY.png``/``KEY.jpg`` + ``KEY.txt``). Videos: MP4 files, decoded with
imageio-ffmpeg. A URL may be a file, a glob or a directory (searched recursively). Items that cannot be
decoded are kept as rows with ``ok = False`` so that the training loop skips and counts them.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile

import fsspec
import numpy as np

from stages.errors import UserError

IMAGE_EXTS = (".parquet", ".tar")
VIDEO_EXTS = (".mp4",)


class DataError(UserError):
    """Training data that cannot be found or opened; the message names it."""


def list_files(urls: list[str], exts: tuple[str, ...]) -> list[str]:
    """Every file with one of ``exts`` under ``urls`` (files, globs or directories), as full URLs."""
    out: list[str] = []
    for url in urls:
        try:
            fs, path = fsspec.core.url_to_fs(url)
            if any(c in path for c in "*?["):
                candidates = fs.glob(path)
            elif fs.isdir(path):
                candidates = fs.find(path)
            elif fs.exists(path):
                candidates = [path]
            else:
                raise DataError(f"{url}: no such file or directory")
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{url}: cannot list ({type(e).__name__}: {e})") from None
        protocol = url.split("://", 1)[0] if "://" in url else None
        for p in sorted(candidates):
            if p.lower().endswith(exts) and not os.path.basename(p).startswith("."):
                out.append(f"{protocol}://{p}" if protocol and "://" not in p else p)
    if not out:
        raise DataError(f"no {'/'.join(exts)} files under {', '.join(urls)}")
    return list(dict.fromkeys(out))


def arrow_fs(url: str):
    """(pyarrow filesystem, path) for a URL, through fsspec so credentials and endpoints are the same."""
    import pyarrow.fs as pafs

    fs, path = fsspec.core.url_to_fs(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def decode_image(data: bytes, size: int) -> np.ndarray | None:
    """Encoded image -> uint8 ``3 size size`` (RGB, resized), or None if it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except Exception:
        return None


def decode_video(data: bytes, size: int, max_frames: int) -> tuple[np.ndarray, int, float] | None:
    """MP4 bytes -> (uint8 ``3 max_frames size size`` zero-padded, valid frames, fps) or None."""
    import imageio_ffmpeg
    from PIL import Image

    fd, path = tempfile.mkstemp(suffix=".mp4")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        reader = imageio_ffmpeg.read_frames(path)
        meta = next(reader)
        w, h = meta["size"]
        fps = float(meta.get("fps") or 0)
        out = np.zeros((max_frames, size, size, 3), np.uint8)
        n = 0
        for buf in reader:
            if n >= max_frames:
                break
            frame = np.frombuffer(buf, np.uint8).reshape(h, w, 3)
            if (w, h) != (size, size):
                frame = np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC))
            out[n] = frame
            n += 1
        reader.close()
        if n == 0 or fps <= 0:
            return None
        return out.transpose(3, 0, 1, 2).copy(), n, fps
    except Exception:
        return None
    finally:
        os.unlink(path)


def _decode_image_batch(batch: dict, size: int) -> dict:
    images, ok = [], []
    for data in batch["image"]:
        img = decode_image(data, size) if data is not None else None
        ok.append(img is not None)
        images.append(img if img is not None else np.zeros((3, size, size), np.uint8))
    captions = batch["caption"] if "caption" in batch else [""] * len(images)
    return {
        "image": np.stack(images),
        "caption": np.array([str(c) if c is not None else "" for c in captions], dtype=object),
        "ok": np.array(ok),
    }


def _untar(row: dict) -> list[dict]:
    """One tar shard -> its (image, caption) samples; a corrupt shard -> one row that fails to decode."""
    try:
        samples: dict[str, dict] = {}
        with tarfile.open(fileobj=io.BytesIO(row["bytes"]), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                data = tar.extractfile(member).read()
                sample = samples.setdefault(key, {})
                if ext.lower() in ("png", "jpg", "jpeg", "webp"):
                    sample["image"] = data
                elif ext.lower() in ("txt", "caption"):
                    sample["caption"] = data.decode("utf-8", "replace").strip()
        return [{"image": s.get("image"), "caption": s.get("caption", "")} for s in samples.values()]
    except Exception:
        return [{"image": None, "caption": ""}]


def image_dataset(urls: list[str], size: int):
    """Rows ``image`` (uint8 ``3 size size``), ``caption`` (str), ``ok`` (bool)."""
    import ray.data

    files = list_files(urls, IMAGE_EXTS)
    parquet = [f for f in files if f.endswith(".parquet")]
    tars = [f for f in files if f.endswith(".tar")]
    parts = []
    if parquet:
        fs, _ = arrow_fs(parquet[0])
        paths = [fsspec.core.url_to_fs(f)[1] for f in parquet]
        parts.append(ray.data.read_parquet(paths, filesystem=fs, columns=["image", "caption"]))
    if tars:
        fs, _ = arrow_fs(tars[0])
        paths = [fsspec.core.url_to_fs(f)[1] for f in tars]
        parts.append(ray.data.read_binary_files(paths, filesystem=fs).flat_map(_untar))
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    return ds.map_batches(_decode_image_batch, fn_kwargs={"size": size}, batch_size=64)


def _decode_video_row(row: dict, size: int, max_frames: int) -> dict:
    decoded = decode_video(row["bytes"], size, max_frames)
    if decoded is None:
        return {"video": np.zeros((3, max_frames, size, size), np.uint8), "length": 0, "fps": 0.0, "ok": False}
    video, n, fps = decoded
    return {"video": video, "length": n, "fps": fps, "ok": True}


def video_dataset(urls: list[str], size: int, max_frames: int):
    """Rows ``video`` (uint8 ``3 max_frames size size``, zero-padded), ``length``, ``fps``, ``ok``."""
    import ray.data

    files = list_files(urls, VIDEO_EXTS)
    fs, _ = arrow_fs(files[0])
    paths = [fsspec.core.url_to_fs(f)[1] for f in files]
    return ray.data.read_binary_files(paths, filesystem=fs).map(
        _decode_video_row, fn_kwargs={"size": size, "max_frames": max_frames}
    )
