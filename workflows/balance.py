"""Throughput balance of a chain of actor pools: how many actors each stage should have.

Every row passes every stage once, so the chain runs at the rate of its slowest stage. A stage of n actors,
each spending c seconds of compute per row, serves n / c rows per second; the allocation that maximises the
slowest of these rates within the cluster's resources is the balanced one. :func:`plan` moves toward it from
the current allocation, as Cosmos-Xenna's autoscaler does (``run_fragmentation_autoscaler``):

1. grow the slowest stage while the free resources hold one more of its actors;
2. when they do not, take actors from stages that stay faster than the slowest one without them (a donor
   keeps at least ``1 + margin`` times the slowest rate, so noise in the measurements cannot move an actor
   back and forth);
3. shrink what idles: a stage that would still serve ``surplus`` times the chain's rate with one actor fewer
   gives it back.

A stage never goes below its pool's ``min`` or above its ``max``. Everything here is arithmetic on numbers the
caller measured; the engine (``workflows/engine.py``) applies the plan, and ``mav plan-pools`` uses it with
costs measured or counted before a job starts.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MARGIN = 0.05    # a donor must stay this much faster than the slowest stage after giving an actor
SURPLUS = 2.0    # a stage this many times faster than the chain with one actor fewer gives that actor back


@dataclass(frozen=True, kw_only=True)
class StageLoad:
    name: str
    seconds_per_row: float | None   # one actor's compute seconds per row; None: not measured yet
    actors: int                     # actors the stage has now (ready or starting)
    min_actors: int = 1
    max_actors: int = 1
    need: Mapping[str, float] = field(default_factory=dict)  # resources one actor holds, e.g. {"GPU": 1}

    def rate(self, actors: int) -> float:
        """Rows per second of ``actors`` actors."""
        return actors / self.seconds_per_row if self.seconds_per_row else float("inf")


def _fits(need: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v - 1e-9 for k, v in need.items() if v > 0)


def _add(free: dict[str, float], need: Mapping[str, float], sign: float) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) + sign * v


def plan(stages: Sequence[StageLoad], free: Mapping[str, float], *, margin: float = MARGIN,
         surplus: float = SURPLUS) -> list[int]:
    """The new actor count of each stage, given the resources ``free`` beyond what the stages hold now.

    While any stage has no measurement the counts stay as they are (clamped to min/max).
    """
    counts = [min(max(s.actors, s.min_actors), s.max_actors) for s in stages]
    if not stages or any(s.seconds_per_row is None for s in stages):
        return counts
    free = dict(free)
    for s, n in zip(stages, counts):
        _add(free, s.need, s.actors - n)

    def slowest() -> int:
        return min(range(len(stages)), key=lambda i: stages[i].rate(counts[i]))

    for _ in range(sum(s.max_actors for s in stages) * 2):
        k = slowest()
        floor = stages[k].rate(counts[k])
        if counts[k] >= stages[k].max_actors:
            break
        if _fits(stages[k].need, free):
            counts[k] += 1
            _add(free, stages[k].need, -1)
            continue
        # Take actors from the fastest donors until one more actor of k fits; none if it never would.
        trial, trial_free, taken = list(counts), dict(free), False
        while not _fits(stages[k].need, trial_free):
            donors = [j for j in range(len(stages)) if j != k and trial[j] > stages[j].min_actors
                      and stages[j].rate(trial[j] - 1) > floor * (1 + margin)
                      and any(stages[j].need.get(r, 0) > 0 for r, v in stages[k].need.items()
                              if v > 0 and trial_free.get(r, 0.0) < v - 1e-9)]
            if not donors:
                break
            j = max(donors, key=lambda j: stages[j].rate(trial[j] - 1))
            trial[j] -= 1
            _add(trial_free, stages[j].need, 1)
        else:
            taken = True
        if not taken:
            break
        counts, free = trial, trial_free
        counts[k] += 1
        _add(free, stages[k].need, -1)

    chain = min(s.rate(n) for s, n in zip(stages, counts))
    for i, s in enumerate(stages):
        while counts[i] > s.min_actors and s.rate(counts[i] - 1) >= surplus * chain:
            counts[i] -= 1
    return counts


def chain_rate(stages: Sequence[StageLoad], counts: Sequence[int]) -> float:
    """Rows per second of the chain with ``counts`` actors per stage: its slowest stage's rate."""
    return min(s.rate(n) for s, n in zip(stages, counts))


class SecondsPerRow:
    """One actor's compute seconds per row of a stage: the median over its last ``window`` calls.

    The median passes over an actor's cold first call (allocations, kernel selection) and a short last
    batch; ``None`` until ``min_calls`` calls were seen.
    """

    def __init__(self, window: int = 16, min_calls: int = 3) -> None:
        self.calls: deque[float] = deque(maxlen=window)
        self.min_calls = min_calls

    def add(self, seconds: float, rows: int) -> None:
        if rows > 0:
            self.calls.append(seconds / rows)

    def value(self) -> float | None:
        return statistics.median(self.calls) if len(self.calls) >= self.min_calls else None
