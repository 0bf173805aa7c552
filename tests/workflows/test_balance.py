"""The balancing policy alone (no Ray): measured seconds per row, actors, min/max and free resources in, actor
counts out."""

import itertools

import pytest

from workflows.balance import MARGIN, SecondsPerRow, StageLoad, chain_rate, plan

GPU = {"GPU": 1.0}


def gpu_stage(name, seconds, actors, lo=1, hi=8, need=GPU):
    return StageLoad(name=name, seconds_per_row=seconds, actors=actors, min_actors=lo, max_actors=hi, need=need)


def best_rate(stages, gpus):
    """The fastest chain any allocation of whole-GPU actors within ``gpus`` reaches (exhaustive search)."""
    ranges = [range(s.min_actors, s.max_actors + 1) for s in stages]
    return max(chain_rate(stages, c) for c in itertools.product(*ranges) if sum(c) <= gpus)


def test_free_resources_grow_the_bottleneck():
    stages = [gpu_stage("d", 0.1, 1), gpu_stage("sr", 0.4, 1)]
    assert plan(stages, {"GPU": 3}) == [1, 4]


def test_a_full_cluster_moves_actors_from_fast_stages_to_the_bottleneck():
    # 8 GPUs, all taken, first-come: the cheap stage got 5, the costly one 1.
    stages = [gpu_stage("d", 0.1, 5), gpu_stage("i", 0.2, 2), gpu_stage("sr", 0.6, 1)]
    counts = plan(stages, {"GPU": 0})
    assert sum(counts) <= 8
    assert counts[2] > counts[1] >= counts[0]
    assert chain_rate(stages, counts) == pytest.approx(best_rate(stages, 8))


@pytest.mark.parametrize("start", [(1, 1, 1, 5), (5, 1, 1, 1), (2, 2, 2, 2), (1, 2, 2, 3)])
def test_any_start_reaches_the_best_allocation(start):
    # The paper preset's per-video TFLOPs of D^t, ↑F, SR_l^t and SR_h as seconds: SR_h gets the most.
    costs = (1.754, 2.083, 3.712, 6.007)
    stages = [gpu_stage(n, c, a) for n, c, a in zip(("d", "i", "srl", "srh"), costs, start)]
    counts = plan(stages, {"GPU": 8 - sum(start)})
    assert sum(counts) <= 8
    # Within the margin of the best: a move that gains less is not worth an actor's restart.
    assert chain_rate(stages, counts) >= best_rate(stages, 8) / (1 + MARGIN)
    assert counts[3] == max(counts)


def test_the_plan_is_stable_and_noise_within_the_margin_moves_nothing():
    stages = [gpu_stage("a", 0.2, 2), gpu_stage("b", 0.2, 2)]
    assert plan(stages, {"GPU": 0}) == [2, 2]
    noisy = [gpu_stage("a", 0.19, 2), gpu_stage("b", 0.21, 2)]   # 10% apart: b is slower, a cannot spare one
    assert plan(noisy, {"GPU": 0}) == [2, 2]
    # Applying a plan and planning again changes nothing.
    stages = [gpu_stage("d", 0.1, 5), gpu_stage("sr", 0.6, 1)]
    once = plan(stages, {"GPU": 0})
    again = [gpu_stage(s.name, s.seconds_per_row, n) for s, n in zip(stages, once)]
    assert plan(again, {"GPU": 0}) == once


def test_min_and_max_bound_every_stage():
    stages = [gpu_stage("d", 0.1, 3, lo=3, hi=3), gpu_stage("sr", 1.0, 1, hi=2)]
    assert plan(stages, {"GPU": 0}) == [3, 1]       # d is fixed at 3: it cannot give one up
    assert plan(stages, {"GPU": 10}) == [3, 2]      # sr stops at its max


def test_idle_stages_shrink_and_unmeasured_stages_hold_still():
    stages = [gpu_stage("fast", 0.01, 4), gpu_stage("slow", 1.0, 2, hi=2)]
    assert plan(stages, {"GPU": 0}) == [1, 2]       # 100 rows/s against the chain's 2: three actors give back
    unmeasured = [gpu_stage("fast", 0.01, 4), gpu_stage("slow", None, 1)]
    assert plan(unmeasured, {"GPU": 4}) == [4, 1]


def test_resources_of_another_kind_are_not_taken():
    # A CPU-only writer cannot give the GPU stage a GPU, so it keeps its actors.
    cpu = {"CPU": 1.0}
    stages = [gpu_stage("writer", 0.01, 2, need=cpu), gpu_stage("sr", 1.0, 1, need={"CPU": 1.0, "GPU": 1.0})]
    assert plan(stages, {"CPU": 4, "GPU": 0}, surplus=1000) == [2, 1]
    # Fractional GPU actors give back enough for one whole-GPU actor only together.
    quarter = {"GPU": 0.25}
    stages = [gpu_stage("clip", 0.01, 4, need=quarter), gpu_stage("sr", 1.0, 1)]
    assert plan(stages, {"GPU": 0}, surplus=1000) == [4, 1]   # 0.75 GPU freed is not a GPU: nothing moves
    stages = [gpu_stage("clip", 0.01, 5, need=quarter), gpu_stage("sr", 1.0, 1)]
    assert plan(stages, {"GPU": 0}, surplus=1000) == [1, 2]


def test_seconds_per_row_is_a_median_over_recent_calls():
    speed = SecondsPerRow(window=4, min_calls=3)
    speed.add(5.0, 1)               # a cold first call
    speed.add(0.4, 2)
    assert speed.value() is None
    speed.add(0.6, 3)
    assert speed.value() == pytest.approx(0.2)
    for _ in range(4):
        speed.add(0.3, 1)
    assert speed.value() == pytest.approx(0.3)
