"""The stage deployments, one per stage runner of :data:`workflows.runners.RUNNER_OF`, behind dynamic batching,
and the MP4 encoder.

A request's frames travel from deployment to deployment: the ingress passes each call's
``DeploymentResponse`` to the next stage's call, so Ray hands a stage's output to the next stage's replica
and the ingress never holds frames. A stage's output is a :class:`Hop`-shaped dict: the rows so far and a
trace of each stage's seconds and batch size. SR_h takes a chunk of the frames (``part = (k, n)``), so one
video's frames spread over SR_h's replicas; :class:`Encoder` joins the chunks and writes the MP4.

An edit's rows (``POST /v1/edits``) come to ``decoder`` with a tuned bundle (``tuned``): that call runs the
bundle's D^t, loaded once per replica for the few bundles last used, outside the batches of other requests.

Each stage is loaded once in ``__init__`` and scales on its own (``num_replicas`` or ``autoscaling_config``,
``ray_actor_options``); its ``user_config`` is a :class:`BatchSettings`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np
import ray
from ray import serve

from stages.config import ConfigError, from_dict
from workflows import columns
from workflows.runners import RUNNER_OF

CHUNKED_STAGE = "sr_high"           # the stage whose frames fan out over its replicas
MAX_TUNED_NETWORKS = 2              # tuned D^t networks a decoder replica keeps loaded


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


class StageError(Exception):
    """A stage (or the encoder) raised on a request's rows; the message names the stage."""


def stage_error(stage: str, error: BaseException) -> StageError:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return StageError(f"{stage}: {type(error).__name__}: {lines[0] if lines else ''}"[:500])


def hop(rows: dict[str, np.ndarray], trace: dict | None = None) -> dict:
    """What travels between deployments: ``rows`` (a column batch) and ``trace`` (stage name ->
    ``[seconds, batch_size]`` of the stages passed)."""
    return {"rows": rows, "trace": dict(trace or {})}


