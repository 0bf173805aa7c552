"""Benchmarks of `mav batch`: the streaming executor against its bound, Ray Data and the in-process pipeline.

    .venv/bin/python benchmarks/batch.py                                  # every section, ~12 min on 2 cores
    .venv/bin/python benchmarks/batch.py --sections efficiency scaleout   # any of: efficiency overhead scaleout memory dtype

Sections (figures go into BENCHMARKS.md, "Batch generation (mav batch)"):

efficiency  Six stages whose cost per call is a known ``time.sleep`` (standing in for GPU work), each with its own
            batch size and pool size, run by (a) our StreamingExecutor, (b) Ray Data ``map_batches`` on actor
            pools with default settings, (c) Ray Data tuned (one input block per first-stage batch, output blocks
            of a few rows). Stage s costs c_s seconds per call of b_s rows on p_s actors. Bound:
                T_bound = N · max_s c_s / (b_s · p_s)
            and efficiency = T_bound / T, where T runs from the first stage's first call starting to the last
            stage's last call ending (every engine's actors are up before it; wall time with start-up is printed
            too). The latency-aware bound T_fill = T_bound + Σ_{s≠k} c_s (k the bottleneck) also counts the first
            row's way to the bottleneck and the last row's way out of it; no schedule beats either.
overhead    The tiny preset's cascade (more sampling steps so compute dominates), 12 prompts, batches of 4 in every
            stage: the executor with one actor per stage (1 CPU, 1 torch thread each; run_job's stage specs, MP4
            writer included) against the in-process Pipeline plus MP4 encoding and writing, with torch's default
            threads (2) and with 1. Steady state excludes start-up, printed apart, as is run_job end to end.
scaleout    Sleep stages, one actor each; the bottleneck stage's pool 1 -> 2 (and autoscaled min 1, max 2).
memory      CPU preset (cluster/presets/cpu.yaml), 2 rows, batch size 1, 2 sampling steps per stage (the preset's
            shapes, so the same per-step memory): Ray's size of every stage's output object per row, and each
            stage actor's peak RSS (getrusage ru_maxrss) after loading and after its rows.
dtype       Frames crossing stages as uint8 (workflows.video, and the same with in-place steps), float16 or
            float32: bytes, encode, ray.put, ray.get + decode to float32 in another actor, and the error against
            the float32 frames.

Timings are medians of interleaved runs within one invocation; on a shared machine compare only figures of one run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np

import ray
import torch

from workflows.engine import ROW_KEY, StageSpec, StreamingExecutor
from workflows.pools import PoolConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECTIONS = ("efficiency", "overhead", "scaleout", "memory", "dtype")
STAGES = ("clip", "prior", "decoder", "interpolation", "sr_low", "sr_high")


# -- sleep stages ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SleepStage:
    name: str
    seconds: float      # c_s: cost of one call, whatever its number of rows (a GPU batch costs about the same)
    batch_size: int     # b_s
    actors: int         # p_s

    @property
    def per_row(self) -> float:
        return self.seconds / (self.batch_size * self.actors)


class Sleeper:
    """A stage's batch function: sleeps its cost, stamps each row with the call's start, end, process and 1/rows."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name, self.seconds = name, seconds

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.time()
        time.sleep(self.seconds)
        n = len(batch[ROW_KEY])
        return {**batch, f"_start_{self.name}": np.full(n, start), f"_end_{self.name}": np.full(n, time.time()),
                f"_pid_{self.name}": np.full(n, os.getpid()), f"_calls_{self.name}": np.full(n, 1.0 / n)}


