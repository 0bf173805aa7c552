"""Noise construction: per-sample generators, frame-correlated noise, motion guidance by noise warping."""

import pytest
import torch

from stages.noise import (frame_noise, motion_offsets, randn, stage_generators, training_noise, translated_noise,
                          translation_field_shape)


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


def _pair_correlation(noise: torch.Tensor, i: int, j: int) -> float:
    """Correlation between frames i and j of ``b c f h w`` noise, over its batch and pixels."""
    a, b = noise[:, :, i].flatten(), noise[:, :, j].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_frame_noise_mixes_a_noise_common_to_the_frames():
    shape = (3, 4, 32, 32)
    independent = frame_noise(shape, stage_generators([5, 6], "decoder"), "cpu")
    assert torch.equal(independent, randn(shape, stage_generators([5, 6], "decoder"), "cpu"))  # ρ = 0: unchanged
    mixed = frame_noise(shape, stage_generators([5, 6], "decoder"), "cpu", shared=0.5)
    assert abs(_frame_correlation(independent)) < 0.05
    assert abs(_frame_correlation(mixed) - 0.5) < 0.05
    assert abs(float(mixed.std()) - 1.0) < 0.03  # still unit variance per frame
    again = frame_noise(shape, stage_generators([6], "decoder"), "cpu", shared=0.5)
    assert torch.equal(mixed[1], again[0])  # a sample's noise depends on its own seed only


def test_progressive_frame_noise_correlates_frames_by_their_distance():
    """ε_i = r ε_{i−1} + √(1 − r²) η_i: unit variance per frame, correlation r^k between frames k apart,
    and with a shared part ρ, ρ + (1 − ρ) r^k."""
    shape = (3, 8, 64, 64)
    gens = lambda: stage_generators(list(range(8)), "decoder")  # noqa: E731
    plain = frame_noise(shape, gens(), "cpu")
    assert torch.equal(frame_noise(shape, gens(), "cpu", progressive=0.0), plain)
    noise = frame_noise(shape, gens(), "cpu", progressive=0.9)
    assert torch.equal(noise[:, :, 0], plain[:, :, 0])  # the first frame is the independent draw
    for f in range(8):
        assert abs(float(noise[:, :, f].std()) - 1.0) < 0.02, f
    for k in (1, 2, 7):
        assert abs(_pair_correlation(noise, 0, k) - 0.9**k) < 0.02, k
    mixed = frame_noise(shape, gens(), "cpu", shared=0.5, progressive=0.9)
    for k in (1, 7):
        assert abs(_pair_correlation(mixed, 0, k) - (0.5 + 0.5 * 0.9**k)) < 0.02, k
    assert abs(float(mixed[:, :, 7].std()) - 1.0) < 0.02


def test_training_noise_of_a_clip_is_correlated_as_asked_and_an_image_gets_plain_noise():
    clip = torch.zeros(4, 3, 6, 32, 32)
    assert abs(_frame_correlation(training_noise(clip, torch.Generator().manual_seed(0)))) < 0.05
    mixed = training_noise(clip, torch.Generator().manual_seed(0), shared=0.6)
    assert abs(_frame_correlation(mixed) - 0.6) < 0.05 and abs(float(mixed.std()) - 1) < 0.03
    image = torch.zeros(2, 3, 1, 8, 8)  # no frames to correlate: the same draw as plain noise
    plain = torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(training_noise(image, torch.Generator().manual_seed(1), shared=0.6), plain)


