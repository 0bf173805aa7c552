"""A streaming executor over chained Ray actor pools.

Each stage is a pool of actors running one batch function (a stage runner). The driver only moves
ObjectRefs and row keys: a stage's output batch stays in Ray's object store and the next stage's
actor fetches it directly, re-batched to its own batch size by slicing inside the actor. So while
the last stage works on the first rows, the first stages already work on later ones.

Bounded memory: the driver admits new rows only while fewer than ``max_rows_in_flight`` are inside
the pipeline, so a million-row input never fills the object store. Each actor has at most
``queue_depth`` calls outstanding, enough that it never idles waiting for the driver.

Balance: each stage's compute seconds per row are measured from its calls (the median of the last few), and
every ``rebalance_seconds`` the pools are resized toward the allocation whose slowest stage is fastest, within
each pool's min/max and the cluster's free resources (``workflows.balance.plan``): the bottleneck grows, an
actor moves from a stage that stays fast enough without it, a stage far faster than the chain shrinks. An
actor leaving its pool is drained first: it gets no new calls, and is killed once its last call has returned,
so no row is lost or run twice.

Faults: actors are created with ``max_restarts=-1`` and ``max_task_retries``; Ray replaces a dead
actor process (on another node if its node is gone) and re-runs its in-flight calls (their inputs are
still referenced by the driver, and rebuilt from their lineage if they were on the lost node). Each
stage counts its actors lost and the rows re-run on their replacements (``StageStats``). A batch that
raises is retried row by row inside the actor, so one bad row fails alone.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import ray

from workflows import columns
from workflows.balance import SecondsPerRow, StageLoad, plan
from workflows.pools import PoolConfig

ROW_KEY = "_row"
SECONDS_PREFIX = "_seconds_"
BatchFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class StageSpec:
    name: str
    factory: Callable[[], BatchFn]   # called inside the actor: load the network there, once
    pool: PoolConfig


class PoolActor:
    """One actor of a stage pool: builds its batch function once, then maps batches.

    It takes up to ``queue_depth`` calls at once (a threaded actor) but runs the batch function for one at a
    time: a queued call fetches its input batches while the previous one computes, so the stage's device
    never waits for Ray's per-call work.
    """

    def __init__(self, name: str, factory: Callable[[], BatchFn], threads: int) -> None:
        self.name = name
        self._compute = threading.Lock()
        self.born = time.time()  # calls sent before this are re-runs of a lost actor's calls
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        try:
            import torch

            torch.set_num_threads(max(1, threads))
        except ImportError:
            pass
        self.fn = factory()

    def ready(self) -> int:
        return os.getpid()

    def process(self, parts: list[tuple[ray.ObjectRef, np.ndarray]], sent: float = 0.0) -> tuple[dict | None, dict]:
        batches = ray.get([ref for ref, _ in parts])
        batch = columns.concat([columns.take(b, idx) for b, (_, idx) in zip(batches, parts)])
        keys = [int(k) for k in batch[ROW_KEY]]
        with self._compute:
            start = time.perf_counter()
            out, failed = self._apply(batch, keys)
            seconds = time.perf_counter() - start
        ok = [int(k) for k in out[ROW_KEY]] if out is not None else []
        if out is not None:  # each row carries its share of every stage's time to the end of the pipeline
            out[f"{SECONDS_PREFIX}{self.name}"] = np.full(len(ok), seconds / max(1, len(keys)))
        meta = {"ok": ok, "failed": failed, "seconds": seconds, "rows": len(keys), "pid": os.getpid(),
                "restarted": self.restarted, "retried": self.restarted and sent < self.born}
        return out, meta

    def _apply(self, batch: dict[str, np.ndarray], keys: list[int]) -> tuple[dict | None, dict[int, str]]:
        """The batch function on ``batch``; if it raises, again row by row, so that one bad row fails alone."""
        try:
            return self.fn(batch), {}
        except Exception as e:
            if len(keys) == 1:
                return None, {keys[0]: _describe(e)}
        outs, failed = [], {}
        for i, key in enumerate(keys):
            try:
                outs.append(self.fn(columns.take(batch, np.array([i]))))
            except Exception as row_error:
                failed[key] = _describe(row_error)
        return (columns.concat(outs) if outs else None), failed


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


@dataclass
class _Chunk:
    ref: ray.ObjectRef
    idx: np.ndarray
    keys: list[int]


@dataclass
class _Call:
    stage: int
    actor: int
    parts: list[tuple[ray.ObjectRef, np.ndarray]]
    keys: list[int]
    out_ref: ray.ObjectRef
    started: float


@dataclass
class StageStats:
    name: str
    rows_done: int = 0
    rows_failed: int = 0
    calls: int = 0
    busy_seconds: float = 0.0
    actors: int = 0
    busy_actors: int = 0
    queued_rows: int = 0
    actors_lost: int = 0        # actors whose process or node died (each replaced by Ray)
    actor_seconds: float = 0.0  # seconds the stage's actors were up, summed over actors (pools change size)
    rows_retried: int = 0       # rows re-run on a lost actor's replacement


@dataclass
class _Pool:
    spec: StageSpec
    gpus: float
    actors: list = field(default_factory=list)      # ready actor handles; None where one was retired
    outstanding: list = field(default_factory=list)  # outstanding calls per ready actor
    pending: dict = field(default_factory=dict)      # ready-ref -> actor handle (starting)
    retiring: set = field(default_factory=set)       # indices of actors draining before they are killed
    queue: deque = field(default_factory=deque)
    queued_rows: int = 0
    speed: SecondsPerRow = field(default_factory=SecondsPerRow)
    up_since: list = field(default_factory=list)     # when each actor became ready
    retired_seconds: float = 0.0                     # seconds retired actors were up

    def live(self) -> list[int]:
        """Indices of the ready actors that take calls."""
        return [a for a, actor in enumerate(self.actors) if actor is not None and a not in self.retiring]


@dataclass
class Completion:
    """Rows that left the last stage (``batch`` holds them, with ``_seconds_<stage>`` columns: each row's
    share of its batches' time in every stage) or failed somewhere (``failed``)."""

    batch: dict[str, np.ndarray] | None
    failed: dict[int, tuple[str, str]]     # row key -> (stage, error)


class StreamingExecutor:
    def __init__(
        self,
        specs: list[StageSpec],
        *,
        max_rows_in_flight: int | None = None,
        max_task_retries: int = 3,
        use_gpus: bool | None = None,
        rebalance_seconds: float = 2.0,
    ) -> None:
        if not specs:
            raise ValueError("a pipeline needs at least one stage")
        if use_gpus is None:
            use_gpus = ray.cluster_resources().get("GPU", 0) > 0
        self.use_gpus = use_gpus
        self.max_task_retries = max_task_retries
        self.pools = [_Pool(spec=s, gpus=s.pool.gpus if use_gpus else 0.0) for s in specs]
        self.stats = [StageStats(name=s.name) for s in specs]
        if max_rows_in_flight is None:
            max_rows_in_flight = sum(s.pool.max_actors * s.pool.queue_depth * s.pool.batch_size for s in specs)
            max_rows_in_flight += specs[0].pool.batch_size
        self.max_rows_in_flight = max_rows_in_flight
        self.calls: dict[ray.ObjectRef, _Call] = {}
        self.replacements: set[tuple[int, int]] = set()   # (stage, pid) of actors that replaced lost ones
        self.token = uuid.uuid4().hex[:8]
        self.started_actors = 0
        self.retired_actors = 0
        self.started = time.perf_counter()
        self.rebalance_seconds = rebalance_seconds
        self.balanced_at = self.started
        for i, pool in enumerate(self.pools):
            for _ in range(pool.spec.pool.start_actors):
                self._start_actor(i)

    # -- actors ---------------------------------------------------------------------------
    def _actor_options(self, pool: _Pool) -> dict:
        p = pool.spec.pool
        opts = {
            "num_cpus": p.cpus,
            "num_gpus": pool.gpus,
            "max_restarts": -1,
            "max_task_retries": self.max_task_retries,
            "max_concurrency": p.queue_depth,  # queued calls fetch their inputs while one computes
        }
        if p.resources:
            opts["resources"] = dict(p.resources)
        return opts

    def _start_actor(self, i: int) -> None:
        pool = self.pools[i]
        threads = max(1, int(pool.spec.pool.cpus))
        # Named "mav-<job>-<stage>-<n>" so operators (and tests) can find a stage's actors.
        name = f"mav-{self.token}-{pool.spec.name}-{self.started_actors}"
        self.started_actors += 1
        options = self._actor_options(pool)
        actor = ray.remote(PoolActor).options(name=name, **options).remote(pool.spec.name, pool.spec.factory, threads)
        pool.pending[actor.ready.remote()] = actor

    def _poll_pending(self, block: bool = False) -> None:
        for pool in self.pools:
            if not pool.pending:
                continue
            refs = list(pool.pending)
            ready, _ = ray.wait(refs, num_returns=len(refs) if block else 1, timeout=None if block else 0)
            for ref in ready:
                actor = pool.pending.pop(ref)
                ray.get(ref)  # raises if the actor failed to load: a configuration error
                pool.actors.append(actor)
                pool.outstanding.append(0)
                pool.up_since.append(time.perf_counter())

    def wait_ready(self) -> None:
        """Block until every pool's initial actors have loaded their networks."""
        self._poll_pending(block=True)

    def _need(self, pool: _Pool) -> dict[str, float]:
        p = pool.spec.pool
        return {"CPU": p.cpus, "GPU": pool.gpus, **p.resources}

    def _rebalance(self) -> None:
        """Resize the pools toward balanced stage throughputs, once every ``rebalance_seconds`` and only when
        the last resize has settled (no actor starting or draining)."""
        now = time.perf_counter()
        if now - self.balanced_at < self.rebalance_seconds or any(p.pending or p.retiring for p in self.pools):
            return
        self.balanced_at = now
        loads = [StageLoad(name=p.spec.name, seconds_per_row=p.speed.value(), actors=len(p.live()),
                           min_actors=p.spec.pool.min_actors, max_actors=p.spec.pool.max_actors, need=self._need(p))
                 for p in self.pools]
        if any(load.seconds_per_row is None for load in loads):
            return
        for i, (load, target) in enumerate(zip(loads, plan(loads, ray.available_resources()))):
            for _ in range(load.actors - target):
                self._retire(i)
            for _ in range(target - load.actors):
                self._start_actor(i)

    def _retire(self, i: int) -> None:
        """Drain the pool's least busy actor: no new calls; killed when its last call has returned."""
        pool = self.pools[i]
        a = min(pool.live(), key=lambda k: pool.outstanding[k])
        pool.retiring.add(a)
        self._reap(pool, a)

    def _reap(self, pool: _Pool, a: int) -> None:
        if a in pool.retiring and pool.outstanding[a] == 0:
            ray.kill(pool.actors[a], no_restart=True)
            pool.actors[a] = None
            pool.retired_seconds += time.perf_counter() - pool.up_since[a]
            pool.retiring.discard(a)
            self.retired_actors += 1

    # -- scheduling -----------------------------------------------------------------------
    def _upstream_drained(self, i: int, source_done: bool) -> bool:
        if not source_done:
            return False
        for j in range(i):
            if self.pools[j].queued_rows or any(c.stage == j for c in self.calls.values()):
                return False
        return True

    def _dispatch(self, i: int, source_done: bool) -> None:
        pool = self.pools[i]
        b = pool.spec.pool.batch_size
        while pool.queued_rows and (pool.queued_rows >= b or self._upstream_drained(i, source_done)):
            free = [a for a in pool.live() if pool.outstanding[a] < pool.spec.pool.queue_depth]
            if not free:
                return
            a = min(free, key=lambda k: pool.outstanding[k])
            parts, keys, need = [], [], b
            while need and pool.queue:
                chunk = pool.queue[0]
                if len(chunk.keys) <= need:
                    pool.queue.popleft()
                    parts.append((chunk.ref, chunk.idx))
                    keys += chunk.keys
                    need -= len(chunk.keys)
                else:
                    parts.append((chunk.ref, chunk.idx[:need]))
                    keys += chunk.keys[:need]
                    pool.queue[0] = _Chunk(chunk.ref, chunk.idx[need:], chunk.keys[need:])
                    need = 0
            pool.queued_rows -= len(keys)
            out_ref, meta_ref = pool.actors[a].process.options(num_returns=2).remote(parts, time.time())
            pool.outstanding[a] += 1
            self.calls[meta_ref] = _Call(i, a, parts, keys, out_ref, time.perf_counter())

    def _enqueue(self, i: int, ref: ray.ObjectRef, keys: list[int]) -> None:
        pool = self.pools[i]
        pool.queue.append(_Chunk(ref, np.arange(len(keys)), keys))
        pool.queued_rows += len(keys)

    def in_flight(self) -> int:
        return self._in_flight

    def run(self, rows: Iterable[dict]) -> Iterator[Completion]:
        """Stream ``rows`` (dicts with a unique int ``_row`` key) through every stage.

        Yields a :class:`Completion` each time rows leave the last stage or fail.
        """
        source = iter(rows)
        source_done = False
        buffer: list[dict] = []
        self._in_flight = 0
        b0 = self.pools[0].spec.pool.batch_size
        while True:
            self._poll_pending()
            while not source_done and self._in_flight + len(buffer) < self.max_rows_in_flight:
                try:
                    buffer.append(next(source))
                except StopIteration:
                    source_done = True
                    break
                if len(buffer) >= b0:
                    break
            if buffer and (len(buffer) >= b0 or source_done or self._in_flight + len(buffer) >= self.max_rows_in_flight):
                keys = [int(r[ROW_KEY]) for r in buffer]
                self._enqueue(0, ray.put(columns.from_rows(buffer)), keys)
                self._in_flight += len(buffer)
                buffer = []
            for i in reversed(range(len(self.pools))):
                self._dispatch(i, source_done and not buffer)
            self._rebalance()
            if source_done and not buffer and not self.calls and not any(p.queued_rows for p in self.pools):
                return
            if not self.calls:
                if not any(p.live() for p in self.pools if p.queued_rows):
                    self._poll_pending(block=True)
                continue
            ready, _ = ray.wait(list(self.calls), num_returns=1, timeout=0.1)
            for meta_ref in ready:
                completion = self._complete(meta_ref)
                if completion is not None:
                    yield completion

    def _complete(self, meta_ref: ray.ObjectRef) -> Completion | None:
        call = self.calls.pop(meta_ref)
        pool = self.pools[call.stage]
        name = pool.spec.name
        if call.actor < len(pool.outstanding):
            pool.outstanding[call.actor] -= 1
            self._reap(pool, call.actor)
        stats = self.stats[call.stage]
        last = call.stage == len(self.pools) - 1
        try:
            meta = ray.get(meta_ref)
        except (ray.exceptions.RayError, Exception) as e:  # actor lost beyond its retries, or a bug
            self._in_flight -= len(call.keys)
            stats.rows_failed += len(call.keys)
            err = _describe(e)
            return Completion(None, {k: (name, err) for k in call.keys})
        stats.calls += 1
        stats.busy_seconds += meta["seconds"]
        if meta.get("restarted") and (call.stage, meta["pid"]) not in self.replacements:
            self.replacements.add((call.stage, meta["pid"]))
            stats.actors_lost += 1
        if meta.get("retried"):
            stats.rows_retried += len(call.keys)
        pool.speed.add(meta["seconds"], meta["rows"])
        stats.rows_done += len(meta["ok"])
        stats.rows_failed += len(meta["failed"])
        failed = {k: (name, err) for k, err in meta["failed"].items()}
        self._in_flight -= len(failed)
        if not last:
            if meta["ok"]:
                self._enqueue(call.stage + 1, call.out_ref, meta["ok"])
            return Completion(None, failed) if failed else None
        batch = ray.get(call.out_ref) if meta["ok"] else None
        self._in_flight -= len(meta["ok"])
        return Completion(batch, failed)

    def snapshot(self) -> list[StageStats]:
        for pool, stats in zip(self.pools, self.stats):
            stats.actors = sum(1 for actor in pool.actors if actor is not None)
            now = time.perf_counter()
            stats.actor_seconds = pool.retired_seconds + sum(
                now - t for actor, t in zip(pool.actors, pool.up_since) if actor is not None)
            stats.busy_actors = sum(1 for n in pool.outstanding if n > 0)
            stats.queued_rows = pool.queued_rows
        return self.stats

    def shutdown(self) -> None:
        for pool in self.pools:
            for actor in [*pool.actors, *pool.pending.values()]:
                if actor is not None:
                    ray.kill(actor, no_restart=True)
            pool.actors.clear()
            pool.pending.clear()
