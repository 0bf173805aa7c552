"""Strict configs: unknown keys and bad values are errors that name the key; presets load and chain."""

import subprocess
import sys

import pytest

from stages.config import CascadeConfig, ConfigError, DiffusionConfig, dump_yaml, from_dict, load_yaml


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"'decoder\.unet\.chanels'"):
        from_dict(CascadeConfig, {"decoder": {"unet": {"chanels": [1]}}})
    with pytest.raises(ConfigError, match=r"'colour'"):
        load_yaml(CascadeConfig, "colour: red\n")


@pytest.mark.parametrize(
    "data, match",
    [
        ({"decoder": {"frames": "16"}}, r"decoder\.frames: expected an integer"),
        ({"decoder": {"diffusion": {"sampler": "euler"}}}, "sampler must be one of"),
        ({"decoder": {"unet": {"attention": [True]}}}, "attention has 1 entries"),
        ({"sr_low": {"in_size": 32}}, "sr_low.in_size=32 must equal decoder.size=64"),
        ({"prior": {"embed_dim": 32}}, "prior.embed_dim=32 must equal the CLIP embedding size 64"),
        ({"sr_high": {"unet": {"temporal": True}}}, "spatial-only"),
        ({"interpolation": {"skip": 0}}, "skip must be >= 1"),
    ],
)
def test_invalid_values_are_rejected(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(CascadeConfig, data)


def test_partial_sections_keep_stage_defaults():
    """Overriding one diffusion field keeps the stage's own defaults for the rest (the prior predicts x_0)."""
    c = from_dict(CascadeConfig, {"prior": {"diffusion": {"steps": 3}}})
    assert c.prior.diffusion.steps == 3 and c.prior.diffusion.prediction_type == "sample"
    assert DiffusionConfig().prediction_type == "epsilon"


def test_yaml_round_trip():
    c = from_dict(CascadeConfig, {"decoder": {"frame_noise": {"shared": 0.5, "sample_progressive": 0.9}}})
    assert load_yaml(CascadeConfig, dump_yaml(c)) == c


def test_stages_never_import_ray():
    code = (
        "import sys, stages, stages.cascade, stages.checkpoint, stages.config, stages.diffusion, "
        "stages.temporal, stages.unet, stages.clip, stages.prior; "
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; "
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_frame_noise_is_checked_and_only_stages_with_frames_have_it():
    from stages.config import DecoderConfig, FrameNoiseConfig, InterpolationConfig, PriorConfig, SRHighConfig, SRLowConfig

    for name in ("shared", "sample_shared", "sample_progressive"):
        with pytest.raises(ConfigError, match=f"frame_noise.{name} must be in"):
            FrameNoiseConfig(**{name: 1.0})
    for cls in (DecoderConfig, InterpolationConfig, SRLowConfig):
        assert from_dict(cls, {"frame_noise": {"shared": 0.5}}).frame_noise.shared == 0.5
    for cls in (PriorConfig, SRHighConfig):  # the prior's y_e and SR_h's single frames have no frames to correlate
        with pytest.raises(ConfigError, match="unknown config key 'frame_noise'"):
            from_dict(cls, {"frame_noise": {"shared": 0.5}})
    # Sampling takes the training ρ unless it sets its own.
    assert FrameNoiseConfig(shared=0.5).sampling_shared == 0.5
    assert FrameNoiseConfig(shared=0.5, sample_shared=0.9).sampling_shared == 0.9
    assert FrameNoiseConfig(shared=0.5, sample_shared=0.0).sampling_shared == 0.0


def test_earlier_flat_frame_noise_keys_migrate_with_a_notice(caplog):
    """Bundles written before frame_noise was one section still load: their keys move into it, retired ones are
    dropped with a notice naming what replaced them, and what cannot load says what to do."""
    from stages.config import DecoderConfig, FrameNoiseConfig, InterpolationConfig, PriorConfig, SRHighConfig

    earlier = {"diffusion": {"steps": 12, "frame_noise_shared": 0.9, "sample_frame_noise_shared": None,
                             "frame_noise_progressive": 0.0, "sample_frame_noise_progressive": None,
                             "frame_noise_flow": True, "sample_frame_noise_drift": [0.04, 0.16]},
               "unet": {"temporal": True, "temporal_fps": False}}
    with caplog.at_level("WARNING"):
        cfg = from_dict(DecoderConfig, earlier, "decoder")
    assert cfg.frame_noise == FrameNoiseConfig(shared=0.9) and cfg.diffusion.steps == 12
    notices = caplog.text
    assert "frame_noise_flow" in notices and "motion guidance" in notices and "read as frame_noise" in notices
    r = from_dict(InterpolationConfig, {"diffusion": {"frame_noise_shared": 0.5, "frame_noise_progressive": 0.8}})
    assert r.frame_noise == FrameNoiseConfig(shared=0.5, sample_progressive=0.8)  # sampled with r as before
    off = {"diffusion": {"frame_noise_shared": 0.0, "sample_frame_noise_drift": []}}
    assert from_dict(PriorConfig, off).diffusion == PriorConfig().diffusion
    assert from_dict(SRHighConfig, off).diffusion == SRHighConfig().diffusion
    with pytest.raises(ConfigError, match="prior.diffusion.frame_noise_shared: this stage's noise is not correlated"):
        from_dict(PriorConfig, {"diffusion": {"frame_noise_shared": 0.5}}, "prior")
    with pytest.raises(ConfigError, match="decoder.unet.temporal_fps: fps in the temporal layers was retired"):
        from_dict(DecoderConfig, {"unet": {"temporal_fps": True}}, "decoder")
    with pytest.raises(ConfigError, match="both frame_noise and the earlier"):
        from_dict(DecoderConfig, {"frame_noise": {"shared": 0.5}, "diffusion": {"frame_noise_shared": 0.5}})
    for key in ("frame_noise_shared", "frame_noise_flow", "sample_frame_noise_drift"):  # not in today's layout
        with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
            from_dict(DiffusionConfig, {key: 0.5})
