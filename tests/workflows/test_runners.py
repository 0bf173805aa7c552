"""The runners' arithmetic (bf16 autocast, fp32 latents) and their memory planning (SR_l^t frame windows,
SR_h frames per pass, a batch that cannot fit refused before it runs)."""

import numpy as np
import pytest
import torch

from stages import memory
from stages.errors import UserError
from workflows import runners
from workflows.runners import RUNNER_OF, compute_in, network_dtype


def test_dtype_names_and_the_auto_choice():
    assert network_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert network_dtype("auto", torch.device("cpu")) == torch.float32
    assert network_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError, match="dtype must be one of auto, fp32, bf16, got 'fp16'"):
        network_dtype("fp16", torch.device("cpu"))


def test_bf16_runs_the_network_under_autocast_and_hands_back_float32(tiny_preset_file, tiny_config):
    """In bf16 the network computes in bfloat16 and its output is float32 again, so the latents and the
    scheduler stay float32; the frames it makes are those of fp32 up to bf16 round-off."""
    rng = np.random.default_rng(0)
    cfg = tiny_config.sr_low
    video = rng.integers(0, 256, (1, 3, tiny_config.decoder.frames, cfg.in_size, cfg.in_size), dtype=np.uint8)
    batch = {"seed": np.array([3]), "steps": np.array([2]), "video": video}
    fp32 = RUNNER_OF["sr_low"](preset=tiny_preset_file, device="cpu")
    bf16 = RUNNER_OF["sr_low"](preset=tiny_preset_file, device="cpu", dtype="bf16")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    x = torch.randn(1, 3, 2, cfg.out_size, cfg.out_size)
    kwargs = {"cond_frames": torch.randn_like(x), "noise_level": torch.tensor([10.0])}
    seen = []
    hook = bf16.net.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.inference_mode():
        out = bf16.net(x, torch.tensor([5]), **kwargs)
        ref = fp32.net(x, torch.tensor([5]), **kwargs)
    hook.remove()
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert next(bf16.net.parameters()).dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    a, b = fp32(batch)["video"].astype(int), bf16(batch)["video"].astype(int)
    assert np.abs(a - b).mean() < 3
    assert compute_in(fp32.net, torch.float32) is fp32.net


def test_sr_low_runs_in_frame_windows_and_sr_h_in_smaller_passes_where_memory_is_short(
        tiny_preset_file, tiny_config, monkeypatch):
    sr_low = RUNNER_OF["sr_low"](preset=tiny_preset_file, device="cpu")
    sr_high = RUNNER_OF["sr_high"](preset=tiny_preset_file, device="cpu")
    frames, size = 19, tiny_config.sr_low.out_size
    net, _ = sr_low.fitted(1, 3, frames)
    assert net is sr_low.net  # the host has room for the whole video: unchanged
    free = sr_low.memory_needed(12, size) / runners.HEADROOM  # room for 12 of the 19 frames
    monkeypatch.setattr(runners, "free_bytes", lambda device: free)
    net, _ = sr_low.fitted(1, 3, frames)
    assert isinstance(net, memory.FrameWindows) and net.window == 12 and net.overlap == min(memory.WINDOW_OVERLAP, 6)
    assert sr_low.memory_needed(net.window, size) <= free * runners.HEADROOM
    video = np.random.default_rng(0).integers(0, 256, (1, 3, frames, 8, 8), dtype=np.uint8)
    out = sr_low({"seed": np.array([1]), "steps": np.array([1]), "video": video})["video"]
    assert out.shape == (1, 3, frames, size, size)

    out_size, per_pass = tiny_config.sr_high.out_size, tiny_config.sr_high.frame_batch
    monkeypatch.setattr(runners, "free_bytes", lambda device: sr_high.memory_needed(per_pass - 1, out_size) / 0.9)
    assert sr_high.fitted(1, 3, frames)[1].frame_batch == per_pass - 1

    monkeypatch.setattr(runners, "free_bytes", lambda device: 1024)
    with pytest.raises(memory.MemoryBudgetError, match=r"sr_high: .* needs about .* GiB and cpu has 0\.0 GiB free: "
                                                        r"lower its batch size"):
        sr_high.fitted(1, 3, frames)
    decoder = RUNNER_OF["decoder"](preset=tiny_preset_file, device="cpu")
    rows = {"seed": np.array([1]), "steps": np.array([1]), "guidance": np.array([np.nan], dtype=np.float32),
            "fps": np.array([5]), "image_embeds": np.zeros((1, tiny_config.decoder.image_embed_dim), np.float32)}
    with pytest.raises(memory.MemoryBudgetError, match="decoder: a batch of 1 videos of 4 frames at 8x8 needs"):
        decoder(rows)
