"""Balanced pools: `mav batch`'s engine, started from a wrong allocation, against the balanced bound.

    .venv/bin/python benchmarks/pool_balance.py                      # 400 rows, ~4 min on 2 cores
    .venv/bin/python benchmarks/pool_balance.py --rows 200 --no-reference

The cascade's six stages and the MP4 writer as sleep stages (no models): a row costs stage s a fixed c_s
seconds of sleep, c_s proportional to one paper-preset video's FLOPs in that stage (stages.costs; 1 s per
10 PFLOP). A local Ray instance offers 8 logical GPUs; the pools are cluster/pools.yaml's (CLIP and P a
quarter GPU each, the U-Net stages one GPU per actor, the writer on CPU), started as the first-come growth
of the old engine left them on 8 GPUs: D^t at its maximum of 4 actors, ↑F, SR_l^t and SR_h at one each.

Balanced bound: the best allocation of the same 8 GPUs (exhaustive search over the U-Net stages' actor counts
within their pools' maxima) runs at r* = min_s n_s / c_s rows per second, so N rows take at least
T_bound = N / r*. T runs from the first stage's first call starting to the last stage's last call ending (the
initial actors are up before it); the figure is T_bound / T. The reference run starts at the balanced
allocation with the engine's balancing off (min = max): what the engine gets when it starts right.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import os
import platform
import sys
import time

import numpy as np
import ray

from workflows.engine import ROW_KEY, StageSpec, StreamingExecutor
from workflows.pools import PoolConfig, load_pools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPUS = 8
# One paper-preset video's TFLOPs per stage (benchmarks/stage_costs.py's counts × evaluations per video).
PAPER_TFLOP = {"clip": 0.027, "prior": 21.0, "decoder": 1751.5, "interpolation": 2084.2, "sr_low": 3719.5,
               "sr_high": 6010.8}
TFLOP_PER_SECOND = 1e4   # sleep 1 s per 10 PFLOP
WRITER_SECONDS = 0.005   # per row
WRONG = {"decoder": 4, "interpolation": 1, "sr_low": 1, "sr_high": 1}   # first-come growth on 8 GPUs


class SleepPerRow:
    """A stage's batch function: sleeps its cost per row, stamps each row with the call's start and end."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name, self.seconds = name, seconds

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[ROW_KEY])
        start = time.time()
        time.sleep(self.seconds * n)
        return {**batch, f"_start_{self.name}": np.full(n, start), f"_end_{self.name}": np.full(n, time.time())}


def seconds_per_row() -> dict[str, float]:
    return {**{s: tflop / TFLOP_PER_SECOND for s, tflop in PAPER_TFLOP.items()}, "writer": WRITER_SECONDS}


def balanced(pools: dict[str, PoolConfig], costs: dict[str, float]) -> tuple[dict[str, int], float]:
    """The allocation of GPUS that maximises the chain's rate (exhaustive), and that rate in rows/s."""
    fixed = sum(p.gpus * p.start_actors for s, p in pools.items() if s not in WRONG)
    best, best_rate = {}, 0.0
    for counts in itertools.product(*(range(1, pools[s].max_actors + 1) for s in WRONG)):
        alloc = dict(zip(WRONG, counts))
        if fixed + sum(pools[s].gpus * n for s, n in alloc.items()) > GPUS:
            continue
        full = {s: alloc.get(s, pools[s].start_actors) for s in costs}
        rate = min(full[s] / costs[s] for s in costs)
        if rate > best_rate:
            best, best_rate = alloc, rate
    return best, best_rate


def specs(pools: dict[str, PoolConfig], costs: dict[str, float], start: dict[str, int], fixed: bool) -> list[StageSpec]:
    out = []
    for s, c in costs.items():
        p = pools[s]
        n = start.get(s, p.start_actors)
        lo, hi = (n, n) if fixed else (p.min_actors, max(p.max_actors, n))
        pool = PoolConfig(min_actors=lo, max_actors=hi, initial_actors=n, gpus=p.gpus, cpus=p.cpus,
                          batch_size=p.batch_size, queue_depth=p.queue_depth)
        out.append(StageSpec(s, lambda s=s, c=c: SleepPerRow(s, c), pool))
    return out


