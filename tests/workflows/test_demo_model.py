"""The demo model shipped in cluster/models/shapes (trained by `mav recipe shapes`): what the commands run
when given neither --checkpoint nor --preset, and, as a regression check of that artefact, what it makes."""

from pathlib import Path

import pytest

from stages.checkpoint import CheckpointError, load_bundle_config
from stages.config import ConfigError
from workflows.cli import main
from workflows.presets import DEFAULT_MODEL, choose_model, model_path
from workflows.serve import AppArgs
from workflows.shapes.judge import JUMP_STEP, judge_frames, video_metrics
from workflows.video import decode_mp4

pytestmark = pytest.mark.timeout(600)

# Regression check of the shipped bundle, not a property of the code: thresholds set from the figures measured
# on cluster/models/shapes (`mav generate`, seed 0, its default learned-only sampling: reach 0.139, largest step
# 0.028). Shipping another bundle means measuring them again.
SHIPPED_REACH = 0.1                   # the square moves: it gets this far (frame sizes) from where it starts...
SHIPPED_LARGEST_STEP = JUMP_STEP / 4  # ...smoothly: no step between frames as large as this


def test_commands_default_to_the_shipped_model_and_a_preset_means_fresh_weights(tmp_path):
    assert choose_model(None, None)[0] == model_path() == str(Path(__file__).parents[2] / "cluster/models/shapes")
    assert choose_model(None, "cpu") == (None, "cpu")
    assert choose_model(model_path(), "paper") == (model_path(), "paper")  # a checkpoint wins over a preset
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        choose_model(None, "nope")
    with pytest.raises(CheckpointError, match="no clip/"):
        choose_model(str(tmp_path), None)
    assert AppArgs().checkpoint is None and AppArgs().preset is None  # Serve: the same rule, applied in build_app


def test_shipped_bundle_is_small_chained_safetensors():
    root = Path(model_path(DEFAULT_MODEL))
    cfg = load_bundle_config(str(root))
    files = [p for p in root.rglob("*") if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    assert weights <= 25 * 2**20, weights
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".yaml"}  # nothing that would be unpickled
    assert (cfg.decoder.frames, cfg.interpolation.skip, cfg.sr_high.out_size) == (16, 5, 64)


def test_regression_shipped_bundle_draws_the_prompted_square_moving_smoothly(tmp_path):
    """Regression check of the shipped bundle: ``mav generate`` without a model argument draws a blue square
    that moves (reach > SHIPPED_REACH), smoothly (largest step < SHIPPED_LARGEST_STEP), one object in every
    frame."""
    out = tmp_path / "sq.mp4"
    assert main(["generate", "a blue square on a white background", "--out", str(out), "--seed", "0"]) == 0
    frames, fps = decode_mp4(out.read_bytes())
    assert frames.shape == (76, 64, 64, 3) and fps == 25.0
    m = video_metrics(judge_frames(frames.transpose(3, 0, 1, 2)), "blue", "square")
    assert m["present"] == 1.0 and m["colour_ok"] and m["shape_ok"], m
    assert m["colour_frames_ok"] >= 0.9, m
    # Its corners are soft, so the judge calls some frames a circle; but it fills its bounding box as a square
    # does (about 0.9; a circle π/4 ≈ 0.79, a triangle about 0.5).
    assert m["shape_frames_ok"] >= 0.4 and m["fill_median"] >= 0.85, m
    assert m["reach"] > SHIPPED_REACH and m["largest_step"] < SHIPPED_LARGEST_STEP and m["one_object"] == 1.0, m
