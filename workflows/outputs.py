"""Where videos go: safe file names from user text, and writability checks through fsspec (writing itself:
``stages.fsio.write_bytes_atomic``)."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import sys
import tempfile
import unicodedata
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stages.fsio import join, write_bytes_atomic
from workflows.errors import EXIT_FAILED, CliError


def safe_name(text: str, max_len: int = 48) -> str:
    """A file-name-safe slug of ``text`` plus a short hash of the full text.

    Only ``[a-z0-9-]`` survive, so no path separators, dots or control characters reach a path; the
    hash keeps distinct texts (e.g. differing only in punctuation or beyond the cut) apart.
    """
    norm = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", norm).strip("-")[:max_len].strip("-") or "video"
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug}-{digest}"


def video_paths(out: str, prompts: list[str]) -> list[str]:
    """Where the videos of ``prompts`` go: ``out`` itself if it is one .mp4 for one prompt, else one file per
    prompt in the directory/prefix ``out``; CliError unless each of their directories can be written to."""
    single_file = out.lower().endswith(".mp4")
    if single_file and len(prompts) > 1:
        raise CliError(f"--out {out}: several prompts need a directory, not an .mp4 file")
    paths = [out] if single_file else [join(out, f"{i:03d}-{safe_name(p)}.mp4") for i, p in enumerate(prompts)]
    for directory in dict.fromkeys(posixpath.dirname(p) if "://" in p else os.path.dirname(p) for p in paths):
        try:
            check_writable(directory or ".")
        except Exception as e:  # any filesystem's refusal: permissions, missing bucket, credentials
            raise CliError(f"cannot write to {out}: {e}") from None
    return paths


def write_videos(paths: list[str], videos: list, prompts: list[str]) -> None:
    """Each video (``workflows.pipeline.Video``) as an MP4 at its path, with a line on stderr for each and a
    warning for a prompt the text encoder cut."""
    from workflows.video import encode_mp4

    for path, video, prompt in zip(paths, videos, prompts, strict=True):
        if video.truncated:
            print(f"warning: prompt longer than the text encoder's context was cut: {prompt[:60]!r}...", file=sys.stderr)
        try:
            write_bytes_atomic(path, encode_mp4(video.frames, video.fps))
        except Exception as e:
            raise CliError(f"cannot write {path}: {e}", EXIT_FAILED) from None
        _, f, h, w = video.frames.shape
        print(f"wrote {path} ({f} frames, {w}x{h}, {video.fps:g} fps)", file=sys.stderr)


def check_writable(directory: str) -> None:
    """Raise OSError (with the reason) unless a file can be created in ``directory`` (created if missing)."""
    fs, path = fsspec.core.url_to_fs(directory)
    if isinstance(fs, LocalFileSystem):
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"{directory} is not a directory")
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".mav-write-check-")
        os.close(fd)
        os.unlink(probe)
        return
    probe = join(directory, f".mav-write-check-{uuid.uuid4().hex}")
    _, probe_path = fsspec.core.url_to_fs(probe)
    fs.pipe_file(probe_path, b"")
    fs.rm(probe_path)
