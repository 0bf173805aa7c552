"""LatteVideo (stages.latte): shapes of every variant and patch embedding, the image model at f = 1, the
identities at initialisation (adaLN-Zero, image → video, ↑F's widened input), determinism, checkpoints and
config errors."""

import copy
import dataclasses
from importlib import resources

import pytest
import torch

from stages import cascade, latte, training
from stages.checkpoint import load_stage, save_stage
from stages.config import CascadeConfig, ConfigError, DecoderConfig, InterpolationConfig, LatteConfig, load_yaml
from stages.latte import LatteVideo
from stages.temporal import temporal_parameter_names

VARIANTS = (1, 2, 3, 4)
EMBEDDINGS = ("patch", "tubelet")


def tiny(**kw) -> LatteConfig:
    base = dict(width=16, depth=2, heads=4, patch_size=2, tubelet=2)
    return LatteConfig(**{**base, **kw})


def build(cfg: LatteConfig, seed: int = 0, **kw) -> LatteVideo:
    torch.manual_seed(seed)
    kw = {"image_embed_dim": 8, "context_tokens": 2, "fps_cond": True, **kw}
    return LatteVideo(cfg, **kw).eval()


def randomise(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every parameter drawn afresh: no gate, output layer or modulation left at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def inputs(b: int, f: int, size: int = 4, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, f, size, size, generator=g)
    cond = {"image_embeds": torch.randn(b, 8, generator=g), "fps": torch.full((b,), 8.0)}
    return x, cond


@pytest.mark.parametrize("embedding", EMBEDDINGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_and_patch_embedding_maps_a_video_to_its_shape(variant, embedding):
    net = randomise(build(tiny(variant=variant, patch_embedding=embedding, depth=1)))
    with torch.no_grad():
        for f in (1, 16, 76):
            x, cond = inputs(1, f)
            out = net(x, torch.tensor([500]), **cond)
            assert out.shape == x.shape
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("position", ("sincos", "rope"))
@pytest.mark.parametrize("conditioning", ("adaln", "tokens"))
def test_condition_injections_and_temporal_positions_give_the_shape(conditioning, position):
    net = randomise(build(tiny(conditioning=conditioning, temporal_position=position)))
    x, cond = inputs(2, 16)
    with torch.no_grad():
        assert net(x, torch.tensor([10, 900]), **cond).shape == x.shape


def _image_model_of(video: LatteVideo) -> LatteVideo:
    """The same network without its temporal parts, its other weights copied."""
    image = build(dataclasses.replace(video.cfg, temporal=False))
    image.load_state_dict({k: v for k, v in video.state_dict().items() if k not in temporal_parameter_names(video)})
    return image


@pytest.mark.parametrize("embedding", EMBEDDINGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_frame_gives_the_image_model_exactly(variant, embedding):
    conditioning = "tokens" if variant % 2 else "adaln"
    video = randomise(build(tiny(variant=variant, patch_embedding=embedding, conditioning=conditioning)))
    assert temporal_parameter_names(video)  # randomised: the temporal parts are far from the identity
    image = _image_model_of(video)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        x, cond = inputs(2, 1)
        assert torch.equal(video(x, t, **cond), image(x, t, **cond))
        x, cond = inputs(2, 4)  # on a video the temporal parts do act
        assert not torch.allclose(video(x, t, **cond), image(x, t, **cond), atol=1e-4)


def test_adaln_zero_starts_every_block_as_the_identity():
    net = build(tiny(variant=1))
    seen = []
    for block in (*net.blocks, *net.temporal_blocks):
        block.register_forward_hook(lambda m, args, out: seen.append(torch.equal(args[0], out)))
    x, cond = inputs(2, 4)
    with torch.no_grad():
        out = net(x, torch.tensor([5, 500]), **cond)
    assert seen == [True] * 4
    assert torch.equal(out, torch.zeros_like(out))  # the final layer starts at zero too (DiT)


@pytest.mark.parametrize("variant, embedding, conditioning, position", [
    (1, "patch", "adaln", "sincos"), (1, "tubelet", "tokens", "rope"), (2, "patch", "tokens", "sincos"),
    (2, "tubelet", "adaln", "rope"), (3, "patch", "adaln", "rope"), (3, "tubelet", "tokens", "sincos"),
    (4, "patch", "tokens", "rope"), (4, "tubelet", "adaln", "sincos"),
])
def test_image_to_video_inflation_preserves_the_function(variant, embedding, conditioning, position):
    cfg = tiny(variant=variant, patch_embedding=embedding, conditioning=conditioning, temporal_position=position,
               temporal=False)
    image = randomise(build(cfg))
    video = latte.inflate(copy.deepcopy(image))
    assert video.cfg.temporal and temporal_parameter_names(video)
    x, cond = inputs(2, 8)
    with torch.no_grad():
        assert torch.allclose(video(x, torch.tensor([40, 600]), **cond), image(x, torch.tensor([40, 600]), **cond),
                              atol=1e-6)
    with pytest.raises(ValueError):
        latte.inflate(video)


def test_image_model_computes_every_frame_apart():
    image = randomise(build(tiny(variant=1, temporal=False)))
    x, cond = inputs(1, 3)
    with torch.no_grad():
        whole = image(x, torch.tensor([200]), **cond)
        for i in range(3):
            one = image(x[:, :, i : i + 1], torch.tensor([200]), **cond)
            assert torch.allclose(whole[:, :, i : i + 1], one, atol=1e-6)


@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_widened_input_starts_as_the_decoder(embedding):
    decoder = randomise(build(tiny(variant=3, patch_embedding=embedding)))
    wide = latte.widen_input(decoder, 4)
    assert wide.cond_channels == 4 and decoder.cond_channels == 0
    x, cond = inputs(1, 4)
    frames = torch.randn(1, 4, 4, 4, 4)
    with torch.no_grad():
        assert torch.allclose(wide(x, torch.tensor([100]), cond_frames=frames, **cond),
                              decoder(x, torch.tensor([100]), **cond), atol=1e-6)


def test_a_sample_does_not_depend_on_its_batch_and_weights_on_the_seed():
    a, b = build(tiny(), seed=3), build(tiny(), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    net = randomise(a)
    x, cond = inputs(3, 4)
    with torch.no_grad():
        together = net(x, torch.tensor([1, 2, 3]), **cond)
        alone = net(x[1:2], torch.tensor([2]), image_embeds=cond["image_embeds"][1:2], fps=cond["fps"][1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    net = randomise(build(tiny(variant=2))).train()
    x, cond = inputs(1, 4)

    def grads():
        net.zero_grad()
        net(x, torch.tensor([50]), **cond).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    net.enable_gradient_checkpointing()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(plain, grads()))


def _latte_preset() -> CascadeConfig:
    with open(resources.files("cluster") / "presets" / "tiny-latte.yaml") as f:
        return load_yaml(CascadeConfig, f.read())


def test_checkpoint_round_trip_and_per_sample_determinism(tmp_path):
    preset = _latte_preset()
    cfg = preset.decoder
    net = randomise(cascade.build_stage("decoder", cfg))
    assert isinstance(net, LatteVideo)
    save_stage(str(tmp_path), "decoder", cfg, net)
    loaded_cfg, loaded = load_stage(str(tmp_path), "decoder")
    assert loaded_cfg == cfg
    assert training.probe("decoder", loaded) == training.probe("decoder", net)
    y = torch.nn.functional.normalize(torch.randn(2, cfg.image_embed_dim), dim=-1)
    with torch.no_grad():
        both = cascade.decode(loaded, cfg, y, torch.tensor([8.0, 8.0]), [11, 12])
        second = cascade.decode(loaded, cfg, y[1:], torch.tensor([8.0]), [12])
    assert both.shape == (2, 3, cfg.frames, cfg.size, cfg.size)
    assert torch.allclose(both[1:], second, atol=1e-5)


def test_training_stages_inflate_the_image_latte_and_widen_the_video_one(tmp_path):
    preset = _latte_preset()
    stage_cfg, image = training.start_network(training.TRAINING_STAGES["decoder"], preset)
    assert stage_cfg.backbone == "latte" and not stage_cfg.latte.temporal and not image.temporal_blocks
    randomise(image)
    x, cond = inputs(1, 4, size=8)
    cond["image_embeds"] = torch.randn(1, 32)
    with torch.no_grad():
        before = image(x, torch.tensor([300]), **cond)
    video_cfg, video = training.start_network(training.TRAINING_STAGES["decoder-video"], preset, (stage_cfg, image))
    assert video_cfg.latte.temporal and video_cfg.backbone == "latte"
    with torch.no_grad():
        assert torch.allclose(video(x, torch.tensor([300]), **cond), before, atol=1e-6)
    interp_cfg, interp = training.start_network(training.TRAINING_STAGES["interpolation"], preset, (video_cfg, video))
    assert isinstance(interp_cfg, InterpolationConfig) and interp_cfg.backbone == "latte"
    assert interp.cond_channels == 4 and interp_cfg.latte == video_cfg.latte
    with torch.no_grad():
        assert torch.allclose(interp(x, torch.tensor([300]), cond_frames=torch.randn(1, 4, 4, 8, 8), **cond), before,
                              atol=1e-6)
    save_stage(str(tmp_path), "interpolation", interp_cfg, interp)  # ↑F's bundle builds what training built
    assert training.probe("interpolation", load_stage(str(tmp_path), "interpolation")[1]) == \
        training.probe("interpolation", interp)


def test_unet_stays_the_default_backbone():
    assert DecoderConfig().backbone == InterpolationConfig().backbone == "unet"
    assert load_yaml(DecoderConfig, "frames: 16").backbone == "unet"  # a bundle from before the choice


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=30, heads=4), "heads=4 must divide width=30"),
    (dict(variant=5), "variant"),
    (dict(variant=4, heads=3, width=36), "heads=3 must be even"),
    (dict(patch_embedding="cube"), "patch_embedding"),
    (dict(conditioning="film"), "conditioning"),
    (dict(temporal_position="learned"), "temporal_position"),
])
def test_bad_latte_configs_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LatteConfig(**kwargs)


def test_sizes_and_frame_counts_must_cut_into_patches_and_tubelets():
    tubelet = LatteConfig(patch_embedding="tubelet", tubelet=4)
    with pytest.raises(ConfigError, match="tubelet=4 must divide the frame count 6"):
        DecoderConfig(frames=6, backbone="latte", latte=tubelet)
    with pytest.raises(ConfigError, match="patch_size=3 must divide the size 64"):
        DecoderConfig(backbone="latte", latte=LatteConfig(patch_size=3))
    with pytest.raises(ConfigError, match="backbone must be one of unet, latte"):
        DecoderConfig(backbone="dit")
    # ↑F's frame count is the decoder's keyframes interpolated: (16 - 1) · 5 + 1 = 76
    with pytest.raises(ConfigError, match="interpolation: latte.tubelet=3 must divide the frame count 76"):
        CascadeConfig(interpolation=InterpolationConfig(backbone="latte", latte=LatteConfig(
            patch_embedding="tubelet", tubelet=3)))
    CascadeConfig(interpolation=InterpolationConfig(backbone="latte", latte=tubelet))  # 76 = 4 · 19
    with pytest.raises(ConfigError, match="unknown config key 'decoder.latte.layers'"):
        load_yaml(CascadeConfig, "decoder: {backbone: latte, latte: {layers: 3}}")


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-latte"])
def test_joint_training_keeps_the_still_images_out_of_temporal_layers(preset_name):
    with open(resources.files("cluster") / "presets" / f"{preset_name}.yaml") as f:
        preset = load_yaml(CascadeConfig, f.read())
    image_cfg, image = training.start_network(training.TRAINING_STAGES["decoder"], preset)
    stage = training.TRAINING_STAGES["decoder-video"]
    cfg, net = training.start_network(stage, preset, (image_cfg, image))
    clip = cascade.build_stage("clip", preset.clip).eval()
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 4, 8, 8, generator=g) * 2 - 1
    frames_seen = []
    for name, module in net.named_modules():
        if name.startswith("temporal_blocks.") and name.count(".") == 1:
            module.register_forward_pre_hook(lambda m, args: frames_seen.append(args[0].shape[1]))

    def gradients(stills: torch.Tensor) -> dict[str, torch.Tensor]:
        ctx = training.LossContext(stage_cfg=cfg, train=training.TrainConfig(joint_images=3), clip=clip,
                                   generator=torch.Generator().manual_seed(1))
        net.zero_grad()
        stage.loss(net, training.Samples(pixels=video, fps=torch.tensor([4.0, 8.0]), stills=stills), ctx).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    a = gradients(torch.rand(6, 3, 1, 8, 8, generator=g) * 2 - 1)
    b = gradients(torch.rand(6, 3, 1, 8, 8, generator=g) * 2 - 1)
    temporal = temporal_parameter_names(net)
    assert temporal and all(torch.equal(a[n], b[n]) for n in temporal if n in a)
    assert any(not torch.equal(a[n], b[n]) for n in a if n not in temporal)  # the spatial layers learn from them
    if preset_name == "tiny-latte":  # every temporal block saw the clips' four frames, never an image
        assert frames_seen and set(frames_seen) == {4}


def test_bfloat16_autocast_runs_every_variant_close_to_float32():
    x, cond = inputs(1, 4)
    for variant in VARIANTS:
        net = randomise(build(tiny(variant=variant, temporal_position="rope" if variant % 2 else "sincos")))
        with torch.no_grad():
            full = net(x, torch.tensor([300]), **cond)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = net(x, torch.tensor([300]), **cond)
        assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), full, atol=0.1, rtol=0.05)
