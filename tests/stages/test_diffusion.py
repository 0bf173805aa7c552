"""The shared diffusion core: schedulers from diffusers, guidance, loss targets, per-sample generators."""

import pytest
import torch

from stages.config import DiffusionConfig
from stages.diffusion import content_track, randn, sample, sampling_scheduler, stage_generators, training_loss


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


def _frame_correlation(noise: torch.Tensor) -> float:
    """Mean correlation between the frames of ``b c f h w`` noise, over pairs of distinct frames."""
    x = noise.transpose(1, 2).flatten(2)  # b f n
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
    corr = torch.einsum("bfn,bgn->bfg", x, x) / x.shape[-1]
    f = corr.shape[-1]
    return float((corr.sum((1, 2)) - corr.diagonal(dim1=1, dim2=2).sum(-1)).mean() / (f * (f - 1)))


def test_frame_noise_mixes_a_noise_common_to_the_frames():
    from stages.diffusion import frame_noise

    shape = (3, 4, 32, 32)
    independent = frame_noise(shape, stage_generators([5, 6], "decoder"), "cpu")
    assert torch.equal(independent, randn(shape, stage_generators([5, 6], "decoder"), "cpu"))  # ρ = 0: unchanged
    mixed = frame_noise(shape, stage_generators([5, 6], "decoder"), "cpu", shared=0.5)
    assert abs(_frame_correlation(independent)) < 0.05
    assert abs(_frame_correlation(mixed) - 0.5) < 0.05
    assert abs(float(mixed.std()) - 1.0) < 0.03  # still unit variance per frame
    again = frame_noise(shape, stage_generators([6], "decoder"), "cpu", shared=0.5)
    assert torch.equal(mixed[1], again[0])  # a sample's noise depends on its own seed only


def _pair_correlation(noise: torch.Tensor, i: int, j: int) -> float:
    """Correlation between frames i and j of ``b c f h w`` noise, over its batch and pixels."""
    a, b = noise[:, :, i].flatten(), noise[:, :, j].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_progressive_frame_noise_correlates_frames_by_their_distance():
    """ε_i = r ε_{i−1} + √(1 − r²) η_i: unit variance per frame, correlation r^k between frames k apart,
    and with a shared part ρ, ρ + (1 − ρ) r^k."""
    from stages.diffusion import frame_noise

    shape = (3, 8, 64, 64)
    plain = frame_noise(shape, stage_generators(list(range(8)), "decoder"), "cpu")
    assert torch.equal(frame_noise(shape, stage_generators(list(range(8)), "decoder"), "cpu", progressive=0.0), plain)
    noise = frame_noise(shape, stage_generators(list(range(8)), "decoder"), "cpu", progressive=0.9)
    assert torch.equal(noise[:, :, 0], plain[:, :, 0])  # the first frame is the independent draw
    for f in range(8):
        assert abs(float(noise[:, :, f].std()) - 1.0) < 0.02, f
    for k in (1, 2, 7):
        assert abs(_pair_correlation(noise, 0, k) - 0.9**k) < 0.02, k
    mixed = frame_noise(shape, stage_generators(list(range(8)), "decoder"), "cpu", shared=0.5, progressive=0.9)
    for k in (1, 7):
        assert abs(_pair_correlation(mixed, 0, k) - (0.5 + 0.5 * 0.9**k)) < 0.02, k
    assert abs(float(mixed[:, :, 7].std()) - 1.0) < 0.02


def test_training_noise_of_a_video_is_correlated_as_configured():
    seen = []

    def record(x_t, t):
        seen.append(x_t)
        return torch.zeros_like(x_t)

    x0 = torch.zeros(2, 3, 6, 32, 32)  # x_t = √(1 − ᾱ_t) ε: the noise's correlations, one scale per sample
    configs = (DiffusionConfig(), DiffusionConfig(frame_noise_shared=0.6), DiffusionConfig(frame_noise_progressive=0.8))
    for cfg in configs:
        training_loss(record, x0, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert abs(_frame_correlation(seen[0])) < 0.05
    assert abs(_frame_correlation(seen[1]) - 0.6) < 0.05
    assert abs(_pair_correlation(seen[2], 0, 1) - 0.8) < 0.05 and abs(_pair_correlation(seen[2], 0, 5) - 0.8**5) < 0.05
    image = torch.zeros(2, 3, 1, 8, 8)  # an image has no frames to correlate noise across: plain ε
    for cfg in (DiffusionConfig(frame_noise_shared=0.6, frame_noise_progressive=0.8), DiffusionConfig()):
        training_loss(record, image, cfg=cfg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(seen[-1], seen[-2])


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


def test_warped_noise_moves_with_its_offsets_and_stays_standard_normal():
    from stages.diffusion import warped_noise

    fine = torch.randn(2, 3, 3 * 16 * 4, 3 * 16 * 4, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [-3.0, 0.5]]] * 2)
    noise = warped_noise(fine, offsets, 16, 16)
    assert noise.shape == (2, 3, 3, 16, 16)
    # content moved by (dy, dx) sees the same noise: frame k at p + offset_k is frame 0 at p
    assert torch.allclose(noise[:, :, 1, 1:, 2:], noise[:, :, 0, :-1, :-2])
    assert abs(float(noise.std()) - 1.0) < 0.05 and abs(float(noise.mean())) < 0.05
    # a half-pixel move keeps half of each pixel's fine samples: correlation 1/2 with the unmoved frame
    half = warped_noise(fine, torch.tensor([[[0.0, 0.0], [0.0, 0.5]]] * 2), 16, 16)
    corr = torch.corrcoef(torch.stack([half[:, :, 0, :, 1:].flatten(), half[:, :, 1, :, 1:].flatten()]))[0, 1]
    assert abs(float(corr) - 0.5) < 0.07


