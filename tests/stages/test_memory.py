"""Memory estimates from a stage's config against measured peaks; overlapping frame windows for SR_l^t."""

import pytest
import torch

from stages import cascade
from stages.config import SRLowConfig, UNetConfig
from stages.memory import (FrameWindows, MemoryBudgetError, check_fits, estimate_bytes, largest_fitting,
                           parameter_count, unet_activation_bytes)
from stages.unet import VideoUNet

UNET = UNetConfig(block_out_channels=(8, 16), attention=(False, True), attention_head_dim=8, norm_num_groups=4,
                  cross_attention_dim=None, temporal_heads=2)


def _measured_activation_peak(net: VideoUNet, x: torch.Tensor, training: bool) -> int:
    """Peak bytes of the tensors one pass (with its backward when ``training``) allocates, parameters aside."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(net)
    t = torch.ones(len(x), dtype=torch.long)
    kwargs = {"cond_frames": torch.randn_like(x), "noise_level": t.float()}
    with tracker:
        if training:
            net(x, t, **kwargs).sum().backward()
        else:
            with torch.inference_mode():
                net(x, t, **kwargs)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return peak["Total"] - sum(v for k, v in peak.items() if k != "Total" and k.name == "PARAM")


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_estimate_is_within_a_factor_of_two_of_the_measured_peak(training):
    torch.manual_seed(0)
    net = VideoUNet(UNET, cond_channels=3, noise_level_cond=True)
    x = torch.randn(2, 3, 4, 16, 16)
    measured = _measured_activation_peak(net, x, training)
    estimate = unet_activation_bytes(UNET, frames=2 * 4, size=16, training=training)
    assert measured / 2 <= estimate <= measured * 2, (estimate, measured)


def test_estimate_grows_with_the_batch_and_shrinks_in_bf16():
    params = parameter_count(lambda: VideoUNet(UNET, cond_channels=3, noise_level_cond=True))
    assert params == sum(p.numel() for p in VideoUNet(UNET, cond_channels=3, noise_level_cond=True).parameters())
    one = estimate_bytes(params, UNET, frames=16, size=64)
    assert estimate_bytes(params, UNET, frames=32, size=64) > 1.9 * one - params * 4
    assert estimate_bytes(params, UNET, frames=16, size=64, dtype=torch.bfloat16) < one
    assert estimate_bytes(params, UNET, frames=16, size=64, training=True) > 5 * one


def test_a_batch_that_cannot_fit_is_refused_before_it_starts_with_what_to_do():
    with pytest.raises(MemoryBudgetError, match=r"sr_low: 2 videos needs about 4\.0 GiB and cpu has 1\.0 GiB free: "
                                                 r"lower its batch"):
        check_fits("sr_low: 2 videos", 4 * 2**30, "cpu", "lower its batch size", free=2**30)
    check_fits("sr_low: 2 videos", 2**29, "cpu", "lower its batch size", free=2**30)
    assert largest_fitting(lambda n: 10 * n, 100, 255) == 25
    assert largest_fitting(lambda n: 10 * n, 100, 5) == 0
    assert largest_fitting(lambda n: 10 * n, 8, 10**6) == 8


def test_frame_windows_cover_every_frame_and_overlap():
    windows = FrameWindows(torch.nn.Identity(), window=8, overlap=3)
    assert windows.starts(8) == [0] and windows.starts(5) == [0]
    starts = windows.starts(19)
    assert starts == [0, 5, 10, 11]
    assert all(b - a <= 8 - 3 for a, b in zip(starts, starts[1:]))


def _sr_low(perturb_temporal: bool) -> tuple[VideoUNet, SRLowConfig]:
    cfg = SRLowConfig(in_size=8, out_size=16, unet=UNetConfig(block_out_channels=(8, 16), attention=(False, False),
                                                              norm_num_groups=4, cross_attention_dim=None))
    net = cascade.build_stage("sr_low", cfg).eval()
    if perturb_temporal:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if ".temporal_conv." in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net, cfg


def test_windowed_sr_low_equals_the_whole_video_for_frame_local_networks():
    """With temporal layers at identity (a frame-local network) overlapping windows give SR_l^t's output for
    the whole video within round-off; trained temporal convs see fewer neighbours in a window than in the
    whole video, so there the windows are an approximation (not equal)."""
    video = torch.rand(1, 3, 13, 8, 8) * 2 - 1
    for perturbed in (False, True):
        net, cfg = _sr_low(perturbed)
        with torch.inference_mode():
            whole = cascade.super_resolve_video(net, cfg, video, [4], steps=2)
            windowed = cascade.super_resolve_video(FrameWindows(net, window=6, overlap=2), cfg, video, [4], steps=2)
            same = cascade.super_resolve_video(FrameWindows(net, window=13, overlap=2), cfg, video, [4], steps=2)
        assert torch.equal(same, whole)  # one window holding every frame is the plain pass
        err = (windowed - whole).abs().max()
        assert err > 1e-3 if perturbed else err < 1e-5, (perturbed, err)
