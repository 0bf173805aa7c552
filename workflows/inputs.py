"""Prompt files for batch jobs: .txt, .jsonl, .csv, .parquet, globs, any fsspec URL; streamed row by row.

``.txt``: one prompt per line, blank lines skipped. Other formats: a ``prompt`` column and optional
``seed``, ``fps``, ``negative_prompt``, ``id``, ``steps``, ``guidance`` and ``motion`` (motion guidance, (dy, dx)
in frame sizes per keyframe: a JSON list ``[dy, dx]`` in .jsonl, a string ``"dy dx"`` in .csv, a list column in
.parquet; empty or null: off). A row that is wrong on its own
(bad value, non-UTF-8 line, duplicate id) becomes an :class:`InputRow` with ``error`` set, so the job
records it as failed and goes on; a file that cannot be used at all raises :class:`InputError`.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import math
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

from stages.errors import UserError

COLUMNS = ("prompt", "seed", "fps", "negative_prompt", "id", "steps", "guidance", "motion")
FORMATS = (".txt", ".jsonl", ".csv", ".parquet")


class InputError(UserError):
    """A prompt source that cannot be read; the message names it."""


@dataclass
class InputRow:
    id: str
    source: str                      # file and line/row number, for messages
    fields: dict                     # prompt and whichever optional columns the row has
    error: str | None = None


def _fs_error(url: str, e: Exception) -> InputError:
    name = type(e).__name__
    text = str(e)
    if isinstance(e, FileNotFoundError):
        return InputError(f"{url}: no such file or bucket")
    if isinstance(e, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return InputError(f"{url}: access denied (check the AWS credentials in the environment)")
    return InputError(f"{url}: cannot read ({name}: {text.splitlines()[0] if text else ''})")


def expand(urls: list[str]) -> list[str]:
    """Expand globs; every URL must name at least one file of a known format."""
    files: list[str] = []
    for url in urls:
        try:
            fs, _ = fsspec.core.url_to_fs(url)
            opened = fsspec.open_files(url, "rb", expand=True)
            paths = [of.full_name if hasattr(of, "full_name") else of.path for of in opened]
            paths = [p for p in paths if fs.isfile(fs._strip_protocol(p))]
        except Exception as e:  # filesystem-specific errors: missing bucket, bad credentials
            raise _fs_error(url, e) from None
        if not paths:
            raise InputError(f"{url}: no such file or bucket" + (" (the glob matched nothing)" if any(c in url for c in "*?[") else ""))
        for p in sorted(paths):
            protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
            full = p if "://" in p or not protocol else protocol + p
            ext = os.path.splitext(full)[1].lower()
            if ext not in FORMATS:
                raise InputError(f"{full}: unsupported prompt file type {ext or '(none)'}; expected {', '.join(FORMATS)}")
            files.append(full)
    return list(dict.fromkeys(files))


def _default_id_prefixes(files: list[str]) -> dict[str, str]:
    stems = [os.path.splitext(posixpath.basename(f))[0] for f in files]
    out = {}
    for f, stem in zip(files, stems):
        if stems.count(stem) > 1:
            stem = f"{stem}-{hashlib.sha256(f.encode()).hexdigest()[:6]}"
        out[f] = stem
    return out


def open_inputs(urls: list[str]) -> list[str]:
    """Expand ``urls`` and check every file (exists, readable, not empty, known columns).

    Raises InputError; call it before anything is written.
    """
    files = expand(urls)
    for f in files:
        _check_file(f)
    return files


def read_rows(files: list[str]) -> Iterator[InputRow]:
    """Every row of every (checked) file, in order, streamed."""
    prefixes = _default_id_prefixes(files)
    seen: dict[str, str] = {}
    for f in files:
        for row in _rows_of(f, prefixes[f]):
            if row.error is None:
                if row.id in seen:
                    row.error = f"id: duplicate id {row.id!r} (first at {seen[row.id]})"
                else:
                    seen[row.id] = row.source
            yield row


def _check_file(url: str) -> None:
    """File-level checks that must pass before any output is written."""
    try:
        with fsspec.open(url, "rb") as fh:
            head = fh.read(1 << 16)
    except Exception as e:
        raise _fs_error(url, e) from None
    ext = os.path.splitext(url)[1].lower()
    if not head.strip():
        raise InputError(f"{url}: the file is empty")
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            with fsspec.open(url, "rb") as fh:
                names = pq.ParquetFile(fh).schema_arrow.names
        except Exception as e:
            raise InputError(f"{url}: not a readable Parquet file ({e})") from None
        _check_columns(url, names)
    elif ext == ".csv":
        import pyarrow.csv as pacsv

        try:
            first = head.splitlines()[0].decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{url}: the header line is not valid UTF-8") from None
        names = pacsv.read_csv(io.BytesIO(first.encode() + b"\n")).column_names
        _check_columns(url, names)
    elif ext == ".jsonl":
        for line in head.splitlines():
            if line.strip():
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return  # reported per row
                if isinstance(obj, dict):
                    _check_columns(url, list(obj))
                return


def _check_columns(url: str, names: list[str]) -> None:
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise InputError(f"{url}: unknown column {unknown[0]!r}; expected {', '.join(COLUMNS)}")
    if "prompt" not in names:
        raise InputError(f"{url}: no 'prompt' column (columns: {', '.join(names) or 'none'})")


def _rows_of(url: str, prefix: str) -> Iterator[InputRow]:
    ext = os.path.splitext(url)[1].lower()
    if ext == ".txt":
        yield from _txt_rows(url, prefix)
    elif ext == ".jsonl":
        yield from _jsonl_rows(url, prefix)
    elif ext == ".csv":
        yield from _table_rows(url, prefix, _csv_batches(url))
    else:
        yield from _table_rows(url, prefix, _parquet_batches(url))


def _lines(url: str) -> Iterator[tuple[int, bytes]]:
    with fsspec.open(url, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            yield n, raw.rstrip(b"\r\n")


def _decode(raw: bytes) -> str | None:
    try:
        return codecs.decode(raw, "utf-8")
    except UnicodeDecodeError:
        return None


def _txt_rows(url: str, prefix: str) -> Iterator[InputRow]:
    for n, raw in _lines(url):
        text = _decode(raw)
        where = f"{url}:{n}"
        rid = f"{prefix}-{n:06d}"
        if text is None:
            yield InputRow(rid, where, {"prompt": ""}, error=f"prompt: line {n} is not valid UTF-8")
            continue
        text = text.lstrip("\ufeff") if n == 1 else text
        if not text.strip():
            continue
        yield InputRow(rid, where, {"prompt": text.strip()})


def _jsonl_rows(url: str, prefix: str) -> Iterator[InputRow]:
    for n, raw in _lines(url):
        if not raw.strip():
            continue
        where = f"{url}:{n}"
        rid = f"{prefix}-{n:06d}"
        text = _decode(raw)
        if text is None:
            yield InputRow(rid, where, {"prompt": ""}, error=f"line {n} is not valid UTF-8")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield InputRow(rid, where, {"prompt": ""}, error=f"line {n} is not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            yield InputRow(rid, where, {"prompt": ""}, error=f"line {n} is not a JSON object")
            continue
        unknown = [k for k in obj if k not in COLUMNS]
        if unknown:
            yield InputRow(rid, where, {"prompt": str(obj.get("prompt", ""))}, error=f"unknown column {unknown[0]!r}")
            continue
        yield _row(obj, rid, where)


def _csv_batches(url: str) -> Iterator[list[dict]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with fsspec.open(url, "rb") as fh:
        text = {name: pa.string() for name in ("prompt", "negative_prompt", "id", "motion")}
        convert = pacsv.ConvertOptions(column_types=text)
        try:
            reader = pacsv.open_csv(fh, convert_options=convert)
            for batch in reader:
                yield batch.to_pylist()
        except pa.ArrowInvalid as e:
            raise InputError(f"{url}: {e}") from None


def _parquet_batches(url: str) -> Iterator[list[dict]]:
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024):
            yield batch.to_pylist()


def _table_rows(url: str, prefix: str, batches: Iterator[list[dict]]) -> Iterator[InputRow]:
    n = 0
    for rows in batches:
        for obj in rows:
            n += 1
            yield _row(obj, f"{prefix}-{n:06d}", f"{url}:row {n}")


def _row(obj: dict, default_id: str, where: str) -> InputRow:
    fields = {k: v for k, v in obj.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    rid = fields.pop("id", None)
    rid = default_id if rid is None or str(rid).strip() == "" else str(rid)
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return InputRow(rid, where, {"prompt": str(prompt or "")}, error="prompt: must be a non-empty string")
    fields["prompt"] = prompt.strip()
    return InputRow(rid, where, fields)
