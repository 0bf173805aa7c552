"""The shared diffusion core: schedulers from diffusers, guidance, loss targets, the caller's noise."""

import pytest
import torch

from stages.config import DiffusionConfig
from stages.diffusion import sample, sampling_scheduler, training_loss


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


def test_training_loss_takes_the_callers_noise():
    """``noise`` given: x_t is built from it (and ε is the target); omitted: N(0, I) from the generator."""
    from stages.diffusion import training_scheduler

    cfg = DiffusionConfig()
    x0 = torch.zeros(2, 3, 4, 8, 8)
    seen = []

    def record(x_t, t):
        seen.append((x_t, t))
        return torch.zeros_like(x_t)

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    loss = training_loss(record, x0, cfg=cfg, generator=torch.Generator().manual_seed(0), noise=noise)
    x_t, t = seen[-1]
    a = training_scheduler(cfg).alphas_cumprod[t].float()
    assert torch.allclose(x_t, (1 - a).sqrt()[:, None, None, None, None] * noise, atol=1e-6)
    assert torch.allclose(loss, noise.pow(2).mean())
    training_loss(record, x0, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(seen[-1][0], x_t)
    with pytest.raises(ValueError, match="noise has shape"):
        training_loss(record, x0, cfg=cfg, noise=torch.zeros(2, 3, 1, 8, 8))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weighting_gives_x0_errors_the_weight_min_snr_gamma(prediction_type):
    from stages.diffusion import min_snr_weight, training_scheduler

    cfg = DiffusionConfig(prediction_type=prediction_type)
    sched = training_scheduler(cfg)
    t = torch.arange(0, cfg.train_timesteps, 50)
    a = sched.alphas_cumprod[t].float()
    snr = a / (1 - a)
    native = {"epsilon": snr, "sample": torch.ones_like(snr), "v_prediction": snr + 1}[prediction_type]
    weight = min_snr_weight(sched, t, prediction_type, 5.0)
    assert torch.allclose(weight * native, snr.clamp(max=5.0), rtol=1e-5)
    assert (snr < 5).any() and (snr > 5).any()  # both sides of γ were checked

    # the loss is the per-sample mean squared error, so weighted; same draws as the plain loss
    x0 = torch.randn(6, 3, 4)
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, cfg.train_timesteps, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    target = {"epsilon": noise, "sample": x0, "v_prediction": sched.get_velocity(x0, noise, t)}[prediction_type]
    expected = (target.pow(2).flatten(1).mean(1) * min_snr_weight(sched, t, prediction_type, 5.0)).mean()
    got = training_loss(zero, x0, cfg=cfg, generator=torch.Generator().manual_seed(3), snr_gamma=5.0)
    plain = training_loss(zero, x0, cfg=cfg, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(got, expected) and torch.allclose(plain, target.pow(2).mean())
