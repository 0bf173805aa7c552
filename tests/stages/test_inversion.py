"""DDIM inversion: inverting a video under its condition, then DDIM sampling under the same condition from
the result, gives the video back; the inversion record round-trips through a bundle.

Bounds (mean squared error, pixels in [-1, 1]):
  * the exact denoiser of Gaussian data (a tiny 1x3x4x8x8 video, 25 steps): below 0.002 against the video's
    own mean square of about 0.2, and shrinking with more steps (the error is DDIM's discretisation);
  * the shipped D^t with sparse-causal attention (16 keyframes of 16x16, its 12 steps), a clip of a red
    circle moving right: below 0.02, against about 0.5 from fresh noise.
"""

from dataclasses import replace
from importlib import resources

import torch
import torch.nn.functional as F

from stages import cascade
from stages.attention import use_spatial_attention
from stages.checkpoint import load_stage
from stages.config import DiffusionConfig
from stages.diffusion import sample, training_scheduler
from stages.inversion import Inversion, invert, invert_keyframes, invertible, load_inversion, save_inversion


def _gaussian_denoiser(cfg: DiffusionConfig, var: float):
    """E[ε | x_t] for data x_0 ~ N(0, var·I): √(1 − ᾱ_t) x_t / (ᾱ_t var + 1 − ᾱ_t)."""
    alpha_bar = training_scheduler(cfg).alphas_cumprod

    def model(x, t):
        a = alpha_bar[t].view(-1, *[1] * (x.ndim - 1))
        return (1 - a).sqrt() * x / (a * var + 1 - a)

    return model


def test_inversion_then_sampling_reconstructs_under_an_exact_denoiser():
    cfg = invertible(DiffusionConfig())
    model = _gaussian_denoiser(cfg, 0.25)
    x0 = (torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5).clamp(-1, 1)
    errors = {}
    for steps in (10, 25):
        x_t = invert(model, x0, cfg=cfg, steps=steps)
        errors[steps] = F.mse_loss(sample(model, x_t, cfg=cfg, steps=steps), x0).item()
        assert 0.7 < x_t.std() < 1.3  # noise-like
    assert errors[25] < 0.002 < x0.pow(2).mean() / 100
    assert errors[25] < errors[10]


def _moving_circle(frames: int, size: int) -> torch.Tensor:
    """A red circle moving right on white: ``1 3 f h w`` in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    video = torch.ones(1, 3, frames, size, size)
    for i in range(frames):
        inside = (xx - (3 + 0.6 * i)) ** 2 + (yy - size / 2) ** 2 <= (0.2 * size) ** 2
        video[0, 1:, i][:, inside] = -0.75
    return video


def test_the_shipped_decoder_reconstructs_a_clip_from_its_inversion():
    bundle = str(resources.files("cluster") / "models" / "shapes")
    cfg, net = load_stage(bundle, "decoder")
    net = use_spatial_attention(net, "sparse_causal")
    cfg = replace(cfg, unet=net.cfg, diffusion=invertible(cfg.diffusion))
    _, clip = load_stage(bundle, "clip")
    x0 = _moving_circle(cfg.frames, cfg.size)
    with torch.no_grad():
        y = F.normalize(clip.encode_image(x0[0].transpose(0, 1)).float().mean(0, keepdim=True), dim=-1)
        inv = invert_keyframes(net, cfg, x0, y, fps=5.0)
        back = cascade.decode(net, cfg, y, torch.tensor([5.0]), [0], guidance=1.0, noise=inv.noise)
        fresh = cascade.decode(net, cfg, y, torch.tensor([5.0]), [0], guidance=1.0)
    assert inv.steps == cfg.diffusion.steps
    err = F.mse_loss(back, x0).item()
    assert err < 0.02, err
    assert F.mse_loss(fresh, x0).item() > 10 * err


def test_inversion_round_trips_through_a_bundle(tmp_path):
    inv = Inversion(keyframes=_moving_circle(4, 8), image_embeds=torch.randn(1, 32), fps=4.8, steps=7,
                    noise=torch.randn(1, 3, 4, 8, 8))
    save_inversion(str(tmp_path), inv)
    back = load_inversion(str(tmp_path))
    assert (back.fps, back.steps) == (4.8, 7)
    for k in ("keyframes", "image_embeds", "noise"):
        assert torch.equal(getattr(back, k), getattr(inv, k))
    assert load_inversion(str(tmp_path / "elsewhere")) is None
