"""Every stage's shapes, ↑F's kept frames, SR_h's shared noise, and seed determinism across batches."""

import pytest
import torch

from stages import cascade
from stages.config import STAGE_NAMES


@pytest.fixture(scope="module")
def nets(tiny_config):
    return {name: cascade.build_stage(name, getattr(tiny_config, name)).eval() for name in STAGE_NAMES}


def _text(nets, prompts):
    return cascade.encode_text(nets["clip"], prompts)


@torch.inference_mode()
def test_stage_shapes(nets, tiny_config):
    c = tiny_config
    d = c.clip.resolved_embed_dim
    text = _text(nets, ["a red ball", "a blue square on a white background"])
    assert text["text_embeds"].shape == (2, d)
    assert text["text_hidden"].shape == (2, c.clip.context_length, d)
    assert text["text_mask"].dtype == torch.bool and text["truncated"].tolist() == [False, False]
    neg = _text(nets, ["", ""])
    y = cascade.generate_image_embeds(nets["prior"], text, neg, [0, 1])
    assert y.shape == (2, d)
    assert torch.allclose(y.norm(dim=-1), torch.ones(2), atol=1e-5)
    keys = cascade.decode(nets["decoder"], c.decoder, y, torch.tensor([4.0, 8.0]), [0, 1])
    assert keys.shape == (2, 3, c.decoder.frames, c.decoder.size, c.decoder.size)
    video, fps = cascade.interpolate(nets["interpolation"], c.interpolation, keys, y, torch.tensor([4.0, 8.0]), [0, 1])
    n = (c.decoder.frames - 1) * c.interpolation.skip + 1
    assert video.shape == (2, 3, n, c.decoder.size, c.decoder.size)
    assert fps.tolist() == [4.0 * c.interpolation.skip, 8.0 * c.interpolation.skip]
    low = cascade.super_resolve_video(nets["sr_low"], c.sr_low, video, [0, 1])
    assert low.shape == (2, 3, n, c.sr_low.out_size, c.sr_low.out_size)
    high = cascade.super_resolve_frames(nets["sr_high"], c.sr_high, low, [0, 1])
    assert high.shape == (2, 3, n, c.sr_high.out_size, c.sr_high.out_size)
    assert high.abs().max() <= 1.0 + 1e-5


@torch.inference_mode()
def test_decoder_samples_from_its_frame_noise_settings(nets, tiny_config):
    """D^t's initial noise has the sampling ρ when one is set, the training ρ otherwise, and its r."""
    from dataclasses import replace

    from stages.config import FrameNoiseConfig

    def keyframes(**frame_noise):
        cfg = replace(tiny_config.decoder, frame_noise=FrameNoiseConfig(**frame_noise))
        return cascade.decode(nets["decoder"], cfg, torch.randn(1, 32, generator=torch.Generator().manual_seed(0)),
                              torch.tensor([4.0]), [3])

    trained_at_half = keyframes(shared=0.5)
    sampled_at_09 = keyframes(shared=0.5, sample_shared=0.9)
    assert torch.equal(sampled_at_09, keyframes(shared=0.9))
    assert not torch.equal(sampled_at_09, trained_at_half)
    assert not torch.equal(keyframes(shared=0.5, sample_progressive=0.95), trained_at_half)


@torch.inference_mode()
def test_motion_guidance_is_per_sample_and_off_by_default(nets, tiny_config):
    """``motion`` moves a sample's keyframes only where it is given; a NaN row is the unguided sample exactly."""
    from dataclasses import replace

    from stages.config import FrameNoiseConfig

    cfg = replace(tiny_config.decoder, frame_noise=FrameNoiseConfig(shared=0.9))
    y = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    fps = torch.tensor([4.0, 4.0])
    plain = cascade.decode(nets["decoder"], cfg, y, fps, [3, 4])
    motion = torch.tensor([[0.0, 0.25], [float("nan"), float("nan")]])
    guided = cascade.decode(nets["decoder"], cfg, y, fps, [3, 4], motion=motion)
    assert (guided[1] - plain[1]).abs().max() < 1e-4  # batched float sums may differ in the last bits
    assert (guided[0] - plain[0]).abs().max() > 1e-2
    assert torch.equal(guided, cascade.decode(nets["decoder"], cfg, y, fps, [3, 4], motion=motion))
    with pytest.raises(ValueError, match="frame_noise.shared"):  # nothing to move without a common part
        cascade.decode(nets["decoder"], tiny_config.decoder, y[:1], fps[:1], [3], motion=motion[:1])


