"""Strict configs: unknown keys and bad values are errors that name the key; presets load and chain."""

import subprocess
import sys

import pytest

from stages.config import CascadeConfig, ConfigError, DiffusionConfig, dump_yaml, from_dict, load_yaml
from workflows.presets import load_preset, preset_names


def test_presets_load_and_keep_the_paper_ratios():
    assert {"cpu", "paper"} <= set(preset_names())
    paper, cpu = load_preset("paper"), load_preset("cpu")
    assert (paper.decoder.frames, paper.decoder.size, paper.sr_low.out_size, paper.sr_high.out_size) == (16, 64, 256, 768)
    assert paper.output_frames == 76 and cpu.output_frames == 76
    for c in (paper, cpu):
        assert c.sr_low.out_size // c.sr_low.in_size == 4
        assert c.sr_high.out_size // c.sr_high.in_size == 3
    assert paper.clip.resolved_embed_dim == 768


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"'decoder\.unet\.chanels'"):
        from_dict(CascadeConfig, {"decoder": {"unet": {"chanels": [1]}}})
    with pytest.raises(ConfigError, match=r"'colour'"):
        load_yaml(CascadeConfig, "colour: red\n")


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("decoder: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_preset(str(bad))


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
    c = load_preset("cpu")
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


def test_frame_noise_share_is_checked_and_only_for_stages_with_frames():
    from stages.config import PriorConfig, SRHighConfig

    with pytest.raises(ConfigError, match="frame_noise_shared must be in"):
        DiffusionConfig(frame_noise_shared=1.0)
    with pytest.raises(ConfigError, match="prior: diffusion.frame_noise_shared"):
        PriorConfig(diffusion=DiffusionConfig(frame_noise_shared=0.5))
    with pytest.raises(ConfigError, match="sr_high: every frame already starts from the same noise"):
        SRHighConfig(diffusion=DiffusionConfig(frame_noise_shared=0.5))
    with pytest.raises(ConfigError, match="sample_frame_noise_shared must be in"):
        DiffusionConfig(sample_frame_noise_shared=-0.1)
    with pytest.raises(ConfigError, match="sr_high: every frame already starts from the same noise"):
        SRHighConfig(diffusion=DiffusionConfig(sample_frame_noise_shared=0.5))
    # Sampling takes the training ρ unless it sets its own.
    assert DiffusionConfig(frame_noise_shared=0.5).sampling_shared == 0.5
    assert DiffusionConfig(frame_noise_shared=0.5, sample_frame_noise_shared=0.9).sampling_shared == 0.9
    assert DiffusionConfig(frame_noise_shared=0.5, sample_frame_noise_shared=0.0).sampling_shared == 0.0


def test_moving_frame_noise_needs_a_common_part_and_a_drift_range():
    with pytest.raises(ConfigError, match="frame_noise_flow moves the noise's common part"):
        DiffusionConfig(frame_noise_flow=True)
    with pytest.raises(ConfigError, match="sample_frame_noise_drift moves the noise's common part"):
        DiffusionConfig(frame_noise_shared=0.5, sample_frame_noise_shared=0.0, sample_frame_noise_drift=(0.01, 0.02))
    for bad in ((0.02,), (0.03, 0.01), (0.1, 0.9)):
        with pytest.raises(ConfigError, match="sample_frame_noise_drift must be"):
            DiffusionConfig(frame_noise_shared=0.9, sample_frame_noise_drift=bad)
    cfg = from_dict(DiffusionConfig, {"frame_noise_shared": 0.9, "frame_noise_flow": True,
                                      "sample_frame_noise_drift": [0.02, 0.05]})
    assert cfg.sample_frame_noise_drift == (0.02, 0.05) and cfg.frame_noise_set
    from stages.config import InterpolationConfig, SRHighConfig, SRLowConfig

    drifting = {"diffusion": {"frame_noise_shared": 0.5, "sample_frame_noise_drift": [0.02, 0.05]}}
    for cls in (InterpolationConfig, SRLowConfig, SRHighConfig):
        with pytest.raises(ConfigError, match="sample_frame_noise_drift is D\\^t's"):
            from_dict(cls, drifting)


def test_progressive_frame_noise_is_checked_and_only_for_stages_with_frames():
    from stages.config import PriorConfig, SRHighConfig

    for name in ("frame_noise_progressive", "sample_frame_noise_progressive"):
        with pytest.raises(ConfigError, match=f"{name} must be in"):
            DiffusionConfig(**{name: 1.0})
        with pytest.raises(ConfigError, match="prior: diffusion.*apply to video stages only"):
            PriorConfig(diffusion=DiffusionConfig(**{name: 0.5}))
        with pytest.raises(ConfigError, match="sr_high: every frame already starts from the same noise"):
            SRHighConfig(diffusion=DiffusionConfig(**{name: 0.5}))
    # Sampling takes the training r unless it sets its own.
    assert DiffusionConfig(frame_noise_progressive=0.5).sampling_progressive == 0.5
    sampled = DiffusionConfig(frame_noise_progressive=0.5, sample_frame_noise_progressive=0.99)
    assert sampled.sampling_progressive == 0.99
    assert DiffusionConfig(frame_noise_progressive=0.5, sample_frame_noise_progressive=0.0).sampling_progressive == 0.0
