"""The streaming executor on a real local Ray instance: rows flow through chained actor pools exactly once,
a killed actor is replaced, a row that raises fails alone, and the driver reads the source only as far as the
pipeline has room."""

import os
import signal
import sys
import time

import numpy as np
from ray import cloudpickle

from workflows import columns
from workflows.engine import ROW_KEY, StageSpec, StreamingExecutor
from workflows.pools import PoolConfig

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules


class AddOne:
    def __call__(self, batch):
        return {**batch, "x": batch["x"] + 1}


class DieOnce:
    """Kills its own process the first time it sees row 5 (a marker file makes it once per test)."""

    def __init__(self, marker):
        self.marker = marker

    def __call__(self, batch):
        if 5 in batch[ROW_KEY] and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return {**batch, "x": batch["x"] * 10}


class Collect:
    def __init__(self, log):
        self.log = log

    def __call__(self, batch):
        with open(self.log, "a") as f:
            for k in batch[ROW_KEY]:
                f.write(f"{k}\n")
        return batch


def test_killed_actor_is_replaced_and_rows_produced_exactly_once(ray_session, tmp_path):
    pool = PoolConfig(cpus=0.5, batch_size=2)
    specs = [
        StageSpec("add", AddOne, pool),
        StageSpec("die", lambda: DieOnce(str(tmp_path / "died")), PoolConfig(cpus=0.5, batch_size=3)),
        StageSpec("collect", lambda: Collect(str(tmp_path / "log")), pool),
    ]
    executor = StreamingExecutor(specs)
    out = {}
    for c in executor.run({ROW_KEY: i, "x": i} for i in range(20)):
        assert not c.failed
        for k, x in zip(c.batch[ROW_KEY], c.batch["x"]):
            assert int(k) not in out
            out[int(k)] = int(x)
    stats = {s.name: s for s in executor.snapshot()}
    executor.shutdown()
    assert (tmp_path / "died").exists()
    assert out == {i: (i + 1) * 10 for i in range(20)}
    assert (stats["die"].actors_lost, stats["add"].actors_lost, stats["collect"].actors_lost) == (1, 0, 0)
    assert stats["die"].rows_retried >= 3  # at least the batch holding row 5, re-run on the replacement
    assert stats["add"].rows_retried == stats["collect"].rows_retried == 0
    logged = [int(line) for line in (tmp_path / "log").read_text().split()]
    assert sorted(logged) == list(range(20))  # the last stage saw every row exactly once


class FailOn:
    def __call__(self, batch):
        if 3 in batch[ROW_KEY]:
            raise ValueError("row 3 is bad")
        return batch


def test_a_row_that_raises_fails_alone(ray_session):
    executor = StreamingExecutor([StageSpec("f", FailOn, PoolConfig(cpus=0.5, batch_size=4))])
    ok, failed = set(), {}
    for c in executor.run({ROW_KEY: i, "x": i} for i in range(8)):
        failed.update(c.failed)
        if c.batch is not None:
            ok.update(int(k) for k in c.batch[ROW_KEY])
    executor.shutdown()
    assert ok == set(range(8)) - {3}
    assert failed == {3: ("f", "ValueError: row 3 is bad")}


def test_rows_in_flight_are_bounded(ray_session):
    """The driver admits rows only as earlier ones finish: the source is never read far ahead."""
    class Slow:
        def __call__(self, batch):
            time.sleep(0.05)
            return batch

    pool = PoolConfig(cpus=0.5, batch_size=2, queue_depth=2)
    executor = StreamingExecutor([StageSpec("s", Slow, pool)])
    consumed = []
    finished = 0
    peak = 0

    def source():
        for i in range(40):
            consumed.append(i)
            yield {ROW_KEY: i, "x": i}

    for c in executor.run(source()):
        finished += len(c.batch[ROW_KEY])
        peak = max(peak, len(consumed) - finished)
    executor.shutdown()
    assert finished == 40
    assert peak <= executor.max_rows_in_flight



