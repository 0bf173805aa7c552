"""A latent Latte D^t (stages.latent) through the commands: `mav train decoder --vae` on Ray Train puts the
frozen VAE into the bundle; `mav generate` with such a bundle writes 76 frames; a preset
names its VAE by a path relative to itself."""

import math
import os
from importlib import resources

import pytest
import torch
import yaml

from stages import latent
from stages.checkpoint import load_stage
from stages.config import ConfigError
from stages.training import TrainConfig, probe
from workflows.cli import main
from workflows.presets import load_preset
from workflows.train import TrainJob, run_training

pytestmark = pytest.mark.timeout(600)

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    """A tiny AutoencoderKL built from config (8 and 16 channels: 2x downsampling, 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=8, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("presets") / "tiny-vae"
    vae.save_pretrained(str(path))
    return str(path)


def latent_preset(vae_dir: str, name: str, **sections) -> str:
    """The tiny-latte preset with D^t in the tiny VAE's latents (``latent.vae`` relative to the preset file,
    which is written beside the VAE's folder); ``sections``: fields of each stage changed."""
    data = yaml.safe_load((resources.files("cluster") / "presets" / "tiny-latte.yaml").read_text())
    data["decoder"].update(latent={"vae": os.path.basename(vae_dir), "channels": 4, "downsample": 2,
                                   "scaling_factor": 0.5}, diffusion={"steps": 2, "clip_sample": False})
    for stage, fields in sections.items():
        data[stage] = {**data[stage], **fields}
    path = os.path.join(os.path.dirname(vae_dir), name)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def test_mav_generate_with_a_latent_latte_bundle_writes_76_frames(vae_dir, tmp_path):
    """16 latent keyframes decoded by the VAE, then ↑F (skip 5) and SR on frames, as in pixel mode."""
    from stages.cascade import build_stage
    from stages.checkpoint import save_bundle
    from stages.config import STAGE_NAMES
    from workflows.video import decode_mp4

    preset = latent_preset(vae_dir, "latent-76.yaml", decoder={"frames": 16}, interpolation={"skip": 5},
                           sr_low={"out_size": 12}, sr_high={"in_size": 12, "out_size": 16})  # SR small: not tested here
    cfg = load_preset(preset)
    assert cfg.decoder.latent.vae == vae_dir  # relative to the preset file
    bundle = str(tmp_path / "bundle")
    save_bundle(bundle, cfg, {name: build_stage(name, getattr(cfg, name)) for name in STAGE_NAMES})
    assert sorted(os.listdir(os.path.join(bundle, "decoder", "vae"))) == ["config.json",
                                                                          "diffusion_pytorch_model.safetensors"]
    assert main(["generate", PROMPT, "--checkpoint", bundle, "--seed", "3", "--steps", "1",
                 "--out", str(tmp_path / "v.mp4")]) == 0
    frames, _ = decode_mp4((tmp_path / "v.mp4").read_bytes())
    assert frames.shape == (76, 16, 16, 3)


def test_mav_train_puts_the_frozen_vae_into_the_bundle(ray_session, vae_dir, tmp_path):
    """mav train decoder --vae on one worker (decoder-video's latent loss, joint images included, is
    tests/stages/test_latent.py's)."""
    from stages.cascade import build_stage
    from stages.checkpoint import save_stage
    from workflows.shapes.data import synth

    preset = str(resources.files("cluster") / "presets" / "tiny-latte.yaml")
    data = str(tmp_path / "data")
    synth(data, images=8, videos=2, size=16, frames=12, seed=1)
    clip = str(tmp_path / "clip")  # fresh CLIP weights: the decoder's loss only reads y_e through it
    save_stage(clip, "clip", load_preset(preset).clip, build_stage("clip", load_preset(preset).clip))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"batch_size": 2, "max_steps": 2, "log_every": 2, "checkpoint_every": 2,
                                      "frames": 4}))
    out = str(tmp_path / "model")
    common = ["--data", data, "--output", out, "--preset", preset, "--clip", clip, "--config", str(config)]
    assert main(["train", "decoder", *common, "--vae", vae_dir]) == 0
    cfg, net = load_stage(out, "decoder")
    assert cfg.latent.vae == os.path.join(out, "decoder", "vae") and net.channels == 4 and not cfg.latte.temporal
    vae = latent.load_vae(cfg.latent)
    source = latent.read_vae(vae_dir)
    assert all(torch.equal(source.state_dict()[k], v) for k, v in vae.state_dict().items())  # never trained
    assert all(math.isfinite(v) for v in probe("decoder", net))
    # --vae is the decoder's alone, and a VAE folder it cannot read, or whose latents the preset's D^t cannot
    # cut into patches, stops the job before it starts.
    assert main(["train", "decoder-video", *common, "--init", out, "--output", str(tmp_path / "m2"),
                 "--vae", vae_dir]) == 2
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(open(os.path.join(vae_dir, "config.json")).read())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02")
    assert main(["train", "decoder", *common, "--output", str(tmp_path / "m3"), "--vae", str(pickled)]) == 2
    big = tmp_path / "big-patches.yaml"
    big.write_text(open(preset).read().replace("patch_size: 2", "patch_size: 8"))
    job = TrainJob(stage="decoder", data=(data,), output=str(tmp_path / "m4"), config=TrainConfig(), preset=str(big),
                   clip=clip, vae=vae_dir)
    with pytest.raises(ConfigError, match="latte.patch_size=8 must divide the latent size 4"):
        run_training(job)
