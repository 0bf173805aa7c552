"""Column batches, ``dict[str, np.ndarray]`` with one entry per row in every column: the shape every runner,
the batch engine and the Serve deployments pass around."""

from __future__ import annotations

import numpy as np

Batch = dict[str, np.ndarray]


def from_rows(rows: list[dict]) -> Batch:
    """Row dicts -> columns (strings as object arrays, numbers as their numpy dtype)."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[key] = np.array(values, dtype=object) if isinstance(values[0], str) else np.array(values)
    return out


def concat(batches: list[Batch]) -> Batch:
    """Batches with the same columns -> one batch, rows in order."""
    if len(batches) == 1:
        return batches[0]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def split(batch: Batch, sizes: list[int]) -> list[Batch]:
    """Inverse of :func:`concat`: consecutive rows back into batches of ``sizes`` rows."""
    parts, at = [], 0
    for n in sizes:
        parts.append({k: v[at : at + n] for k, v in batch.items()})
        at += n
    return parts


def take(batch: Batch, idx: np.ndarray) -> Batch:
    """The rows ``idx`` of ``batch`` (the batch itself when ``idx`` is every row in order)."""
    n = len(next(iter(batch.values()))) if batch else 0
    if len(idx) == n and np.array_equal(idx, np.arange(n)):
        return batch
    return {k: v[idx] for k, v in batch.items()}


def groups(column: np.ndarray) -> list[tuple[np.ndarray, object]]:
    """Row indices grouped by value of ``column``: ``[(idx, value), ...]`` in sorted value order."""
    return [(np.flatnonzero(column == v), v) for v in np.unique(column)]


def scatter(parts: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """One column of ``n`` rows from ``(idx, values)`` parts that cover every row once (inverse of grouping)."""
    first = parts[0][1]
    out = np.empty((n, *first.shape[1:]), dtype=first.dtype)
    for idx, values in parts:
        out[idx] = values
    return out