# Bottleneck sr_high: 80 ms / (1 row · 4 actors) = 20 ms per row; the next slowest stage 15 ms per row.
EFFICIENCY_STAGES = (
    SleepStage("clip", 0.02, 16, 1),
    SleepStage("prior", 0.04, 16, 1),
    SleepStage("decoder", 0.10, 4, 2),
    SleepStage("interpolation", 0.05, 2, 2),
    SleepStage("sr_low", 0.06, 1, 4),
    SleepStage("sr_high", 0.08, 1, 4),
)
# One actor per stage; the decoder is the bottleneck at 80 ms per row, and stays it at 40 ms with 2 actors.
SCALEOUT_STAGES = (
    SleepStage("clip", 0.01, 16, 1),
    SleepStage("prior", 0.02, 16, 1),
    SleepStage("decoder", 0.08, 1, 1),
    SleepStage("interpolation", 0.03, 1, 1),
    SleepStage("sr_low", 0.03, 1, 1),
    SleepStage("sr_high", 0.035, 1, 1),
)


def bottleneck(stages: tuple[SleepStage, ...]) -> int:
    return max(range(len(stages)), key=lambda i: stages[i].per_row)


def bounds(stages: tuple[SleepStage, ...], n: int) -> tuple[float, float]:
    """(T_bound, T_fill) for n rows."""
    k = bottleneck(stages)
    t_bound = n * stages[k].per_row
    return t_bound, t_bound + sum(s.seconds for i, s in enumerate(stages) if i != k)


def sleep_rows(n: int) -> list[dict]:
    return [{ROW_KEY: i, "payload": np.arange(64, dtype=np.float32) + i} for i in range(n)]


@dataclass
class SleepRun:
    rows: int
    span: float          # T: first call of the first stage starts -> last call of the last stage ends
    wall: float          # the whole execution as the caller sees it (Ray Data: actor start-up included)
    calls: dict[str, int]
    busy: float          # the bottleneck stage's actors: time in calls / (p_k · T)
    driver_cpu: float = 0.0  # CPU seconds of the driver process (all its threads) during the run


def _summarise(batches: list[dict[str, np.ndarray]], stages: tuple[SleepStage, ...], wall: float) -> SleepRun:
    cols = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    first, last = stages[0].name, stages[-1].name
    span = float(cols[f"_end_{last}"].max() - cols[f"_start_{first}"].min())
    calls = {s.name: int(round(cols[f"_calls_{s.name}"].sum())) for s in stages}
    k = stages[bottleneck(stages)]
    unique = {(p, a, b) for p, a, b in zip(cols[f"_pid_{k.name}"], cols[f"_start_{k.name}"], cols[f"_end_{k.name}"])}
    busy = sum(b - a for _, a, b in unique) / (k.actors * span)
    return SleepRun(len(cols[ROW_KEY]), span, wall, calls, busy)


class SleepExecutor:
    """The StreamingExecutor over sleep stages, started once and run several times (start-up timed apart)."""

    def __init__(self, stages: tuple[SleepStage, ...], *, autoscale: dict[str, int] | None = None) -> None:
        autoscale = autoscale or {}
        self.stages = stages
        specs = [
            StageSpec(s.name, functools.partial(Sleeper, s.name, s.seconds),
                      PoolConfig(min_actors=s.actors, max_actors=autoscale.get(s.name, s.actors), batch_size=s.batch_size))
            for s in stages
        ]
        start = time.perf_counter()
        self.executor = StreamingExecutor(specs, use_gpus=False)
        self.executor.wait_ready()
        self.startup = time.perf_counter() - start

    def run(self, n: int) -> SleepRun:
        start, cpu = time.perf_counter(), time.process_time()
        batches = []
        for c in self.executor.run(sleep_rows(n)):
            if c.failed:
                raise RuntimeError(f"rows failed: {c.failed}")
            batches.append(c.batch)
        run = _summarise(batches, self.stages, time.perf_counter() - start)
        run.driver_cpu = time.process_time() - cpu
        return run

    def shutdown(self) -> None:
        self.executor.shutdown()


