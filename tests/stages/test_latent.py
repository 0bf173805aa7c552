"""Latent mode of D^t (stages.latent): a tiny diffusers AutoencoderKL built from config around a Latte (and a
U-Net) D^t. Shapes through sampling and training, the latents D^t's network sees, the frozen VAE, the
checkpoint round trip, ↑F starting from a latent D^t, and strict config and VAE errors."""

import dataclasses
import json
import os
from importlib import resources

import pytest
import torch

from stages import cascade, latent, training
from stages.checkpoint import load_stage, save_stage
from stages.config import CascadeConfig, ConfigError, DecoderConfig, from_dict, load_yaml

FRAMES, SIZE, DOWN = 4, 8, 2  # the tiny-latte preset's D^t: 4 keyframes of 8x8; the tiny VAE halves each side


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                         norm_num_groups=4, layers_per_block=1, sample_size=SIZE, scaling_factor=0.5)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_vae().save_pretrained(str(path))  # safetensors: diffusers' default
    return str(path)


@pytest.fixture(scope="module")
def preset(vae_dir) -> CascadeConfig:
    """The tiny-latte cascade with a latent D^t around the tiny VAE."""
    text = (resources.files("cluster") / "presets" / "tiny-latte.yaml").read_text()
    cfg = load_yaml(CascadeConfig, text)
    vae = latent.read_vae(vae_dir)
    decoder = dataclasses.replace(cfg.decoder, latent=latent.vae_latent_config(vae, vae_dir, encode="sample"),
                                  diffusion=dataclasses.replace(cfg.decoder.diffusion, clip_sample=False))
    return dataclasses.replace(cfg, decoder=decoder)


def record_inputs(net: torch.nn.Module) -> list[tuple[int, ...]]:
    """The shapes of x_t every forward pass of ``net`` is given, as they come."""
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    return seen


def test_old_configs_stay_in_pixel_space():
    text = (resources.files("cluster") / "presets" / "tiny-latte.yaml").read_text()
    decoder = load_yaml(CascadeConfig, text).decoder
    assert decoder.latent is None and decoder.channels == 3 and decoder.latent_size == decoder.size
    assert cascade.build_stage("decoder", decoder).channels == 3


def test_the_vae_reads_its_latent_space_from_its_config(preset, vae_dir):
    lat = preset.decoder.latent
    assert (lat.channels, lat.downsample, lat.scaling_factor, lat.shift_factor) == (4, DOWN, 0.5, 0.0)
    assert preset.decoder.latent_size == SIZE // DOWN and preset.decoder.channels == 4
    vae = latent.load_vae(lat)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_a_pipeline_folder_gives_its_vae(tmp_path):
    tiny_vae(latent_channels=2).save_pretrained(str(tmp_path / "pipeline" / "vae"))
    assert latent.read_vae(str(tmp_path / "pipeline")).config.latent_channels == 2


