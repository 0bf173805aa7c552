"""``mav plan-pools``: a pools file that mav batch reads, with the GPUs where the cost is; costs counted or timed."""

import dataclasses

import pytest
import torch

from stages.config import STAGE_NAMES
from stages.costs import seconds_per_evaluation
from workflows.cli import main
from workflows.plan_pools import Costs, allocate, render, stage_costs
from workflows.pools import load_pools, parse_pools
from workflows.presets import load_preset

# One paper-preset video's TFLOPs per stage (stages.costs: FLOPs per evaluation × evaluations per video).
PAPER_TFLOP = {"clip": 0.027, "prior": 21.0, "decoder": 1751.5, "interpolation": 2084.2, "sr_low": 3719.5,
               "sr_high": 6010.8}


def test_paper_costs_put_the_most_gpus_on_sr_high():
    costs = Costs({k: v * 1e12 for k, v in PAPER_TFLOP.items()}, "FLOP", "given", {})
    counts = allocate(costs, load_pools(), 8)
    assert max(counts, key=counts.get) == "sr_high"
    assert counts["sr_high"] > counts["sr_low"] > counts["decoder"]
    pools = load_pools()
    assert sum(pools[s].gpus * n for s, n in counts.items()) <= 8
    # The file starts each pool at the plan and keeps what the base pools say beyond actor counts.
    pools["sr_high"] = dataclasses.replace(pools["sr_high"], compile=True)
    planned = parse_pools(render("mav plan-pools --gpus 8", costs, pools, counts, 8))
    assert planned["sr_high"].start_actors == counts["sr_high"] and planned["sr_high"].compile
    assert planned["sr_low"].batch_size == pools["sr_low"].batch_size


def test_plan_pools_writes_a_pools_file_mav_batch_reads(tmp_path, capsys):
    out = tmp_path / "pools.yaml"
    assert main(["plan-pools", "--gpus", "8", "--preset", "tiny", "--flops", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# mav plan-pools --gpus 8 --preset tiny --flops\n")
    assert "FLOPs per video counted" in text
    pools = load_pools(str(out))
    gpus = sum(p.gpus * p.start_actors for p in pools.values())
    assert 7 <= gpus <= 8                     # whole-GPU actors fill what the quarter-GPU ones leave
    assert all(p.min_actors == 1 and p.start_actors <= p.max_actors for p in pools.values())
    assert pools["writer"] == load_pools()["writer"]   # a CPU-only stage keeps its pool

    assert main(["plan-pools", "--gpus", "3", "--preset", "tiny", "--flops"]) == 2
    assert "one actor of every GPU stage needs 4.5 GPUs; give --gpus 5 or more" in capsys.readouterr().err


def test_costs_are_timed_on_a_device():
    costs = stage_costs(load_preset("tiny"), "cpu", reps=1)
    assert costs.unit == "s" and "measured on cpu" in costs.how
    assert set(costs.per_video) == set(STAGE_NAMES)
    assert all(v > 0 for v in costs.per_video.values())
    # SR_h's video is one evaluation per frame and step: it costs more than one of its evaluations.
    assert costs.per_video["sr_high"] > costs.per_video["clip"]
    # Timed under bfloat16 autocast, as the runners compute on CUDA by default.
    assert seconds_per_evaluation("prior", load_preset("tiny"), "cpu", reps=1, dtype=torch.bfloat16) > 0


@pytest.mark.parametrize("gpus", ["0", "-1"])
def test_gpus_must_be_positive(gpus, capsys):
    assert main(["plan-pools", "--gpus", gpus, "--preset", "tiny"]) == 2
    assert "--gpus must be > 0" in capsys.readouterr().err
