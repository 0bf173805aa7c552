"""The training recipe's pure-PyTorch parts: the table of training stages and the networks they start from,
the losses' frame-correlated noise, inflation at identity, fps schedule, clips, masks, EMA, state."""

import copy
import dataclasses

import pytest
import torch

from stages.config import STAGE_NAMES, ConfigError, FrameNoiseConfig, UNetConfig
from stages.temporal import temporal_parameter_names
from stages.training import (
    EMA,
    TRAINING_STAGES,
    LossContext,
    Samples,
    TrainConfig,
    freeze_all_but_temporal,
    inflate_network,
    interpolation_mask,
    optimizer_from_tensors,
    optimizer_to_tensors,
    sample_clip,
    sample_clips,
    sample_fps,
    start_network,
    training_stage,
)
from stages.unet import VideoUNet

CFG2D = UNetConfig(block_out_channels=(8, 16), attention=(False, True), attention_head_dim=8, norm_num_groups=4,
                   cross_attention_dim=16, temporal=False, temporal_heads=2)


def _net() -> VideoUNet:
    torch.manual_seed(0)
    net = VideoUNet(CFG2D, image_embed_dim=12, context_tokens=2, fps_cond=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # as if trained on images
    return net.eval()


def test_inflated_image_network_equals_it_frame_by_frame():
    image_net = _net()
    video_net = inflate_network(copy.deepcopy(image_net), kernel=3, heads=2).eval()
    assert video_net.cfg.temporal and temporal_parameter_names(video_net)
    x = torch.randn(2, 3, 5, 16, 16)
    kw = {"image_embeds": torch.randn(2, 12), "fps": torch.tensor([4.0, 20.0])}
    t = torch.tensor([10, 900])
    with torch.no_grad():
        video = video_net(x, t, **kw)
        frames = torch.cat([image_net(x[:, :, i : i + 1], t, **kw) for i in range(5)], dim=2)
    assert (video - frames).abs().max() < 1e-5
    with pytest.raises(ValueError, match="already pseudo-3D"):
        inflate_network(video_net)


def test_fps_schedule_moves_from_high_to_low():
    cfg = TrainConfig()
    g = torch.Generator().manual_seed(0)
    early = sample_fps(0.0, 2000, cfg, g)
    late = sample_fps(1.0, 2000, cfg, g)
    assert early.min() >= 1 and late.max() <= 30
    assert early.mean() > 20 and late.mean() < 11


def test_sample_clip_stride_and_bounds():
    video = torch.arange(40).view(1, 40, 1, 1).expand(3, 40, 2, 2)
    g = torch.Generator().manual_seed(0)
    clip, fps = sample_clip(video, 40, 30.0, 10.0, 4, g)
    steps = clip[0, :, 0, 0].diff()
    assert clip.shape == (3, 4, 2, 2) and fps == 10.0 and bool((steps == 3).all())
    clip, fps = sample_clip(video, 40, 30.0, 1.0, 16, g)  # too short for 1 fps: the stride shrinks
    assert clip.shape[1] == 16 and fps == 15.0


def test_interpolation_masks():
    cfg = TrainConfig(interp_skips=(3,), extrapolation_prob=0.0)
    g = torch.Generator().manual_seed(0)
    assert interpolation_mask(16, cfg, g).nonzero().flatten().tolist() == [0, 3, 6, 9, 12, 15]
    cfg = TrainConfig(extrapolation_prob=1.0)
    for _ in range(10):
        known = interpolation_mask(16, cfg, g)
        idx = known.nonzero().flatten()
        assert 1 <= len(idx) < 16 and (idx[0] == 0 or idx[-1] == 15)
        assert bool((idx.diff() == 1).all())  # one run at the start or the end


def test_ema_averages_trainable_and_keeps_frozen_weights_exactly():
    net = inflate_network(_net(), kernel=3, heads=2)
    freeze_all_but_temporal(net)
    ema = EMA(net, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    for step in range(5):
        ema.update(net, step)
    frozen = [k for k in before if k not in trainable]
    assert frozen and all(torch.equal(ema.shadow[k], before[k]) for k in frozen)
    assert all(not torch.equal(ema.shadow[k], before[k]) for k in trainable)


def test_optimizer_state_round_trips_without_pickle():
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    tensors, meta = optimizer_to_tensors(opt)
    other = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    optimizer_from_tensors(other, tensors, meta)
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][k]))


def test_the_table_of_training_stages():
    produced = {s.produces for s in TRAINING_STAGES.values()}
    assert produced == set(STAGE_NAMES)  # every cascade stage is trained by some training stage
    image_trained = {s.produces for s in TRAINING_STAGES.values() if s.init is None}
    for name, stage in TRAINING_STAGES.items():
        assert stage.name == name and training_stage(name) is stage
        # A stage that starts from another is a video stage, started from a stage trained on images.
        assert (stage.init is not None) == stage.video == stage.inflate, name
        assert stage.init is None or stage.init in image_trained, name
    assert [n for n, s in TRAINING_STAGES.items() if s.temporal_only_allowed] == ["decoder-video", "sr-low-video"]
    with pytest.raises(ConfigError, match="unknown training stage 'decoder-3d'.*decoder-video"):
        training_stage("decoder-3d")


