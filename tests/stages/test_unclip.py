"""The stage-level parts an imported unCLIP cascade uses: the unclip sampler with learned variance in the
one diffusion core, the two-network upsampler, the prior's CLIP embedding space, their configs."""

import dataclasses

import pytest
import torch

from stages.config import ConfigError, DiffusionConfig, PriorConfig, SRLowConfig, UNetConfig
from stages.diffusion import sample
from stages.prior import PriorNet
from stages.unclip import FinalStepUNet
from stages.unet import VideoUNet

LEARNED = DiffusionConfig(sampler="unclip", variance="learned_range", steps=4, guidance=3.0)


def toy(x, t, *, scale):
    """A fixed 'network' with learned variance: prediction and v, 2C channels."""
    s = scale.view(-1, *([1] * (x.ndim - 1)))
    return torch.cat([torch.tanh(x * s + t.view(-1, *([1] * (x.ndim - 1))) / 1000), torch.sin(x * s)], dim=1)


def test_unclip_sampler_with_learned_variance_is_unclips_own_loop():
    """sample() equals UnCLIPScheduler driven as diffusers' UnCLIPPipeline drives its decoder: guidance on the
    prediction, the conditional pass's variance, prev_timestep, one generator per sample."""
    from diffusers import UnCLIPScheduler

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = sample(toy, x_T, cfg=LEARNED, cond={"scale": torch.tensor([1.0, 2.0])},
                  uncond={"scale": torch.tensor([0.5, 0.5])},
                  generators=[torch.Generator().manual_seed(s) for s in (1, 2)])

    scheduler = UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon", clip_sample=True)
    scheduler.set_timesteps(4)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        out_u = toy(x, t.expand(2), scale=torch.tensor([0.5, 0.5]))
        out_c = toy(x, t.expand(2), scale=torch.tensor([1.0, 2.0]))
        pred = out_u[:, :3] + 3.0 * (out_c[:, :3] - out_u[:, :3])
        prev = scheduler.timesteps[i + 1] if i + 1 < len(scheduler.timesteps) else None
        x = scheduler.step(torch.cat([pred, out_c[:, 3:]], 1), t, x, prev_timestep=prev, generator=gens).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-6, rtol=0)


def test_the_unclip_sampler_needs_a_generator_per_sample():
    with pytest.raises(ValueError, match="one generator per sample"):
        sample(toy, torch.zeros(2, 3, 4, 4), cfg=LEARNED, cond={"scale": torch.ones(2)})


def test_final_step_network_answers_at_t_zero_and_the_first_elsewhere_per_sample():
    cfg = UNetConfig(block_out_channels=(8, 16), attention=(False, False), norm_num_groups=4, cross_attention_dim=None,
                     temporal_heads=2)
    torch.manual_seed(0)
    first = VideoUNet(cfg, cond_channels=3, noise_level_cond=True)
    last = VideoUNet(cfg, cond_channels=3, noise_level_cond=True)
    net = FinalStepUNet(first, last).eval()
    x, c = torch.randn(2, 3, 2, 8, 8), torch.randn(2, 3, 2, 8, 8)
    kw = {"cond_frames": c, "noise_level": torch.zeros(2)}
    with torch.no_grad():
        mixed = net(x, torch.tensor([0, 500]), **kw)
        torch.testing.assert_close(mixed[:1], last(x[:1], torch.tensor([0]), cond_frames=c[:1], noise_level=torch.zeros(1)))
        torch.testing.assert_close(mixed[1:], first(x[1:], torch.tensor([500]), cond_frames=c[1:], noise_level=torch.zeros(1)))


def test_prior_in_clip_space_standardises_with_its_own_statistics():
    prior = PriorNet(PriorConfig(embed_dim=8, num_tokens=5, layers=1, heads=2, head_dim=4, embedding_space="clip"),
                     embed_dim=8, num_tokens=5)
    with torch.no_grad():
        prior.transformer.clip_mean.normal_()
        prior.transformer.clip_std.uniform_(0.5, 2.0)
    y = torch.randn(3, 8)
    torch.testing.assert_close(prior.unscale(prior.scale(y)), y)
    assert not torch.allclose(prior.scale(y).norm(dim=-1), torch.full((3,), 8 ** 0.5))


def test_configs_refuse_what_the_unclip_parts_cannot_do():
    with pytest.raises(ConfigError, match="sampler unclip needs"):
        DiffusionConfig(sampler="unclip", prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="variance must be one of"):
        DiffusionConfig(variance="learned")
    with pytest.raises(ConfigError, match="low_res must be one of"):
        dataclasses.replace(SRLowConfig(), low_res="bicubic")
