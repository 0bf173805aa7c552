"""``mav import unclip``: a diffusers unCLIP pipeline, built and saved by diffusers and transformers
themselves, imported into a bundle that computes what diffusers' UnCLIPPipeline computes; then run,
stored, trained as any bundle; bad sources refused in one line with nothing written."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from stages.checkpoint import load_stage  # noqa: E402
from stages.config import STAGE_NAMES  # noqa: E402
from unclip_source import PROMPT, save_source  # noqa: E402
from workflows.cli import main  # noqa: E402
from workflows.importers.unclip import import_unclip, verify  # noqa: E402
from workflows.video import decode_mp4  # noqa: E402


@pytest.fixture(scope="module")
def small_source(tmp_path_factory) -> str:
    """An 8² decoder and 32² upsamplers: the shape of Karlo's pipeline at a size every command runs in seconds."""
    return save_source(tmp_path_factory.mktemp("unclip") / "small", decoder_size=8, sr_size=32)


@pytest.fixture(scope="module")
def image_encoder(tmp_path_factory) -> str:
    """A tiny CLIP image tower beside the text encoder (projection 32), saved by transformers."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(3)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, projection_dim=32, intermediate_size=37,
                                                           num_attention_heads=4, num_hidden_layers=1, image_size=16,
                                                           patch_size=8))
    path = tmp_path_factory.mktemp("unclip") / "vision"
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def small_bundle(small_source, image_encoder, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("unclip") / "bundle")
    import_unclip(small_source, out, preset="tiny", image_encoder=image_encoder)
    return out


def test_imported_cascade_computes_what_diffusers_unclip_pipeline_computes(tmp_path, capsys):
    """Karlo's sizes (64² decoder, 256² upsamplers): diffusers' UnCLIPPipeline and the imported bundle in
    image mode, the same prompt, initial noise and step noise, in float64: P's y_e, the 64² image and the
    256² image agree to round-off (measured at 3 steps: 4e-15, 6e-14, 5e-11; the upsampler's first step
    multiplies the decoder's round-off by 1/√ᾱ_999). The pipeline's own returned image (float32) agrees to 3e-8."""
    src = save_source(tmp_path / "karlo-like", decoder_size=64, sr_size=256)
    out = str(tmp_path / "bundle")
    import_unclip(src, out, preset="tiny")
    diffs = verify(src, out, prompt=PROMPT, steps=2)
    print("largest absolute differences:", diffs)
    assert diffs["image_embeds"] < 1e-12
    assert diffs["decoder"] < 1e-10
    assert diffs["sr"] < 1e-8
    assert diffs["output"] < 1e-6


def test_mav_import_writes_every_stage_and_its_verify_passes(small_source, tmp_path, capsys):
    out = str(tmp_path / "bundle")
    assert main(["import", "unclip", small_source, "--output", out, "--preset", "tiny", "--verify",
                 "--verify-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "check passed" in err and "sr_high (32² -> 64²) is freshly initialised" in err
    for name in STAGE_NAMES:
        assert os.path.exists(os.path.join(out, name, "model.safetensors"))
    cfg, decoder = load_stage(out, "decoder")
    assert cfg.conditioning == "unclip" and cfg.diffusion.variance == "learned_range" and decoder.temporal
    assert load_stage(out, "interpolation")[1].cond_channels == 4
    assert load_stage(out, "sr_low")[0].final_network


def test_temporal_layers_start_at_identity_on_a_video(small_bundle):
    """D^t of the imported decoder on f frames equals the 2D decoder on each frame."""
    cfg, net = load_stage(small_bundle, "decoder")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, 8, 8, generator=g)
    cond = {"image_embeds": torch.randn(2, 32, generator=g), "fps": torch.tensor([4.0, 8.0]),
            "text_embeds": torch.randn(2, 32, generator=g), "text_hidden": torch.randn(2, 77, 32, generator=g),
            "text_mask": torch.arange(77)[None].expand(2, -1) < 5}
    with torch.no_grad():
        video = net(x, torch.tensor([500, 500]), **cond)
        net.set_temporal(False)
        frames = net(x, torch.tensor([500, 500]), **cond)
    assert video.shape == (2, 6, 3, 8, 8)
    torch.testing.assert_close(video, frames, atol=1e-5, rtol=0)


def test_imported_bundle_round_trips_through_s3(small_source, image_encoder, small_bundle, s3_bucket):
    """Written straight to S3 by the importer, read back: every stage's weights as the local import's, and the
    transformers CLIP (configs, tokenizer) encodes a prompt as it does."""
    url = f"{s3_bucket}/karlo-video"
    import_unclip(small_source, url, preset="tiny", image_encoder=image_encoder)
    for name in STAGE_NAMES:
        (_, remote), (_, local) = load_stage(url, name), load_stage(small_bundle, name)
        a, b = remote.state_dict(), local.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    (_, clip_r), (_, clip_l) = load_stage(url, "clip"), load_stage(small_bundle, "clip")
    tokens, truncated = clip_r.tokenize([PROMPT])
    assert torch.equal(tokens, clip_l.tokenize([PROMPT])[0]) and truncated == [False]
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(clip_r.encode_text(tokens), clip_l.encode_text(tokens)))


def test_mav_generate_writes_the_video_of_an_imported_bundle(small_bundle, tmp_path, capsys):
    out = tmp_path / "circle.mp4"
    assert main(["generate", PROMPT, "--out", str(out), "--checkpoint", small_bundle, "--steps", "2",
                 "--seed", "3"]) == 0
    frames, _ = decode_mp4(out.read_bytes())
    assert frames.shape == (7, 64, 64, 3)  # tiny preset: 4 keyframes, skip 2; SR 8² -> 32² -> 64²


def test_mav_train_decoder_video_fine_tunes_the_imported_decoder(small_bundle, ray_session, tmp_path, capsys):
    """Unlabeled videos, the imported CLIP's image tower for y_e: the temporal layers move, the rest stays."""
    from workflows.shapes.data import synth

    data = str(tmp_path / "shapes")
    synth(data, images=2, videos=2, size=16, frames=12, seed=1)
    out = str(tmp_path / "video-model")
    config = tmp_path / "train.yaml"
    config.write_text("batch_size: 2\nframes: 4\nlog_every: 1\ncheckpoint_every: 2\ntemporal_only: true\nlr: 0.01\n")
    assert main(["train", "decoder-video", "--data", data, "--output", out, "--init", small_bundle, "--clip",
                 small_bundle, "--preset", "tiny", "--config", str(config), "--max-steps", "2"]) == 0
    (_, before), (cfg, after) = load_stage(small_bundle, "decoder"), load_stage(out, "decoder")
    assert cfg.conditioning == "unclip"
    a, b = before.state_dict(), after.state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(".temporal_" in k for k in moved)


# -- bad sources: one line, exit 2, nothing written ------------------------------------------------


def _missing_component(src):
    shutil.rmtree(os.path.join(src, "super_res_last"))


def _wrong_class(src):
    path = os.path.join(src, "model_index.json")
    index = json.load(open(path))
    index["decoder"] = ["diffusers", "UNet2DModel"]
    json.dump(index, open(path, "w"))


def _only_bin(src):
    for name in ("prior",):
        os.rename(os.path.join(src, name, "diffusion_pytorch_model.safetensors"),
                  os.path.join(src, name, "diffusion_pytorch_model.bin"))


def _shapes_do_not_match(src):
    path = os.path.join(src, "decoder", "config.json")
    config = json.load(open(path))
    config["block_out_channels"] = [8, 24]
    json.dump(config, open(path, "w"))


@pytest.mark.parametrize("damage, message", [
    (_missing_component, "no super_res_last/config.json"),
    (_wrong_class, "names UNet2DModel for decoder; expected UNet2DConditionModel"),
    (_only_bin, "prior has only pickled weights (diffusion_pytorch_model.bin)"),
    (_shapes_do_not_match, "decoder weights do not match its config.json: size mismatch"),
])
def test_bad_sources_are_one_line_errors_and_nothing_is_written(small_source, tmp_path, capsys, damage, message):
    src = str(tmp_path / "src")
    shutil.copytree(small_source, src)
    damage(src)
    out = tmp_path / "bundle"
    assert main(["import", "unclip", src, "--output", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mav: error: ") and message in err[0], err
    assert not out.exists()


def test_an_output_holding_a_bundle_is_refused(small_source, small_bundle, capsys):
    assert main(["import", "unclip", small_source, "--output", small_bundle, "--preset", "tiny"]) == 2
    assert "already holds a bundle" in capsys.readouterr().err


def test_sr_high_from_a_bundle(small_source, small_bundle, tmp_path):
    """--sr-high BUNDLE takes that bundle's SR_h as it is."""
    out = str(tmp_path / "with-sr-high")
    imported = import_unclip(small_source, out, preset="tiny", sr_high=small_bundle)
    assert imported.notices == []
    a, b = load_stage(out, "sr_high")[1].state_dict(), load_stage(small_bundle, "sr_high")[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.isfinite([float(v.float().abs().sum()) for v in a.values()]).all()


@pytest.mark.parametrize("stage", ["interpolation", "sr-low-video"])
def test_the_other_video_stages_start_from_the_imported_bundle_and_learn(small_bundle, tmp_path, stage):
    """What mav train interpolation / sr-low-video --init IMPORTED start from: a network whose loss
    reaches its temporal layers, saved and loaded back as the same stage."""
    from stages.checkpoint import save_stage
    from stages.training import LossContext, Samples, TrainConfig, start_network, training_stage
    from workflows.presets import load_preset

    spec = training_stage(stage)
    cfg, net = start_network(spec, load_preset("tiny"), init=load_stage(small_bundle, spec.init))
    size = cfg.out_size if stage == "sr-low-video" else load_stage(small_bundle, "decoder")[0].size
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 4, size, size, generator=g) * 2 - 1
    ctx = LossContext(stage_cfg=cfg, train=TrainConfig(), generator=g, clip=load_stage(small_bundle, "clip")[1])
    loss = spec.loss(net.train(), Samples(pixels=pixels, fps=torch.tensor([4.0, 8.0])), ctx)
    loss.backward()
    temporal = [p.grad for n, p in net.named_parameters() if ".temporal_" in n]
    assert torch.isfinite(loss) and any(grad is not None and grad.abs().sum() > 0 for grad in temporal)
    save_stage(str(tmp_path), spec.produces, cfg, net)
    loaded_cfg, loaded = load_stage(str(tmp_path), spec.produces)
    assert loaded_cfg == cfg and loaded.state_dict().keys() == net.state_dict().keys()