def run(label: str, stage_specs: list[StageSpec], n: int, t_bound: float) -> dict:
    executor = StreamingExecutor(stage_specs, use_gpus=True)
    executor.wait_ready()
    began = time.perf_counter()
    first, last = stage_specs[0].name, stage_specs[-1].name
    rows, ends, changes = [], [], []
    allocation = None
    for c in executor.run({ROW_KEY: i, "payload": np.arange(16, dtype=np.float32)} for i in range(n)):
        if c.failed:
            raise RuntimeError(f"rows failed: {c.failed}")
        rows += c.batch[ROW_KEY].tolist()
        ends.append((c.batch[f"_start_{first}"].min(), c.batch[f"_end_{last}"].max(), len(c.batch[ROW_KEY])))
        now = {s.name: s.actors for s in executor.snapshot() if s.name in WRONG}
        if now != allocation:
            allocation = now
            changes.append((time.perf_counter() - began, now))
    moves = (executor.started_actors - sum(s.pool.start_actors for s in stage_specs), executor.retired_actors)
    lost = sum(s.actors_lost for s in executor.snapshot())   # processes that died (e.g. the machine out of memory)
    executor.shutdown()
    if sorted(rows) != list(range(n)):
        raise RuntimeError(f"{label}: rows lost or repeated ({len(rows)} rows for {n}, {len(set(rows))} distinct)")
    t0 = min(a for a, _, _ in ends)
    span = max(b for _, b, _ in ends) - t0
    # Steady rate: rows finished over the second half of the run.
    done = sorted((b - t0, k) for _, b, k in ends)
    half = [k for t, k in done if t >= span / 2]
    steady = sum(half) / (span / 2)
    return {"label": label, "rows": n, "T": span, "ratio": t_bound / span, "steady_rows_per_s": steady,
            "changes": changes, "started": moves[0], "retired": moves[1], "lost": lost}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--no-reference", action="store_true", help="skip the run that starts balanced")
    args = parser.parse_args(argv)
    if args.rows < 1:
        raise ValueError(f"--rows must be >= 1, got {args.rows}")
    command = " ".join([os.path.relpath(sys.executable, ROOT), os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')} host {platform.node()} cpus {os.cpu_count()} "
          f"ray {ray.__version__} load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"command: {command}")
    pools = load_pools()
    costs = seconds_per_row()
    best, rate = balanced(pools, costs)
    wrong_rate = min({**{s: pools[s].start_actors for s in costs}, **WRONG}[s] / costs[s] for s in costs)
    t_bound = args.rows / rate
    print("\nstage          c_s (s/row)  GPUs/actor  wrong start  balanced")
    for s, c in costs.items():
        print(f"  {s:<13} {c:10.4f} {pools[s].gpus:11g} {WRONG.get(s, pools[s].start_actors):12d} "
              f"{best.get(s, pools[s].start_actors):9d}")
    print(f"balanced rate r* = {rate:.3f} rows/s (T_bound = {t_bound:.1f} s for {args.rows} rows); "
          f"the wrong start's own rate {wrong_rate:.3f} rows/s ({rate / wrong_rate:.2f}x slower)")

    ray.init(address="local", num_cpus=16, num_gpus=GPUS, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    results = [run("engine, started wrong", specs(pools, costs, WRONG, fixed=False), args.rows, t_bound)]
    if not args.no_reference:
        results.append(run("fixed at the balanced allocation", specs(pools, costs, best, fixed=True), args.rows,
                           t_bound))
    ray.shutdown()
    print("\nrun                                rows    T (s)  T_bound/T  rows/s, 2nd half  actors started/retired/lost")
    for r in results:
        print(f"  {r['label']:<32} {r['rows']:4d} {r['T']:8.1f} {r['ratio']:10.3f} {r['steady_rows_per_s']:17.2f}"
              f"   {r['started']}/{r['retired']}/{r['lost']}")
    for r in results:
        print(f"\n{r['label']}: allocation of the U-Net stages over time (s after the run began)")
        for t, alloc in r["changes"]:
            print(f"  {t:6.1f}  " + ", ".join(f"{s} {n}" for s, n in alloc.items()))
    print(f"\nEvery row came out once in each run. Load average after: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
