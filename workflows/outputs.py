"""Where videos go: safe file names from user text, and writability checks through fsspec (writing itself:
``stages.fsio.write_bytes_atomic``)."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stages.fsio import join


def safe_name(text: str, max_len: int = 48) -> str:
    """A file-name-safe slug of ``text`` plus a short hash of the full text.

    Only ``[a-z0-9-]`` survive, so no path separators, dots or control characters reach a path; the
    hash keeps distinct texts (e.g. differing only in punctuation or beyond the cut) apart.
    """
    norm = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", norm).strip("-")[:max_len].strip("-") or "video"
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug}-{digest}"


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
