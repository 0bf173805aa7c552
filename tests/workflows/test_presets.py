"""Presets: every shipped preset loads strictly, keeps the paper's ratios, and an unknown one is named."""

import pytest

from stages.config import CascadeConfig, ConfigError, dump_yaml, load_yaml
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


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("decoder: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_preset(str(bad))


def test_presets_round_trip_through_yaml():
    for name in preset_names():
        c = load_preset(name)
        assert load_yaml(CascadeConfig, dump_yaml(c)) == c, name


def test_the_shapes_preset_is_the_shipped_bundles_configuration():
    """Regression check of the shipped artefact: `mav recipe shapes` trains what cluster/models/shapes holds."""
    from stages.checkpoint import load_bundle_config
    from workflows.presets import DEFAULT_MODEL, model_path

    assert load_preset("shapes") == load_bundle_config(model_path(DEFAULT_MODEL))