def test_batches_of_different_sizes_meet_in_a_stage(ray_session, tmp_path):
    """A stage re-batches to its own size: 7 rows through batches of 3, then 2, then 4, each row once, in
    column order within a batch, and each stage's time is carried to the end."""
    class Sizes:
        def __init__(self, log):
            self.log = log

        def __call__(self, batch):
            with open(self.log, "a") as f:
                f.write(f"{len(batch[ROW_KEY])}\n")
            return batch

    log = str(tmp_path / "sizes")
    specs = [StageSpec("a", AddOne, PoolConfig(cpus=0.5, batch_size=3)),
             StageSpec("b", AddOne, PoolConfig(cpus=0.5, batch_size=2)),
             StageSpec("c", lambda: Sizes(log), PoolConfig(cpus=0.5, batch_size=4))]
    executor = StreamingExecutor(specs)
    out = {}
    for c in executor.run({ROW_KEY: i, "x": i} for i in range(7)):
        assert set(c.batch) == {ROW_KEY, "x", "_seconds_a", "_seconds_b", "_seconds_c"}
        assert (c.batch["_seconds_a"] > 0).all()
        out.update(zip(c.batch[ROW_KEY].tolist(), c.batch["x"].tolist()))
    executor.shutdown()
    assert out == {i: i + 2 for i in range(7)}
    sizes = [int(n) for n in open(log).read().split()]
    assert sum(sizes) == 7 and max(sizes) <= 4


def test_column_helpers_round_trip():
    rows = [{"id": "a", "x": 1, "v": [0.5, 1.0]}, {"id": "b", "x": 2, "v": [1.5, 2.0]}, {"id": "c", "x": 1, "v": [3, 4]}]
    batch = columns.from_rows(rows)
    assert batch["id"].dtype == object and batch["x"].dtype == np.int64 and batch["v"].shape == (3, 2)
    parts = columns.split(batch, [1, 2])
    assert [len(p["x"]) for p in parts] == [1, 2]
    joined = columns.concat(parts)
    assert all(np.array_equal(joined[k], batch[k]) for k in batch)
    assert columns.take(batch, np.arange(3)) is batch
    groups = columns.groups(batch["x"])
    assert [(idx.tolist(), int(v)) for idx, v in groups] == [([0, 2], 1), ([1], 2)]
    doubled = columns.scatter([(idx, columns.take(batch, idx)["v"] * 2) for idx, _ in groups], 3)
    assert np.array_equal(doubled, batch["v"] * 2)


class SleepPerRow:
    """Sleeps a fixed time per row and logs the rows it saw."""

    def __init__(self, seconds, log):
        self.seconds, self.log = seconds, log

    def __call__(self, batch):
        time.sleep(self.seconds * len(batch[ROW_KEY]))
        with open(self.log, "a") as f:
            f.writelines(f"{k}\n" for k in batch[ROW_KEY])
        return batch


def test_a_wrong_allocation_moves_an_actor_to_the_bottleneck(ray_session, tmp_path):
    """Two stages share the session's 2 GPUs as four half-GPU slots, started the wrong way round (the fast stage
    holds three): the engine drains fast actors and starts slow ones, and every row passes each stage once."""
    import ray

    assert ray.available_resources().get("GPU", 0) >= 2, "another test left actors holding the session's GPUs"
    fast, slow = str(tmp_path / "fast"), str(tmp_path / "slow")
    specs = [
        StageSpec("fast", lambda: SleepPerRow(0.005, fast),
                  PoolConfig(min_actors=1, max_actors=3, initial_actors=3, gpus=0.5, cpus=0.25)),
        StageSpec("slow", lambda: SleepPerRow(0.1, slow),
                  PoolConfig(min_actors=1, max_actors=3, gpus=0.5, cpus=0.25)),
    ]
    executor = StreamingExecutor(specs, rebalance_seconds=0.2)
    slow_pool = executor.pools[1]

    def rows():  # until the slow stage has all three actors (actor start-up takes seconds on a busy machine)
        i = 0
        while i < 40 or (len(slow_pool.live()) < 3 and i < 400):
            yield {ROW_KEY: i, "x": i}
            i += 1

    seen = {"fast": [], "slow": []}
    done = []
    for c in executor.run(rows()):
        assert not c.failed
        done += c.batch[ROW_KEY].tolist()
        for s in executor.snapshot():
            seen[s.name].append(s.actors)
    retired, started = executor.retired_actors, executor.started_actors
    stats = executor.snapshot()
    executor.shutdown()
    # Utilisation counts the seconds each actor was up, so a pool that shrank is never busier than 100%.
    assert all(0 < s.busy_seconds <= s.actor_seconds for s in stats)
    assert seen["fast"][0] == 3 and seen["fast"][-1] == 1
    assert seen["slow"][0] == 1 and seen["slow"][-1] == 3
    assert (retired, started) == (2, 6)    # two moves, no back and forth
    n = len(done)
    assert sorted(done) == list(range(n)) and n < 400
    for log in (fast, slow):
        assert sorted(int(k) for k in open(log).read().split()) == list(range(n))