def test_sampling_diffuses_latents_and_decodes_them_frame_by_frame(preset):
    cfg = preset.decoder
    net = cascade.build_stage("decoder", cfg).eval()
    vae = latent.load_vae(cfg.latent)
    seen = record_inputs(net)
    y, fps = torch.randn(2, cfg.image_embed_dim, generator=torch.Generator().manual_seed(0)), torch.tensor([5.0, 8.0])
    with torch.no_grad():
        video = cascade.decode(net, cfg, y, fps, [3, 4], vae=vae)
        one = cascade.decode(net, cfg, y[1:], fps[1:], [4], vae=vae)
        small = cascade.decode(net, dataclasses.replace(cfg, latent=dataclasses.replace(cfg.latent, decode_batch=3)),
                               y, fps, [3, 4], vae=vae)
    assert seen and all(s[1:] == (4, FRAMES, SIZE // DOWN, SIZE // DOWN) for s in seen)  # latents, never frames
    assert video.shape == (2, 3, FRAMES, SIZE, SIZE) and video.abs().max() <= 1
    assert torch.allclose(video[1:], one, atol=1e-5)  # a sample does not depend on its batch
    assert torch.allclose(video, small, atol=1e-5)  # nor on the VAE's frames per pass
    with pytest.raises(ValueError, match="pass its VAE"):
        cascade.decode(net, cfg, y, fps, [3, 4])


def test_encoding_takes_the_posterior_mean_or_a_seeded_draw(preset):
    cfg = preset.decoder.latent
    vae = latent.load_vae(cfg)
    video = torch.rand(2, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def enc(mode, seed):
        return latent.encode(vae, video, dataclasses.replace(cfg, encode=mode), torch.Generator().manual_seed(seed))

    mean = enc("mean", 0)
    assert mean.shape == (2, 4, FRAMES, SIZE // DOWN, SIZE // DOWN)
    assert torch.equal(mean, enc("mean", 1))
    assert torch.equal(enc("sample", 5), enc("sample", 5)) and not torch.allclose(enc("sample", 5), mean)
    frames = video.permute(0, 2, 1, 3, 4).flatten(0, 1)  # the VAE's own result for every frame alone
    with torch.no_grad():
        own = vae.encode(frames).latent_dist.mean * cfg.scaling_factor
    assert torch.allclose(mean.permute(0, 2, 1, 3, 4).flatten(0, 1), own, atol=1e-5)
    assert latent.decode(vae, mean, cfg).shape == video.shape


@pytest.mark.parametrize("backbone", ["latte", "unet"])
def test_training_diffuses_latents_and_the_vae_never_trains(preset, backbone):
    """decoder (images) then decoder-video with still images beside the clips: the loss is on latents of
    the right shape, the network learns, the VAE's weights stay as they were."""
    if backbone == "unet":
        unet = {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 4,
                "attention_head_dim": 8, "cross_attention_dim": 16, "temporal_heads": 2}
        decoder = from_dict(DecoderConfig, {"backbone": "unet", "unet": unet}, base=preset.decoder)
        preset = dataclasses.replace(preset, decoder=decoder)
    vae = latent.load_vae(preset.decoder.latent)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    clip = cascade.build_stage("clip", preset.clip).eval()
    g = torch.Generator().manual_seed(0)
    init = None
    for name, f in (("decoder", 1), ("decoder-video", FRAMES)):
        stage = training.TRAINING_STAGES[name]
        cfg, net = init = training.start_network(stage, preset, init)
        assert cfg.latent == preset.decoder.latent and net.channels == 4
        seen = record_inputs(net)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        stills = torch.rand(4, 3, 1, SIZE, SIZE, generator=g) * 2 - 1 if f > 1 else None
        x = training.Samples(pixels=torch.rand(2, 3, f, SIZE, SIZE, generator=g) * 2 - 1,
                             fps=torch.full((2,), 8.0 if f > 1 else 0.0), stills=stills)
        ctx = training.LossContext(stage_cfg=cfg, train=training.TrainConfig(joint_images=2 if f > 1 else 0),
                                   generator=g, clip=clip, vae=vae)
        weights = {k: v.clone() for k, v in net.state_dict().items()}
        loss = stage.loss(net.train(), x, ctx)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert seen[0] == (2, 4, f, SIZE // DOWN, SIZE // DOWN)
        if stills is not None:
            assert seen[1] == (4, 4, 1, SIZE // DOWN, SIZE // DOWN)  # the stills: latents too, one frame each
        assert any(not torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in vae.parameters())
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    with pytest.raises(ValueError, match="needs the VAE"):
        stage.loss(net, x, dataclasses.replace(ctx, vae=None))


def test_interpolation_from_a_latent_decoder_starts_afresh_on_frames(preset):
    cfg, net = training.start_network(training.TRAINING_STAGES["decoder"], preset)
    icfg, inet = training.start_network(training.TRAINING_STAGES["interpolation"], preset, (cfg, net))
    assert inet.channels == 3 and inet.cond_channels == 4 and icfg.image_embed_dim == cfg.image_embed_dim
    x = torch.randn(1, 3, 5, SIZE, SIZE)
    cond = {"cond_frames": torch.randn(1, 4, 5, SIZE, SIZE), "image_embeds": torch.randn(1, cfg.image_embed_dim),
            "fps": torch.tensor([5.0])}
    assert inet(x, torch.tensor([10]), **cond).shape == x.shape


def test_checkpoint_keeps_the_vae_in_diffusers_layout(preset, tmp_path):
    cfg = preset.decoder
    net = cascade.build_stage("decoder", cfg).eval()
    vae = latent.load_vae(cfg.latent)
    directory = save_stage(str(tmp_path / "b"), "decoder", cfg, net, vae=vae)
    files = sorted(os.listdir(os.path.join(directory, "vae")))
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads(open(os.path.join(directory, "vae", "config.json")).read())["_class_name"] == "AutoencoderKL"
    assert "vae: vae" in open(os.path.join(directory, "config.yaml")).read()
    loaded_cfg, loaded = load_stage(str(tmp_path / "b"), "decoder")
    assert loaded_cfg.latent == dataclasses.replace(cfg.latent, vae=os.path.join(directory, "vae"))
    loaded_vae = latent.load_vae(loaded_cfg.latent)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in loaded_vae.state_dict().items())
    y = torch.randn(1, cfg.image_embed_dim)
    with torch.no_grad():
        a = cascade.decode(net, cfg, y, torch.tensor([5.0]), [9], vae=vae)
        b = cascade.decode(loaded, loaded_cfg, y, torch.tensor([5.0]), [9], vae=loaded_vae)
    assert torch.equal(a, b)
    # Saved again without the module (mav recipe's copies): the VAE is read from where the config says.
    again = save_stage(str(tmp_path / "c"), "decoder", loaded_cfg, loaded)
    assert open(os.path.join(again, "vae", "diffusion_pytorch_model.safetensors"), "rb").read() == \
        open(os.path.join(directory, "vae", "diffusion_pytorch_model.safetensors"), "rb").read()
    with pytest.raises(ValueError, match="not in latent mode"):
        save_stage(str(tmp_path / "d"), "decoder", dataclasses.replace(cfg, latent=None,
                   diffusion=cfg.diffusion), net, vae=vae)


@pytest.mark.parametrize("latent_cfg, extra, message", [
    ({"vae": ""}, {}, "vae must name the VAE's folder"),
    ({}, {}, "vae must name the VAE's folder"),
    ({"vae": "v", "downsample": 3}, {}, "downsample must be a power of 2"),
    ({"vae": "v", "downsample": 16}, {}, "latent.downsample=16 must divide the size 8"),
    ({"vae": "v", "downsample": 4}, {"latte": {"patch_size": 4}}, "patch_size=4 must divide the latent size 2"),
    ({"vae": "v", "channels": 0}, {}, "channels must be >= 1"),
    ({"vae": "v", "scaling_factor": 0}, {}, "scaling_factor must be > 0"),
    ({"vae": "v", "encode": "median"}, {}, "encode must be one of sample, mean"),
    ({"vae": "v", "bogus": 1}, {}, "unknown config key 'decoder.latent.bogus'"),
    ({"vae": "v", "downsample": 2}, {"diffusion": {"clip_sample": True}}, "set diffusion.clip_sample to false"),
])
def test_bad_latent_configs_are_refused(latent_cfg, extra, message):
    data = {"size": SIZE, "backbone": "latte", "latte": {"patch_size": 2}, "diffusion": {"clip_sample": False},
            "latent": latent_cfg, **extra}
    with pytest.raises(ConfigError, match=message):
        from_dict(DecoderConfig, data, "decoder")


def test_vae_folders_that_cannot_be_used_are_refused(preset, vae_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(open(os.path.join(vae_dir, "config.json")).read())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(latent.VaeError, match=r"pickled weights only .*\.save_pretrained\(OUT, safe_serialization=True\)"):
        latent.read_vae(str(pickled))
    with pytest.raises(latent.VaeError, match="no config.json"):
        latent.read_vae(str(tmp_path / "nowhere"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(latent.VaeError, match="describes a UNet2DModel, not an AutoencoderKL"):
        latent.read_vae(str(other))
    with pytest.raises(latent.VaeError, match="has 4 latent channels, but the config says latent.channels=8"):
        latent.load_vae(dataclasses.replace(preset.decoder.latent, channels=8))
