"""The training recipe's pure-PyTorch parts: inflation at identity, fps schedule, clips, masks, EMA, state."""

import copy

import pytest
import torch

from stages.config import UNetConfig
from stages.training import (
    EMA,
    TrainConfig,
    freeze_all_but_temporal,
    inflate_network,
    interpolation_mask,
    optimizer_from_tensors,
    optimizer_to_tensors,
    sample_clip,
    sample_fps,
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


@pytest.mark.parametrize("fps", [False, True], ids=["plain", "temporal-fps"])
def test_inflated_image_network_equals_it_frame_by_frame(fps):
    image_net = _net()
    video_net = inflate_network(copy.deepcopy(image_net), kernel=3, heads=2, fps=fps).eval()
    assert video_net.cfg.temporal and video_net.cfg.temporal_fps == fps
    assert any(".temporal_fps." in n for n, _ in video_net.named_parameters()) == fps
    x = torch.randn(2, 3, 5, 16, 16)
    kw = {"image_embeds": torch.randn(2, 12), "fps": torch.tensor([4.0, 20.0])}
    t = torch.tensor([10, 900])
    with torch.no_grad():
        video = video_net(x, t, **kw)
        frames = torch.cat([image_net(x[:, :, i : i + 1], t, **kw) for i in range(5)], dim=2)
    assert (video - frames).abs().max() < 1e-5


def test_inflation_with_fps_needs_an_fps_conditioned_network():
    with pytest.raises(ValueError, match="conditioned on fps"):
        inflate_network(VideoUNet(CFG2D), kernel=3, heads=2, fps=True)


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