def test_translated_noise_moves_with_its_offsets_and_stays_standard_normal():
    fine = torch.randn(2, *translation_field_shape(3, 16, 16), generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [-3.0, 0.5]]] * 2)
    noise = translated_noise(fine, offsets, 16, 16)
    assert noise.shape == (2, 3, 3, 16, 16)
    # content moved by (dy, dx) sees the same noise: frame k at p + offset_k is frame 0 at p (wrapping around)
    assert torch.allclose(noise[:, :, 1], torch.roll(noise[:, :, 0], shifts=(1, 2), dims=(-2, -1)))
    assert abs(float(noise.std()) - 1.0) < 0.05 and abs(float(noise.mean())) < 0.05
    # a half-pixel move keeps half of each pixel's fine samples: correlation 1/2 with the unmoved frame
    half = translated_noise(fine, torch.tensor([[[0.0, 0.0], [0.0, 0.5]]] * 2), 16, 16)
    corr = torch.corrcoef(torch.stack([half[:, :, 0, :, 1:].flatten(), half[:, :, 1, :, 1:].flatten()]))[0, 1]
    assert abs(float(corr) - 0.5) < 0.07


def test_motion_guidance_moves_the_common_part_along_a_straight_path():
    shape = (3, 5, 16, 16)
    gens = lambda: stage_generators([3, 4], "decoder")  # noqa: E731
    still = frame_noise(shape, gens(), "cpu", shared=0.9)
    motion = torch.tensor([[0.0, 0.125], [float("nan"), float("nan")]])  # 2 px right per frame; none
    moving = frame_noise(shape, gens(), "cpu", shared=0.9, motion=motion)
    assert torch.equal(moving[1], still[1])  # a sample without motion is the unguided noise exactly
    assert not torch.equal(moving[0], still[0])
    for k in range(1, 5):  # frame k, shifted back along the path, correlates as the common share ρ (+ noise)
        back = torch.roll(moving[0, :, k], shifts=(0, -2 * k), dims=(-2, -1))
        assert _pair_correlation(torch.stack([moving[0, :, 0], back], 1)[None], 0, 1) > 0.85, k
        assert abs(_pair_correlation(moving[:1], 0, k)) < 0.2, k  # unshifted, the frames no longer line up
    assert torch.equal(motion_offsets(motion[:1], 3, 16, 16)[0], torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 4.0]]))
    assert abs(float(moving.std()) - 1.0) < 0.05
    again = frame_noise(shape, gens(), "cpu", shared=0.9, motion=motion)
    assert torch.equal(again, moving)  # deterministic in the seed


def test_motion_guidance_is_refused_where_frames_share_no_noise_or_the_batch_does_not_match():
    shape = (3, 4, 8, 8)
    with pytest.raises(ValueError, match="frame_noise.shared"):
        frame_noise(shape, stage_generators([0], "decoder"), "cpu", motion=torch.tensor([[0.1, 0.0]]))
    # more motions than samples (or fewer) is an error, never a silently dropped path
    with pytest.raises(ValueError, match=r"motion must be \(batch, 2\)"):
        frame_noise(shape, stage_generators([0, 1], "decoder"), "cpu", shared=0.5, motion=torch.zeros(3, 2))
    # no motion asked anywhere: fine even without a common part
    off = torch.full((1, 2), float("nan"))
    assert torch.equal(frame_noise(shape, stage_generators([0], "d"), "cpu", motion=off),
                       frame_noise(shape, stage_generators([0], "d"), "cpu"))


def test_noise_drawn_on_the_cpu_is_the_seeds_own_stream_bit_for_bit():
    """On the CPU a stage's noise is torch.randn of the generator seeded from (seed, stage), as it always was:
    videos made on the CPU keep their bytes. A generator of another device is seeded by one draw from the
    given one, which then moves on."""
    import hashlib

    from stages.noise import on_device

    digest = hashlib.sha256(b"7:decoder").digest()
    own = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    assert torch.equal(randn((3, 5), stage_generators([7], "decoder"), "cpu")[0], torch.randn(3, 5, generator=own))
    g = torch.Generator().manual_seed(0)
    assert on_device(g, "cpu") is g and on_device(g, torch.device("cpu")) is g
    state = g.get_state()
    clip = torch.zeros(2, 3, 4, 8, 8)
    assert torch.equal(training_noise(clip, torch.Generator().manual_seed(0)),
                       torch.randn(clip.shape, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(g.get_state(), state)