# Ray Data, tuned: one input block per first-stage batch, and output blocks cut to a few rows (target_max_block_size
# is in bytes; a row here is ~0.3-0.4 KB) so that the 1- and 2-row stages get work in pieces their pools can share.
# One-row blocks (a target of 1 byte) were slower: each block costs Ray Data more than a 20-80 ms batch saves.
RAY_DATA_TUNED_BLOCK_BYTES = 2048


def run_ray_data(stages: tuple[SleepStage, ...], n: int, *, tuned: bool) -> SleepRun:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size
    if tuned:
        ctx.target_max_block_size = RAY_DATA_TUNED_BLOCK_BYTES
    try:
        rows = sleep_rows(n)
        ds = (ray.data.from_items(rows, override_num_blocks=n // stages[0].batch_size) if tuned
              else ray.data.from_items(rows))
        for s in stages:
            ds = ds.map_batches(Sleeper, fn_constructor_args=(s.name, s.seconds), batch_size=s.batch_size,
                                compute=ray.data.ActorPoolStrategy(size=s.actors), num_cpus=1, batch_format="numpy")
        start, cpu = time.perf_counter(), time.process_time()
        batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        ctx.target_max_block_size = saved
    run = _summarise(batches, stages, wall)
    run.driver_cpu = cpu
    return run


def _print_runs(name: str, runs: list[SleepRun], t_bound: float, t_fill: float, wall: float) -> None:
    span = statistics.median(r.span for r in runs)
    mid = sorted(runs, key=lambda r: r.span)[len(runs) // 2]
    calls = " ".join(f"{k}={v}" for k, v in mid.calls.items())
    cpu_ms = 1e3 * mid.driver_cpu / sum(mid.calls.values())
    print(f"  {name:<19} {runs[0].rows:4d} {span:7.3f} {t_bound / span:9.3f} {t_fill / span:8.3f} {100 * mid.busy:10.0f}%"
          f" {cpu_ms:11.2f} {wall:8.1f}   {calls}")
    print(f"  {'':<19} T of each run: {', '.join(f'{r.span:.3f}' for r in runs)}")


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def section_efficiency(reps: int, n: int) -> None:
    stages = EFFICIENCY_STAGES
    t_bound, t_fill = bounds(stages, n)
    print(f"\n== efficiency: {n} rows, 6 sleep stages, median of {reps} runs ==")
    print("stage           c_s(s)  b_s  p_s  c_s/(b_s·p_s)(ms/row)  calls if full")
    for s in stages:
        print(f"  {s.name:<13} {s.seconds:6.3f} {s.batch_size:4d} {s.actors:4d} {1e3 * s.per_row:15.2f} {n // s.batch_size:14d}")
    print(f"T_bound = N·max_s c_s/(b_s·p_s) = {t_bound:.3f} s   T_fill = T_bound + Σ_(s≠bottleneck) c_s = {t_fill:.3f} s")
    print("T: first stage's first call starts -> last stage's last call ends; every engine's actors are up before it.")
    print(f"ray-data-default: from_items, map_batches(batch_size=b_s, ActorPoolStrategy(size=p_s)); ray-data-tuned: "
          f"also override_num_blocks=N/b_0, target_max_block_size={RAY_DATA_TUNED_BLOCK_BYTES} B")
    executor = SleepExecutor(stages)
    runs: dict[str, list[SleepRun]] = {"executor": [], "ray-data-default": [], "ray-data-tuned": []}
    for _ in range(reps):  # interleaved, so that a busy spell of the shared machine hits every engine
        runs["executor"].append(executor.run(n))
        runs["ray-data-default"].append(run_ray_data(stages, n, tuned=False))
        runs["ray-data-tuned"].append(run_ray_data(stages, n, tuned=True))
    longer = executor.run(2 * n)
    executor.shutdown()
    print("engine               rows    T(s)  T_bound/T  T_fill/T  busy(k)  driver CPU  wall(s)   calls per stage")
    print("                                                                  ms/call")
    ex_wall = executor.startup + statistics.median(r.wall for r in runs["executor"])
    _print_runs("executor", runs["executor"], t_bound, t_fill, ex_wall)
    for name in ("ray-data-default", "ray-data-tuned"):
        _print_runs(name, runs[name], t_bound, t_fill, statistics.median(r.wall for r in runs[name]))
    _print_runs("executor, 2N rows", [longer], *bounds(stages, 2 * n), executor.startup + longer.wall)
    print("busy(k): the bottleneck stage's actors' time in calls / (p_k·T). driver CPU: the driver process's CPU time "
          "(all threads) / stage calls. wall: one execution as its caller waits for it, actor start-up included "
          f"(executor: start-up {executor.startup:.1f} s + median run). Load average after: {_load()}")


def section_scaleout(reps: int, n: int) -> None:
    one = SCALEOUT_STAGES
    two = tuple(SleepStage(s.name, s.seconds, s.batch_size, 2) if s.name == "decoder" else s for s in one)
    print(f"\n== scale-out: {n} rows, bottleneck decoder pool 1 -> 2, executor, median of {reps} runs ==")
    for s in one:
        print(f"  {s.name:<13} c_s={s.seconds:.3f}s b_s={s.batch_size} p_s=1 -> {1e3 * s.per_row:.1f} ms/row")
    executors = {"decoder x1": SleepExecutor(one), "decoder x2": SleepExecutor(two)}
    runs: dict[str, list[SleepRun]] = {name: [] for name in executors}
    for _ in range(reps):  # interleaved: both pools stay up, idle while the other runs
        for name, executor in executors.items():
            runs[name].append(executor.run(n))
    for executor in executors.values():
        executor.shutdown()
    # Autoscaling grows the pool from inside a run, so each run needs a fresh executor: one run.
    executor = SleepExecutor(one, autoscale={"decoder": 2})
    runs["decoder autoscaled 1..2 (1 run)"] = [executor.run(n)]
    grown = next(len(p.actors) for p in executor.executor.pools if p.spec.name == "decoder")
    executor.shutdown()
    base = statistics.median(r.span for r in runs["decoder x1"])
    print(f"T_bound: x1 {bounds(one, n)[0]:.2f} s, x2 {bounds(two, n)[0]:.2f} s (ideal speed-up "
          f"{bounds(one, n)[0] / bounds(two, n)[0]:.2f}x)")
    print("config                              T(s)  rows/s  speed-up vs x1  T_bound/T  T of each run")
    for name, rs in runs.items():
        span = statistics.median(r.span for r in rs)
        t_bound = bounds(one if name == "decoder x1" else two, n)[0]
        print(f"  {name:<32} {span:6.3f} {n / span:7.2f} {base / span:13.2f}x {t_bound / span:10.3f}"
              f"   {', '.join(f'{r.span:.3f}' for r in rs)}")
    print(f"autoscaled pool ended with {grown} decoder actors (the executor adds one while the stage's queue is full "
          f"for 1 s and the cluster has room; its start-up falls inside T). Load average after: {_load()}")


# -- real stages ----------------------------------------------------------------------------------

def tiny_preset(directory: str, steps: int) -> str:
    """The tiny preset (cluster/presets/tiny.yaml) with ``steps`` sampling steps in every stage, as a file."""
    import dataclasses

    from stages.config import dump_yaml
    from workflows.presets import load_preset

    tiny = load_preset("tiny")
    stages = {f.name: getattr(tiny, f.name) for f in dataclasses.fields(tiny)}
    tiny = dataclasses.replace(tiny, **{
        name: dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, steps=steps))
        for name, cfg in stages.items() if hasattr(cfg, "diffusion")
    })
    path = os.path.join(directory, "tiny.yaml")
    with open(path, "w") as f:
        f.write(dump_yaml(tiny))
    return path


