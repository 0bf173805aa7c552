"""The shared diffusion core: schedulers from diffusers, guidance, loss targets, per-sample generators."""

import pytest
import torch

from stages.config import DiffusionConfig
from stages.diffusion import randn, sample, sampling_scheduler, stage_generators, training_loss


def test_schedulers_come_from_diffusers():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    assert isinstance(sampling_scheduler(DiffusionConfig(sampler="ddim")), DDIMScheduler)
    assert isinstance(sampling_scheduler(DiffusionConfig(sampler="dpm++")), DPMSolverMultistepScheduler)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_sampler_recovers_a_known_x0(sampler):
    """With an oracle x_0-predicting model, sampling lands on that x_0."""
    cfg = DiffusionConfig(sampler=sampler, prediction_type="sample", clip_sample=False, steps=8)
    target = torch.randn(3, 5)
    out = sample(lambda x, t: target.expand_as(x), torch.randn(3, 5), cfg=cfg)
    assert torch.allclose(out, target, atol=1e-4)


def test_guidance_combines_conditional_and_unconditional():
    cfg = DiffusionConfig(prediction_type="sample", clip_sample=False, steps=4)
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return c[:, None].expand_as(x)

    x = torch.zeros(2, 3)
    cond, uncond = {"c": torch.tensor([1.0, 1.0])}, {"c": torch.tensor([0.0, 0.0])}
    out = sample(model, x, cfg=cfg, cond=cond, uncond=uncond, guidance=torch.tensor([1.0, 3.0]))
    assert calls == [4] * 4  # one batched pass carries both branches
    assert torch.allclose(out[0], torch.ones(3), atol=1e-4)        # w = 1: the conditional prediction
    assert torch.allclose(out[1], torch.full((3,), 3.0), atol=1e-4)  # w = 3: u + 3 (c - u)
    calls.clear()
    sample(model, x, cfg=cfg, cond=cond, uncond=uncond, guidance=1.0)
    assert calls == [2] * 4  # w = 1 everywhere skips the unconditional pass


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_training_loss_is_zero_for_the_exact_target(prediction_type):
    from stages.diffusion import training_scheduler

    cfg = DiffusionConfig(prediction_type=prediction_type)
    sched = training_scheduler(cfg)
    x0 = torch.randn(4, 2)

    def oracle(x_t, t):
        a = sched.alphas_cumprod[t][:, None]
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]

    g = torch.Generator().manual_seed(0)
    assert training_loss(oracle, x0, cfg=cfg, generator=g).item() < 1e-6
    assert training_loss(lambda x_t, t: torch.zeros_like(x_t), x0, cfg=cfg, generator=g).item() > 0.01


def test_stage_generators_depend_on_seed_and_stage_only():
    a = randn((4,), stage_generators([1, 2], "decoder"), "cpu")
    b = randn((4,), stage_generators([2], "decoder"), "cpu")
    c = randn((4,), stage_generators([1], "prior"), "cpu")
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], c[0])
    g = torch.random.get_rng_state()
    randn((4,), stage_generators([1], "decoder"), "cpu")
    assert torch.equal(g, torch.random.get_rng_state())  # the global RNG is untouched
