"""The stage deployments: one per stage runner of :data:`workflows.runners.RUNNER_OF`, behind dynamic batching.

Each is loaded once in ``__init__`` and scales on its own (``num_replicas`` or ``autoscaling_config``,
``ray_actor_options``); its ``user_config`` is a :class:`BatchSettings`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray
from ray import serve

from stages.config import ConfigError, from_dict
from workflows import columns
from workflows.runners import RUNNER_OF


@dataclass(frozen=True, kw_only=True)
class BatchSettings:
    """A stage deployment's ``user_config``."""

    max_batch_size: int = 4             # requests sharing one forward pass
    batch_wait_timeout_s: float = 0.05  # how long a batch waits to fill

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 0 <= self.batch_wait_timeout_s <= 60:
            raise ConfigError(f"batch_wait_timeout_s must be in 0..60, got {self.batch_wait_timeout_s}")


def _rows(batch: dict[str, np.ndarray]) -> int:
    return len(batch["seed"])


@serve.deployment(max_ongoing_requests=8, max_queued_requests=32, ray_actor_options={"num_cpus": 1})
class Stage:
    """One stage runner behind dynamic batching: ``run(rows) -> {"rows", "batch_size", "seconds"}``.

    ``rows`` is a batch of the runners' row columns (usually one row, as the ingress sends it). Requests
    arriving together are concatenated into one batch (rows with different ``steps`` are fine: the runner
    groups them), run in one call and split back; the runner's per-row seeds make each row's output
    independent of its batch.
    """

    def __init__(self, stage: str, checkpoint: str | None, preset: str) -> None:
        import torch

        if stage not in RUNNER_OF:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(RUNNER_OF)}")
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        self.stage = stage
        self.runner = RUNNER_OF[stage](checkpoint=checkpoint, preset=preset)
        self.settings = BatchSettings()
        self.batch_sizes: Counter[int] = Counter()
        self.busy_seconds = 0.0
        self._apply(self.settings)

    def reconfigure(self, user_config: dict | None) -> None:
        self.settings = from_dict(BatchSettings, dict(user_config or {}), where=f"{self.stage}.user_config")
        self._apply(self.settings)

    def _apply(self, settings: BatchSettings) -> None:
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def ready(self) -> dict:
        return {"stage": self.stage, "pid": os.getpid(), "device": str(self.runner.device)}

    async def stats(self) -> dict:
        return {"stage": self.stage, "pid": os.getpid(), "batch_sizes": dict(self.batch_sizes),
                "calls": sum(self.batch_sizes.values()), "busy_seconds": self.busy_seconds,
                **dataclasses.asdict(self.settings)}

    async def run(self, rows: dict[str, np.ndarray]) -> dict:
        result = await self._batched(rows)
        if isinstance(result, BaseException):
            raise result
        return result

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[dict[str, np.ndarray]]) -> list[dict | BaseException]:
        start = time.perf_counter()
        try:
            outs = await asyncio.to_thread(self._run_together, items)
        except Exception as e:  # one request's rows must not fail the others: run each alone
            if len(items) == 1:
                outs = [e]
            else:
                outs = []
                for item in items:
                    try:
                        outs.append(await asyncio.to_thread(self.runner, item))
                    except Exception as row_error:
                        outs.append(row_error)
        seconds = time.perf_counter() - start
        self.busy_seconds += seconds
        n = sum(_rows(item) for item in items)
        self.batch_sizes[n] += 1
        return [o if isinstance(o, BaseException) else {"rows": o, "batch_size": n, "seconds": seconds} for o in outs]

    def _run_together(self, items: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        if len(items) == 1:
            return [self.runner(items[0])]
        return columns.split(self.runner(columns.concat(items)), [_rows(item) for item in items])
