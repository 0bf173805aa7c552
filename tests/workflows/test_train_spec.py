"""Training configs with per-stage fields, and the memory check a worker makes before its first step."""

import dataclasses

import pytest
import torch

from stages import cascade
from stages.config import ConfigError
from stages.memory import GIB, HEADROOM, MemoryBudgetError, estimate_bytes, parameter_count
from stages.training import TRAINING_STAGES, VIDEOS, TrainConfig
from workflows.presets import load_preset
from workflows.train.job import load_train_config
from workflows.train.spec import TrainJob, stage_train_config

GPU_CONFIG = "cluster/train-gpu.yaml"


def test_the_gpu_config_gives_each_stage_a_batch_that_fits_a_40_gb_gpu_at_the_paper_preset():
    paper = load_preset("paper")
    sizes = {}
    for name, spec in TRAINING_STAGES.items():
        cfg = load_train_config(GPU_CONFIG, name)
        sizes[name] = cfg.batch_size
        stage_cfg = getattr(paper, spec.produces)
        if not hasattr(stage_cfg, "unet"):
            continue
        params = parameter_count(lambda: cascade.build_stage(spec.produces, stage_cfg))
        frames = cfg.frames if spec.data == VIDEOS else 1
        need = estimate_bytes(params, stage_cfg.unet, frames=cfg.batch_size * frames, size=spec.data_size(paper),
                              training=True, gradient_checkpointing=cfg.gradient_checkpointing, dtype=torch.bfloat16)
        assert need <= HEADROOM * 40 * GIB, (name, need / GIB)
    assert sizes["sr-low-video"] < sizes["decoder-video"] < sizes["decoder"] == sizes["clip"]


def test_per_stage_fields_override_the_common_ones_and_mistakes_are_named():
    data = {"batch_size": 8, "lr": 0.001, "stages": {"sr-low": {"batch_size": 2}}}
    assert stage_train_config(data, "sr-low", "c.yaml") == TrainConfig(batch_size=2, lr=0.001)
    assert stage_train_config(data, "decoder", "c.yaml") == TrainConfig(batch_size=8, lr=0.001)
    with pytest.raises(ConfigError, match="c.yaml: stages: unknown training stage 'sr_low'; expected one of clip"):
        stage_train_config({"stages": {"sr_low": {"batch_size": 2}}}, "decoder", "c.yaml")
    with pytest.raises(ConfigError, match=r"stages\.sr-high"):  # found while training another stage
        stage_train_config({"stages": {"sr-high": {"batch_sise": 2}}}, "decoder", "c.yaml")


def test_a_worker_refuses_a_batch_that_cannot_fit_before_its_first_step(tiny_preset_file, tmp_path):
    job = TrainJob(stage="sr-low-video", data=(str(tmp_path),), output=str(tmp_path / "out"), preset=tiny_preset_file,
                   config=TrainConfig(batch_size=4))
    stage_cfg = load_preset(tiny_preset_file).sr_low
    net = cascade.build_stage("sr_low", stage_cfg)
    job.check_memory(net, stage_cfg, torch.device("cpu"))
    huge = dataclasses.replace(job, config=TrainConfig(batch_size=10**7))
    with pytest.raises(MemoryBudgetError, match=r"training sr-low-video at batch_size 10000000 \(16 frames of 16x16 "
                                                r"each\) needs about .* GiB .* lower batch_size for this stage"):
        huge.check_memory(net, stage_cfg, torch.device("cpu"))