def frame_chunk(frames: int, part: tuple[int, int], frame_batch: int) -> slice:
    """The frames of chunk ``k`` of ``n``: whole passes of ``frame_batch`` frames, spread evenly, so the
    chunks together run the passes the whole video runs (each chunk's frames come out bit for bit as in
    the whole video, which pads only its last pass). Chunks beyond the number of passes are empty."""
    k, n = part
    if not 0 <= k < n:
        raise ValueError(f"chunk {k} of {n}")
    passes = -(-frames // frame_batch)
    start, stop = k * passes // n, (k + 1) * passes // n
    return slice(min(start * frame_batch, frames), min(stop * frame_batch, frames))


def _rows(batch: dict[str, np.ndarray]) -> int:
    return len(batch["seed"])


def _signature(batch: dict[str, np.ndarray]) -> tuple:
    """Batches with the same signature concatenate (chunks of different lengths do not)."""
    return tuple(sorted((k, v.shape[1:], str(v.dtype)) for k, v in batch.items()))


@serve.deployment(max_ongoing_requests=8, max_queued_requests=32, ray_actor_options={"num_cpus": 1})
class Stage:
    """One stage runner behind dynamic batching: ``run(hop, part=None) -> hop`` with this stage's output.

    Requests arriving together are concatenated into one batch (rows with different ``steps`` are fine:
    the runner groups them), run in one call and split back; the runner's per-row seeds make each row's
    output independent of its batch. ``part = (k, n)`` (SR_h only) runs chunk k of n of the frames with
    the video's own noise: the n chunks joined are the frames SR_h makes of the whole video, bit for bit.
    """

    def __init__(self, stage: str, checkpoint: str | None, preset: str, dtype: str = "auto") -> None:
        import torch

        if stage not in RUNNER_OF:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(RUNNER_OF)}")
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        self.stage = stage
        self.preset, self.dtype = preset, dtype
        self.runner = RUNNER_OF[stage](checkpoint=checkpoint, preset=preset, dtype=dtype)
        self.tuned: OrderedDict[tuple[str, bool], object] = OrderedDict()  # D^t of tuned bundles, last used last
        self.tuned_lock = threading.Lock()
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

    async def run(self, previous: dict, part: tuple[int, int] | None = None, tuned: dict | None = None) -> dict:
        rows = previous["rows"]
        if tuned is not None:
            return await self._run_tuned(previous, tuned)
        if part is not None:
            if self.stage != CHUNKED_STAGE:
                raise StageError(f"{self.stage}: only {CHUNKED_STAGE} takes a chunk of the frames")
            video = rows["video"]
            frames = frame_chunk(video.shape[2], part, self.runner.cfg.frame_batch)
            rows = {**rows, "video": video[:, :, frames]}
            if frames.start == frames.stop:  # more chunks than passes: nothing to do here
                size = self.runner.cfg.out_size
                out = {**rows, "video": np.zeros((*video.shape[:2], 0, size, size), np.uint8)}
                return hop(out, previous["trace"])
        result = await self._batched(rows)
        if isinstance(result, BaseException):
            raise stage_error(self.stage, result)
        out, seconds, batch_size = result
        return hop(out, {**previous["trace"], self.stage: [seconds, batch_size]})

    async def _run_tuned(self, previous: dict, tuned: dict) -> dict:
        """D^t of the tuned bundle ``tuned["bundle"]`` (``mav tune``'s, written by the ``tuner`` deployment)
        on an edit's rows, from its source's inverted noise unless ``tuned["inversion"]`` is false: what
        ``mav edit`` runs. Not batched with other requests: their D^t is another network."""
        if self.stage != "decoder":
            raise StageError(f"{self.stage}: only decoder runs a tuned bundle")
        rows = previous["rows"]
        start = time.perf_counter()
        try:
            runner = await asyncio.to_thread(self._tuned_runner, str(tuned["bundle"]), bool(tuned.get("inversion", True)))
            out = await asyncio.to_thread(runner, rows)
        except Exception as e:
            raise stage_error(self.stage, e) from None
        return hop(out, {**previous["trace"], self.stage: [time.perf_counter() - start, _rows(rows)]})

    def _tuned_runner(self, bundle: str, inversion: bool):
        key = (bundle, inversion)
        with self.tuned_lock:  # calls run on threads of their own
            if key not in self.tuned:
                runner = RUNNER_OF["decoder"](checkpoint=bundle, preset=self.preset, dtype=self.dtype)
                if not inversion:
                    runner.inversion = None
                self.tuned[key] = runner
                while len(self.tuned) > MAX_TUNED_NETWORKS:
                    self.tuned.popitem(last=False)
            self.tuned.move_to_end(key)
            return self.tuned[key]

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[dict[str, np.ndarray]]) -> list[tuple | BaseException]:
        start = time.perf_counter()
        outs: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(_signature(item), []).append(i)
        for idx in groups.values():
            try:
                together = await asyncio.to_thread(self._run_together, [items[i] for i in idx])
            except Exception:  # one request's rows must not fail the others: run each alone
                together = []
                for i in idx:
                    try:
                        together.append(await asyncio.to_thread(self.runner, items[i]))
                    except Exception as row_error:
                        together.append(row_error)
            for i, out in zip(idx, together):
                outs[i] = out
        seconds = time.perf_counter() - start
        self.busy_seconds += seconds
        n = sum(_rows(item) for item in items)
        self.batch_sizes[n] += 1
        return [o if isinstance(o, BaseException) else (o, seconds, n) for o in outs]

    def _run_together(self, items: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        if len(items) == 1:
            return [self.runner(items[0])]
        return columns.split(self.runner(columns.concat(items)), [_rows(item) for item in items])


@serve.deployment(max_ongoing_requests=4, max_queued_requests=64, ray_actor_options={"num_cpus": 1})
class Encoder:
    """The MP4 writer (:func:`workflows.video.encode_mp4`) on CPUs of its own: ``encode(*chunks)`` joins
    SR_h's chunks along the frames and answers ``{"mp4": [bytes per row], "video_fps", "truncated",
    "trace", "chunks"}``. One encode runs on one thread (the bytes then equal ``mav generate``'s); replicas
    encode videos side by side."""

    async def ready(self) -> dict:
        return {"stage": "encoder", "pid": os.getpid()}

    async def encode(self, *chunks: dict) -> dict:
        from workflows.video import encode_mp4

        try:
            rows = chunks[0]["rows"]
            video = np.concatenate([c["rows"]["video"] for c in chunks], axis=2)
            fps = [float(f) for f in rows["video_fps"]]
            mp4 = [await asyncio.to_thread(encode_mp4, v, f) for v, f in zip(video, fps)]
        except Exception as e:
            raise stage_error("encoder", e) from None
        trace = dict(chunks[0]["trace"])
        seconds = [c["trace"][CHUNKED_STAGE] for c in chunks if CHUNKED_STAGE in c["trace"]]
        if seconds:  # the chunks ran side by side: the stage took as long as its slowest chunk
            trace[CHUNKED_STAGE] = [max(s for s, _ in seconds), max(b for _, b in seconds)]
        return {"mp4": mp4, "video_fps": fps, "truncated": [bool(t) for t in rows["truncated"]],
                "trace": trace, "chunks": len(chunks)}