def uniform_pools(batch_size: int):
    from workflows.pools import POOL_STAGES

    return {s: PoolConfig(batch_size=batch_size, cpus=1) for s in POOL_STAGES}


def section_overhead(reps: int, prompts: int, steps: int, batch: int) -> None:
    from stages.fsio import write_bytes_atomic
    from workflows.batch import JobSpec, pipeline_row, run_job, stage_specs
    from workflows.outputs import safe_name
    from workflows.pipeline import Pipeline, Request
    from workflows.video import decode_mp4, encode_mp4

    print(f"\n== overhead vs in-process: tiny cascade with {steps} steps per stage, {prompts} prompts, batches of "
          f"{batch} in every stage, median of {reps} interleaved runs after one warm-up each ==")
    work = tempfile.mkdtemp(prefix="mav-bench-")
    preset = tiny_preset(work, steps)
    requests = [Request(prompt=f"a red ball bouncing, take {i}", seed=1000 + i, id=f"v{i:02d}") for i in range(prompts)]
    rows = [pipeline_row(i, r) for i, r in enumerate(requests)]
    pools = uniform_pools(batch)
    outs = {name: os.path.join(work, name) for name in ("executor", "local-2", "local-1")}
    for path in outs.values():
        os.makedirs(path, exist_ok=True)
    threads = torch.get_num_threads()

    start = time.perf_counter()
    pipe = Pipeline(preset=preset, device="cpu")
    load_local = time.perf_counter() - start

    def in_process(n_threads: int, out: str) -> tuple[float, float, dict[str, float]]:
        """(wall, driver CPU, seconds per stage): generate in batches, encode and write every MP4."""
        torch.set_num_threads(n_threads)
        stage_seconds = dict.fromkeys([*STAGES, "writer"], 0.0)
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(requests), batch):
            for video, r in zip(pipe.generate(requests[i:i + batch]), requests[i:i + batch]):
                t = time.perf_counter()
                write_bytes_atomic(os.path.join(out, f"{safe_name(r.id)}.mp4"), encode_mp4(video.frames, video.fps))
                stage_seconds["writer"] += time.perf_counter() - t
            for k, v in video.stage_seconds.items():
                stage_seconds[k] += v
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        torch.set_num_threads(threads)
        return wall, cpu, stage_seconds

    start = time.perf_counter()
    executor = StreamingExecutor(stage_specs(JobSpec(prompts=(), output=outs["executor"], preset=preset), pools),
                                 use_gpus=False)
    executor.wait_ready()
    startup = time.perf_counter() - start

    def on_ray() -> tuple[float, float, dict[str, float]]:
        before = {s.name: s.busy_seconds for s in executor.stats}
        start = time.perf_counter()
        done = 0
        for c in executor.run(iter(rows)):
            if c.failed:
                raise RuntimeError(f"rows failed: {c.failed}")
            done += len(c.batch[ROW_KEY])
        assert done == len(rows)
        return time.perf_counter() - start, float("nan"), {s.name: s.busy_seconds - before[s.name] for s in executor.stats}

    engines = {
        "executor": on_ray,
        "local-2": lambda: in_process(threads, outs["local-2"]),
        "local-1": lambda: in_process(1, outs["local-1"]),
    }
    runs: dict[str, list] = {name: [] for name in engines}
    for rep in range(reps + 1):  # the first round warms up: first calls allocate, ffmpeg starts cold
        for name, fn in engines.items():
            result = fn()
            if rep:
                runs[name].append(result)
    executor.shutdown()

    prompts_file = os.path.join(work, "prompts.jsonl")
    with open(prompts_file, "w") as f:
        f.writelines(json.dumps({"prompt": r.prompt, "seed": r.seed, "id": r.id}) + "\n" for r in requests)
    job = run_job(JobSpec(prompts=(prompts_file,), output=os.path.join(work, "job"), preset=preset), pools)
    assert job.ok == prompts, job

    def median_run(name: str):
        return sorted(runs[name], key=lambda r: r[0])[len(runs[name]) // 2]

    t_ray = median_run("executor")[0]
    labels = {
        "local-2": f"in-process, {threads} torch threads (default)",
        "local-1": "in-process, 1 torch thread",
        "executor": "executor, 7 actors x 1 torch thread",
    }
    print("engine                                   median s   each run (s)          driver CPU s (median run)")
    for name in ("local-2", "local-1", "executor"):
        wall, cpu, _ = median_run(name)
        each = ", ".join(f"{r[0]:.2f}" for r in runs[name])
        print(f"  {labels[name]:<38} {wall:8.2f}   {each:<21} {'' if name == 'executor' else f'{cpu:.1f}'}")
    for name in ("local-2", "local-1"):
        t = median_run(name)[0]
        print(f"steady-state ratio executor / {labels[name]}: {t_ray / t:.3f}  ({100 * (t_ray / t - 1):+.1f}%)")
    print(f"start-up (not in the figures above): Pipeline load {load_local:.2f} s; executor actors {startup:.2f} s")
    print(f"run_job end to end (actor start-up, manifest and journal included): {job.wall_seconds:.2f} s")
    for name in ("local-1", "local-2"):
        same, worst = 0, 0
        for r in requests:
            a = open(os.path.join(outs["executor"], f"{safe_name(r.id)}.mp4"), "rb").read()
            b = open(os.path.join(outs[name], f"{safe_name(r.id)}.mp4"), "rb").read()
            same += a == b
            worst = max(worst, int(np.abs(decode_mp4(a)[0].astype(np.int16) - decode_mp4(b)[0]).max()))
        print(f"MP4s executor vs {labels[name]}: {same}/{prompts} byte-identical, decoded frames differ by at most "
              f"{worst}/255")
    print("stage          in-process s (2 threads)  in-process s (1 thread)  actor busy s (1 thread)")
    mid2, mid1, midr = median_run("local-2")[2], median_run("local-1")[2], median_run("executor")[2]
    for s in (*STAGES, "writer"):
        print(f"  {s:<13} {mid2[s]:14.2f} {mid1[s]:24.2f} {midr[s]:24.2f}")
    print(f"  {'total':<13} {sum(mid2.values()):14.2f} {sum(mid1.values()):24.2f} {sum(midr.values()):24.2f}"
          f"   (executor: busy total / 2 cores = {sum(midr.values()) / 2:.2f} s, busiest actor {max(midr.values()):.2f} s)")
    print(f"load average after: {_load()}")


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def object_bytes(batch: dict[str, np.ndarray]) -> int:
    """The size Ray's object store gives ``batch`` once put."""
    ref = ray.put(batch)
    return int(ray.experimental.get_object_locations([ref])[ref]["object_size"])


class Probe:
    """Wraps a stage's batch function: stamps each row with its share of the output object's size and the actor's
    peak RSS (after load, after this call)."""

    def __init__(self, name: str, factory) -> None:
        self.name = name
        self.fn = factory()
        self.loaded = maxrss_mb()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.fn(batch)
        n = len(out[ROW_KEY])
        own = {k: v for k, v in out.items() if not k.startswith("_probe_")}
        frames = own["video"].nbytes if "video" in own else 0
        carried = {k: v for k, v in batch.items() if k.startswith("_probe_")}  # the writer keeps only its record
        return {**carried, **out, f"_probe_bytes_{self.name}": np.full(n, object_bytes(own) / n),
                f"_probe_frames_{self.name}": np.full(n, frames / n),
                f"_probe_rss_{self.name}": np.full(n, maxrss_mb()), f"_probe_load_{self.name}": np.full(n, self.loaded)}


def section_memory(n: int, steps: int) -> None:
    from workflows.batch import JobSpec, pipeline_row, stage_specs
    from workflows.columns import from_rows
    from workflows.pipeline import Request

    print(f"\n== object-store bytes and actor memory: CPU preset, {n} rows, batch size 1, {steps} steps per stage ==")
    work = tempfile.mkdtemp(prefix="mav-bench-")
    requests = [Request(prompt=f"a red ball bouncing, take {i}", seed=i, id=f"m{i}", steps=steps) for i in range(n)]
    rows = [pipeline_row(i, r) for i, r in enumerate(requests)]
    specs = [StageSpec(s.name, functools.partial(Probe, s.name, s.factory), s.pool)
             for s in stage_specs(JobSpec(prompts=(), output=work, preset="cpu"), uniform_pools(1))]
    executor = StreamingExecutor(specs, use_gpus=False)
    executor.wait_ready()
    start = time.perf_counter()
    batches = []
    for c in executor.run(iter(rows)):
        if c.failed:
            raise RuntimeError(f"rows failed: {c.failed}")
        batches.append(c.batch)
    seconds = time.perf_counter() - start
    executor.shutdown()
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    input_bytes = object_bytes(from_rows(rows)) / n
    print(f"({seconds:.1f} s for the rows)")
    print("object (producer -> consumer)      bytes/row   of which frames   actor peak RSS MiB: loaded / after rows")
    print(f"  driver -> clip                {input_bytes:12,.0f}")
    names = [s.name for s in specs]
    total = input_bytes
    for i, name in enumerate(names):
        b = float(np.median(out[f"_probe_bytes_{name}"]))
        f = float(np.median(out[f"_probe_frames_{name}"]))
        to = names[i + 1] if i + 1 < len(names) else "driver"
        total += b
        print(f"  {name + ' -> ' + to:<28} {b:12,.0f} {f:17,.0f}      {name:<13} {out[f'_probe_load_{name}'].max():7.0f}"
              f" / {out[f'_probe_rss_{name}'].max():7.0f}")
    print(f"  total per video               {total:12,.0f}")


def _to_uint8_inplace(video: torch.Tensor) -> np.ndarray:
    """workflows.video.to_uint8 with in-place steps after the first copy (the same bits, fewer passes)."""
    return video.float().clamp(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8).cpu().numpy()


def _from_uint8_inplace(video: np.ndarray) -> torch.Tensor:
    """workflows.video.from_uint8 with in-place steps after the first copy (the same bits, fewer passes)."""
    return torch.from_numpy(np.ascontiguousarray(video)).to(torch.float32).div_(127.5).sub_(1)


def _read_only(x: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # plasma arrays are read-only; a network never writes its input
        warnings.simplefilter("ignore")
        return torch.from_numpy(x)


def _codecs() -> dict:
    """kind -> (encode a float32 ``b c f h w`` tensor in [-1, 1] for the object store, decode it to float32)."""
    from workflows.video import from_uint8, to_uint8

    return {
        "uint8": (to_uint8, from_uint8),
        "uint8 in-place": (_to_uint8_inplace, _from_uint8_inplace),
        "float16": (lambda v: v.half().numpy(), lambda x: torch.from_numpy(x).float()),
        "float32": (lambda v: v.numpy(), _read_only),
    }


def section_dtype(reps: int) -> None:
    print(f"\n== intermediate frame dtype: encode + put in the driver, get + decode to float32 in an actor, 1 torch "
          f"thread each (as in a stage actor), median of {reps} interleaved runs ==")

    @ray.remote(num_cpus=1)
    class Consumer:
        def __init__(self) -> None:
            torch.set_num_threads(1)
            self.codecs = _codecs()

        def decode(self, refs: list, kind: str) -> float:
            start = time.perf_counter()
            t = self.codecs[kind][1](ray.get(refs[0]))
            float(t[0, 0, 0, 0, 0])
            return time.perf_counter() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    codecs = _codecs()
    consumer = Consumer.remote()
    ray.get(consumer.decode.remote([ray.put(np.zeros((1, 3, 1, 1, 1), np.uint8))], "uint8"))
    g = torch.Generator().manual_seed(0)
    print("shape (b c f h w)     dtype             bytes  encode ms  put ms  get+decode ms  round trip ms  max |err|")
    for shape in ((1, 3, 76, 64, 64), (1, 3, 76, 192, 192)):
        # uniform in [-1, 1]: every uint8 bin is hit, so the error printed is the worst case
        video = torch.rand(shape, generator=g) * 2 - 1
        times = {kind: {"enc": [], "put": [], "dec": [], "trip": []} for kind in codecs}
        for _ in range(reps):
            for kind, (encode, _) in codecs.items():
                t0 = time.perf_counter()
                x = encode(video)
                t1 = time.perf_counter()
                ref = ray.put(x)
                t2 = time.perf_counter()
                decode_seconds = ray.get(consumer.decode.remote([ref], kind))
                t3 = time.perf_counter()
                for key, value in (("enc", t1 - t0), ("put", t2 - t1), ("dec", decode_seconds), ("trip", t3 - t0)):
                    times[kind][key].append(value)
                del ref
        for kind, (encode, decode) in codecs.items():
            x = encode(video)
            err = float((decode(x) - video).abs().max())
            m = {k: 1e3 * statistics.median(v) for k, v in times[kind].items()}
            print(f"  {str(shape):<20} {kind:<14} {x.nbytes:10,d} {m['enc']:9.2f} {m['put']:7.2f} {m['dec']:13.2f}"
                  f" {m['trip']:14.2f}   {err:.2e}")
        u = codecs["uint8"][0](video)
        same = (np.array_equal(u, _to_uint8_inplace(video))
                and torch.equal(codecs["uint8"][1](u), _from_uint8_inplace(u)))
        print(f"  in-place uint8 encode and decode give the same bits as to_uint8 / from_uint8: {same}")
    ray.kill(consumer)
    torch.set_num_threads(threads)
    per_video = 3 * (16 * 16 * 16 + 76 * 16 * 16 + 76 * 64 * 64 + 76 * 192 * 192)
    print(f"frames crossing stages per video (16x16^2, 76x16^2, 76x64^2, 76x192^2, 3 channels): "
          f"uint8 {per_video:,} B, float16 {2 * per_video:,} B, float32 {4 * per_video:,} B")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--reps", type=int, default=3, help="timed runs per configuration (medians are printed)")
    parser.add_argument("--rows", type=int, default=192, help="rows of the efficiency section (a multiple of 16)")
    parser.add_argument("--scaleout-rows", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=12, help="prompts of the overhead section")
    parser.add_argument("--steps", type=int, default=12, help="sampling steps per stage of the overhead section")
    args = parser.parse_args(argv)
    if args.rows % 16:
        raise ValueError(f"--rows must be a multiple of 16 (the first stage's batch), got {args.rows}")

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}  host {platform.node()}  "
          f"cpus {os.cpu_count()}  gpu {torch.cuda.is_available()}  python {platform.python_version()}  "
          f"ray {ray.__version__}  torch {torch.__version__}  numpy {np.__version__}  load average {_load()}")
    print(f"command: {' '.join([os.path.relpath(sys.executable, ROOT), *sys.argv])}")
    # Logical CPUs for every actor at once: sleeping actors use none, and the overhead section's 7 actors share 2 cores.
    ray.init(num_cpus=32, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = 600  # Ray Data's pools start before its first call, as the executor's (wait_ready)
    started = time.perf_counter()
    for section in args.sections:
        t = time.perf_counter()
        if section == "efficiency":
            section_efficiency(args.reps, args.rows)
        elif section == "overhead":
            section_overhead(args.reps, args.prompts, args.steps, batch=4)
        elif section == "scaleout":
            section_scaleout(args.reps, args.scaleout_rows)
        elif section == "memory":
            section_memory(2, steps=2)
        elif section == "dtype":
            section_dtype(max(7, args.reps))
        print(f"({section}: {time.perf_counter() - t:.0f} s)")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