def _preset(tiny_config, shared: float = 0.4):
    """The tiny cascade with frames that share noise in every stage that has frames."""
    noise = FrameNoiseConfig(shared=shared, sample_shared=0.8, sample_progressive=0.9)
    return dataclasses.replace(tiny_config, **{name: dataclasses.replace(getattr(tiny_config, name), frame_noise=noise)
                                              for name in ("decoder", "interpolation", "sr_low")})


def test_image_stages_start_as_2d_networks_with_independent_frame_noise(tiny_config):
    preset = _preset(tiny_config)
    for name in ("decoder", "sr-low"):
        cfg, net = start_network(TRAINING_STAGES[name], preset)
        assert not cfg.unet.temporal and not temporal_parameter_names(net), name
        assert cfg.frame_noise == FrameNoiseConfig(), name
    cfg, _ = start_network(TRAINING_STAGES["sr-high"], preset)
    assert cfg == preset.sr_high
    cfg, _ = start_network(TRAINING_STAGES["clip"], preset)
    assert cfg == preset.clip


def _perturbed(net):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # as if trained
    return net.eval()


def test_video_stages_start_from_the_image_network_unchanged_with_the_presets_frame_noise(tiny_config):
    preset = _preset(tiny_config)
    image_cfg, image_net = start_network(TRAINING_STAGES["decoder"], preset)
    image_net = _perturbed(image_net)
    with pytest.raises(ConfigError, match="--init"):
        start_network(TRAINING_STAGES["decoder-video"], preset)
    cfg, video_net = start_network(TRAINING_STAGES["decoder-video"], preset, (image_cfg, copy.deepcopy(image_net)))
    assert cfg.unet.temporal and temporal_parameter_names(video_net)
    assert cfg.frame_noise == preset.decoder.frame_noise and cfg.diffusion == image_cfg.diffusion
    x = torch.randn(2, 3, 4, 8, 8)
    t = torch.tensor([30, 800])
    kw = {"image_embeds": torch.randn(2, 32), "fps": torch.tensor([3.0, 12.0])}
    with torch.no_grad():
        frames = torch.cat([image_net(x[:, :, i : i + 1], t, **kw) for i in range(4)], dim=2)
        assert (video_net.eval()(x, t, **kw) - frames).abs().max() < 1e-5
        # ↑F starts from D^t with 4 input channels more (masked frames + mask), zero-initialised.
        interp_cfg, interp = start_network(TRAINING_STAGES["interpolation"], preset, (cfg, copy.deepcopy(video_net)))
        assert interp.cond_channels == 4 and interp_cfg.skip == preset.interpolation.skip
        assert interp_cfg.frame_noise == preset.interpolation.frame_noise and interp_cfg.unet == interp.cfg
        cond = {"cond_frames": torch.randn(2, 4, 4, 8, 8)}
        assert (interp.eval()(x, t, **kw, **cond) - video_net(x, t, **kw)).abs().max() < 1e-5


class _FakeClip(torch.nn.Module):
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :32]


def _frame_correlation(stage: str, stage_cfg, size: int) -> float:
    """Mean correlation between neighbouring frames of the noisy input x_t the network is given, for clips
    of zeros (so that x_t is the training noise, scaled)."""
    seen = []

    def network(x_t, t, **cond):
        seen.append(x_t)
        return torch.zeros_like(x_t, requires_grad=True)

    clips = Samples(pixels=torch.zeros(32, 3, 4, size, size), fps=torch.full((32,), 8.0))
    ctx = LossContext(stage_cfg=stage_cfg, train=TrainConfig(noise_aug_max=0), generator=torch.Generator().manual_seed(0),
                      clip=_FakeClip())
    TRAINING_STAGES[stage].loss(network, clips, ctx)
    a, b = seen[0][:, :, :-1].flatten(1), seen[0][:, :, 1:].flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())


@pytest.mark.parametrize("stage", ["decoder-video", "sr-low-video", "interpolation"])
def test_video_losses_train_on_noise_shared_across_frames_as_the_stage_config_says(tiny_config, stage):
    produced = TRAINING_STAGES[stage].produces
    size = 16 if produced == "sr_low" else 8
    for shared in (0.0, 0.7):
        cfg = getattr(_preset(tiny_config, shared), produced)
        assert abs(_frame_correlation(stage, cfg, size) - shared) < 0.08, (stage, shared)


def test_sample_clips_draws_a_clip_of_every_video_at_the_schedules_fps():
    videos = torch.arange(40).view(1, 1, 40, 1, 1).expand(3, 3, 40, 2, 2)
    cfg = TrainConfig(frames=4, fps_min=5, fps_max=10)
    clips, fps = sample_clips(videos, [40, 40, 20], [30.0, 30.0, 30.0], 0.5, cfg, torch.Generator().manual_seed(0))
    assert clips.shape == (3, 3, 4, 2, 2) and fps.dtype == torch.float32
    steps = clips[:, 0, :, 0, 0].diff(dim=1)
    assert bool((steps == (30.0 / fps)[:, None]).all())  # frames at the clip's fps from the 30 fps source
    assert clips[2].max() < 20  # only the valid frames of the shorter video