def test_content_track_follows_a_rendered_shape():
    import numpy as np

    from workflows.synth import moving_video

    video = torch.tensor(moving_video(np.random.default_rng(3), 64, 12, "red", "circle")).float()[None] / 127.5 - 1
    track = content_track(video)
    assert track.shape == (1, 12, 2) and torch.equal(track[:, 0], torch.zeros(1, 2))
    step = (track[0, 1:] - track[0, :-1]).norm(dim=-1)
    assert float(step.median()) > 0.3  # it moves, and steadily: a bounce changes direction, not speed
    assert float((step - step.median()).abs().max()) < 0.6
    blank = video.clone()
    blank[:, :, 5] = video[:, :, 0, :1, :1]  # a frame without the shape keeps the last offset
    assert torch.equal(content_track(blank)[0, 5], content_track(blank)[0, 4])


def test_flow_noise_in_training_moves_with_the_clip_and_drift_paths_stay_in_the_frame():
    from stages.diffusion import drift_offsets, frame_noise

    from stages.diffusion import training_scheduler

    seen = []

    def record(x_t, t):
        seen.append((x_t, t))
        return torch.zeros_like(x_t)

    x0 = -torch.ones(1, 3, 4, 16, 16)  # a white square, 4 px, moving right 2 px a frame on black
    for k in range(4):
        x0[:, :, k, 6:10, 2 + 2 * k : 6 + 2 * k] = 1.0
    cfg = DiffusionConfig(frame_noise_shared=0.99, frame_noise_flow=True)
    training_loss(record, x0, cfg=cfg, generator=torch.Generator().manual_seed(0))
    x_t, t = seen[0]
    a = training_scheduler(cfg).alphas_cumprod[t].float()
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()  # the noise drawn, compared shifted by the motion and not
    moved = torch.corrcoef(torch.stack([eps[:, :, 0, :, :-2].flatten(), eps[:, :, 1, :, 2:].flatten()]))[0, 1]
    still = torch.corrcoef(torch.stack([eps[:, :, 0].flatten(), eps[:, :, 1].flatten()]))[0, 1]
    assert float(moved) > 0.9 and abs(float(still)) < 0.2

    # Drift paths carry the first frame's object as the world does: straight on, reflected where it meets an edge.
    import numpy as np

    from workflows.synth import draw

    objects = [("square", 3.0, 8.0, 3.0), ("circle", 12.0, 12.0, 2.5), ("triangle", 8.0, 8.0, 3.0)] * 3
    first = torch.stack([torch.tensor(draw(shape, "blue", cx, cy, r, 16)).permute(2, 0, 1).float() / 127.5 - 1
                         for shape, cx, cy, r in objects])
    gens = stage_generators(range(9), "drift")
    path = drift_offsets(first, 30, (0.05, 0.1), gens)
    assert path.shape == (9, 30, 2) and torch.equal(path[:, 0], torch.zeros(9, 2))
    step = (path[:, 1:] - path[:, :-1]).norm(dim=-1)
    assert float(step.max()) <= 0.1 * 16 * 2**0.5 + 1e-4 and float(step.min()) > 0  # never still
    for i in range(len(objects)):
        inside = (first[i] < 0.9).any(0).nonzero().float()  # the object's pixels (y, x)
        centroid = inside.mean(0)
        lowest, highest = centroid + path[i].min(0).values, centroid + path[i].max(0).values
        # its pixels never leave the frame by more than one
        assert bool((lowest - (centroid - inside.min(0).values) >= -1).all()), i
        assert bool((highest + (inside.max(0).values - centroid) <= 16).all()), i
    assert float(step.std(dim=1).max()) < 0.5  # a reflection turns the path, it does not slow it
    blank = drift_offsets(torch.ones(2, 3, 16, 16), 30, (0.05, 0.1), gens[:2])  # no object: a point from the centre
    assert float(blank.abs().max()) <= 8 + 1e-4 and float((blank[:, 1:] - blank[:, :-1]).norm(dim=-1).min()) > 0
    noise = frame_noise((3, 30, 16, 16), stage_generators(range(8), "x"), "cpu", shared=0.9, offsets=path)
    assert noise.shape == (8, 3, 30, 16, 16) and abs(float(noise.std()) - 1.0) < 0.05