@torch.inference_mode()
def test_each_video_is_decoded_at_its_own_fps_through_guidance(tiny_config):
    """D^t samples through classifier-free guidance with each video's own fps and seed, whatever else is in
    the batch; a trained fps embedding makes the fps change the keyframes."""
    torch.manual_seed(0)
    net = cascade.build_stage("decoder", tiny_config.decoder).eval()
    g = torch.Generator().manual_seed(1)
    for n, p in net.named_parameters():
        if ".temporal_attn.to_out." in n or "fps_embed" in n:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    y = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(2)), dim=-1)
    cfg = tiny_config.decoder
    both = cascade.decode(net, cfg, y, torch.tensor([3.0, 24.0]), [5, 6])
    # batched float reductions may differ in the last bits
    assert (both[1:] - cascade.decode(net, cfg, y[1:], torch.tensor([24.0]), [6])).abs().max() < 1e-4
    assert (both[:1] - cascade.decode(net, cfg, y[:1], torch.tensor([24.0]), [5])).abs().max() > 1e-2


@torch.inference_mode()
def test_interpolation_can_output_its_own_rendering_of_the_keyframes(nets, tiny_config):
    """keep_given_frames false: the same sample, with ↑F's output also at the keyframes' positions."""
    from dataclasses import replace

    keys = torch.rand(1, 3, tiny_config.decoder.frames, 8, 8) * 2 - 1
    args = (keys, torch.randn(1, 32), torch.tensor([3.0]), [7])
    kept, _ = cascade.interpolate(nets["interpolation"], tiny_config.interpolation, *args)
    cfg = replace(tiny_config.interpolation, keep_given_frames=False)
    rendered, _ = cascade.interpolate(nets["interpolation"], cfg, *args)
    s = cfg.skip
    generated = torch.ones(kept.shape[2], dtype=torch.bool)
    generated[::s] = False
    assert torch.equal(kept[:, :, ::s], keys)
    assert torch.equal(rendered[:, :, generated], kept[:, :, generated])
    assert not torch.allclose(rendered[:, :, ::s], keys, atol=1e-3)


@torch.inference_mode()
def test_paper_frame_count_16_to_76(nets, tiny_config):
    """Frame skip 5 turns 16 keyframes into 76 frames, keyframe i at position 5i, unchanged."""
    from dataclasses import replace

    cfg = replace(tiny_config.interpolation, skip=5)
    keys = torch.rand(1, 3, 16, 8, 8) * 2 - 1
    video, fps = cascade.interpolate(nets["interpolation"], cfg, keys, torch.randn(1, 32), torch.tensor([3.0]), [7])
    assert video.shape[2] == 76 and fps.item() == 15.0
    assert torch.equal(video[:, :, ::5], keys)
    generated = torch.ones(76, dtype=torch.bool)
    generated[::5] = False
    assert not torch.equal(video[:, :, generated], torch.zeros_like(video[:, :, generated]))


@torch.inference_mode()
def test_infill_extrapolation_and_image_animation(nets, tiny_config):
    cfg = tiny_config.interpolation
    frames = torch.rand(2, 3, 6, 8, 8) * 2 - 1
    known = torch.zeros(2, 6, dtype=torch.bool)
    known[0, :3] = True  # extrapolate forward from the first three frames
    known[1, 0] = True   # animate one image
    out = cascade.infill(nets["interpolation"], cfg, frames, known, torch.randn(2, 32), torch.tensor([5.0, 5.0]), [1, 2])
    assert torch.equal(out[0, :, :3], frames[0, :, :3])
    assert torch.equal(out[1, :, 0], frames[1, :, 0])
    assert not torch.equal(out[0, :, 3:], frames[0, :, 3:])


def test_infill_inputs_layout():
    frames = torch.rand(1, 3, 4, 2, 2)
    known = torch.tensor([[True, False, False, True]])
    cond = cascade.infill_inputs(frames, known)
    assert cond.shape == (1, 4, 4, 2, 2)
    assert torch.equal(cond[:, :3, 0], frames[:, :, 0]) and torch.equal(cond[:, :3, 1], torch.zeros(1, 3, 2, 2))
    assert cond[0, 3, :, 0, 0].tolist() == [1.0, 0.0, 0.0, 1.0]


@torch.inference_mode()
def test_sr_high_shares_noise_across_frames(nets, tiny_config):
    """SR_h starts every frame from the same noise: identical input frames give identical output frames,
    also across frame chunks."""
    c = tiny_config.sr_high
    frame = torch.rand(1, 3, 1, c.in_size, c.in_size) * 2 - 1
    video = frame.expand(1, 3, c.frame_batch + 2, -1, -1).contiguous()
    out = cascade.super_resolve_frames(nets["sr_high"], c, video, [5])
    for i in range(1, video.shape[2]):
        assert torch.equal(out[:, :, i], out[:, :, 0]), i
    other = cascade.super_resolve_frames(nets["sr_high"], c, video[:, :, :1], [6])
    assert not torch.allclose(other[:, :, 0], out[:, :, 0])  # a different seed gives different detail
