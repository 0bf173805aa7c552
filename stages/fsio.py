"""Reading and writing through fsspec: local paths and any URL (s3://, memory://, ...) alike.

Writes are atomic (a reader sees the old object or the whole new one); YAML is read in one place, with
one-line errors that say where and what.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from typing import Any

import fsspec
import yaml
from fsspec.implementations.local import LocalFileSystem

from stages.errors import UserError

_IMPORT_UMASK = os.umask(0o022)
os.umask(_IMPORT_UMASK)

def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts) if "://" in url else os.path.join(url, *parts)


def absolute(url: str) -> str:
    """``url`` with a relative local path made absolute (against the current directory); other URLs as given."""
    return url if "://" in url else os.path.abspath(url)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that a reader sees either the old object or the whole new one.

    Local files go to a temporary file in the same directory, then ``os.replace``; object stores
    (S3) make a single PUT visible atomically.
    """
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, data)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return _IMPORT_UMASK


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def is_local(url: str) -> bool:
    return isinstance(fsspec.core.url_to_fs(url)[0], LocalFileSystem)


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error: where and what (PyYAML's own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"invalid YAML{at}: {problem}"


def parse_yaml_mapping(text: str, where: str, error: type[UserError] = UserError) -> dict[str, Any]:
    """``text`` parsed as a YAML mapping (empty text: ``{}``); ``error`` naming ``where`` otherwise."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{where}: {yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping, got {type(data).__name__}")
    return data


def read_yaml_mapping(url: str, error: type[UserError] = UserError) -> dict[str, Any]:
    """The YAML mapping at ``url`` (local path or any fsspec URL); ``error`` naming ``url`` if it cannot be
    read or is not a mapping."""
    try:
        text = read_bytes(url).decode()
    except FileNotFoundError:
        raise error(f"{url}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {url}: {e}") from None
    return parse_yaml_mapping(text, url, error)
