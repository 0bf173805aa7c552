"""The in-process pipeline: the six runners chained, videos of the cascade's shape at fps·skip, each video a
function of its own request only (not of its batch), requests validated field by field, and the row columns
the runners take."""

import math

import numpy as np
import pytest
import torch
import yaml

from stages import cascade
from stages.config import STAGE_NAMES
from stages.errors import UserError
from stages.fsio import read_yaml_mapping
from workflows.pipeline import MAX_MOTION, MAX_SEED, Pipeline, Request, check_motion, to_batch
from workflows.runners import RUNNER_OF, SuperResolutionRunner
from workflows.video import from_uint8, to_uint8


@pytest.fixture(scope="module")
def pipe(tiny_preset_file) -> Pipeline:
    return Pipeline(preset=tiny_preset_file, device="cpu")


def test_videos_have_the_cascades_shape_and_rate(pipe, tiny_config):
    c = tiny_config
    videos = pipe.generate([Request(prompt="a red ball", seed=1, fps=3), Request(prompt=" ".join(["word"] * 120))])
    frames = (c.decoder.frames - 1) * c.interpolation.skip + 1
    for v in videos:
        assert v.frames.dtype == np.uint8 and v.frames.shape == (3, frames, c.sr_high.out_size, c.sr_high.out_size)
        assert set(v.stage_seconds) == set(STAGE_NAMES)
    assert [v.fps for v in videos] == [3.0 * c.interpolation.skip, 5.0 * c.interpolation.skip]
    assert [v.truncated for v in videos] == [False, True]
    assert pipe.generate([]) == []


def test_a_video_depends_on_its_request_not_on_its_batch(pipe):
    """The same prompt and seed give the same video alone, again, and batched with other prompts (one of them
    with another step count, so the runners split the batch)."""
    target = Request(prompt="a green triangle", seed=11, fps=6)
    alone = pipe.generate([target])[0].frames
    mixed = pipe.generate([Request(prompt="a red ball", seed=3), target, Request(prompt="x", seed=11, steps=3)])
    assert np.array_equal(pipe.generate([target])[0].frames, alone)
    diff = np.abs(alone.astype(int) - mixed[1].frames.astype(int))
    # Batched float reductions may differ in the last bits; after uint8 rounding at most 1 level, rarely.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert not np.array_equal(mixed[0].frames, alone)
    assert not np.array_equal(pipe.generate([Request(prompt="a green triangle", seed=12, fps=6)])[0].frames, alone)


@torch.inference_mode()
def test_pipeline_can_stop_after_a_stage(tiny_preset_file, tiny_config):
    """``until="decoder"``: D^t's keyframes, at the requested rate; the same keyframes ↑F then fills in."""
    request = Request(prompt="a green triangle", seed=11, fps=6)
    [keyframes] = Pipeline(preset=tiny_preset_file, device="cpu", until="decoder").generate([request])
    d = tiny_config.decoder
    assert keyframes.frames.shape == (3, d.frames, d.size, d.size) and keyframes.fps == 6.0
    [filled] = Pipeline(preset=tiny_preset_file, device="cpu", until="interpolation").generate([request])
    skip = tiny_config.interpolation.skip
    assert filled.frames.shape == (3, (d.frames - 1) * skip + 1, d.size, d.size) and filled.fps == 6.0 * skip
    assert np.array_equal(filled.frames[:, ::skip], keyframes.frames)
    with pytest.raises(ValueError, match="until must be one of decoder, interpolation, sr_low, sr_high, got 'prior'"):
        Pipeline(preset=tiny_preset_file, device="cpu", until="prior")


def test_motion_guidance_moves_only_the_rows_that_ask(tmp_path, tiny_preset_file):
    """With D^t's frames sharing noise, a request's motion changes its keyframes; a request without motion in
    the same batch gets exactly what it gets alone."""
    data = read_yaml_mapping(tiny_preset_file)
    data["decoder"]["frame_noise"] = {"shared": 0.5}
    (tmp_path / "shared.yaml").write_text(yaml.safe_dump(data))
    pipe = Pipeline(preset=str(tmp_path / "shared.yaml"), device="cpu", until="decoder")
    still = Request(prompt="a red ball", seed=4)
    moving = Request(prompt="a red ball", seed=4, motion=(0.0, 0.25))
    [alone] = pipe.generate([still])
    both = pipe.generate([still, moving])
    assert np.abs(both[0].frames.astype(int) - alone.frames.astype(int)).max() <= 1
    assert np.abs(both[1].frames.astype(int) - alone.frames.astype(int)).mean() > 1.0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt": " "}, "prompt: must be a non-empty string"),
        ({"negative_prompt": None}, "negative_prompt: must be a string"),
        ({"seed": -1}, "seed: must be an integer in 0.."),
        ({"seed": MAX_SEED + 1}, "seed: must be an integer"),
        ({"seed": 1.0}, "seed: must be an integer"),
        ({"fps": 0}, "fps: must be an integer in 1..30, got 0"),
        ({"fps": True}, "fps: must be an integer"),
        ({"steps": 1001}, "steps: must be an integer in 1..1000"),
        ({"guidance": math.inf}, "guidance: must be a number in 0..50"),
        ({"guidance": 51}, "guidance: must be a number in 0..50"),
        ({"motion": (0.1,)}, "motion: must be two numbers"),
        ({"motion": (MAX_MOTION + 0.01, 0)}, "motion: must be two numbers [dy, dx] in -0.5..0.5"),
        ({"motion": (0, math.nan)}, "motion: must be two numbers"),
        ({"motion": (True, 0)}, "motion: must be two numbers"),
        ({"motion": "0.1 0.1"}, "motion: must be two numbers"),
    ],
)
def test_bad_requests_name_the_field(fields, message):
    with pytest.raises(UserError) as e:
        Request(**{"prompt": "a red ball", **fields})
    assert str(e.value).startswith(message)


def test_check_motion_accepts_two_numbers_of_any_kind():
    assert check_motion([0.1, -0.2]) == (0.1, -0.2)
    assert check_motion((0, MAX_MOTION)) == (0.0, 0.5)
    assert check_motion(np.array([0.25, -0.5], dtype=np.float32)) == (0.25, -0.5)
    assert Request(prompt="a").motion is None  # off by default


def test_to_batch_columns():
    batch = to_batch([Request(prompt="a", seed=3, id="x"),
                      Request(prompt="b", seed=4, fps=7, steps=9, guidance=2.5, negative_prompt="blur", motion=(0.1, 0))])
    assert set(batch) == {"id", "prompt", "negative_prompt", "seed", "fps", "steps", "guidance", "motion"}
    assert batch["prompt"].dtype == object and batch["prompt"].tolist() == ["a", "b"]
    assert batch["negative_prompt"].tolist() == ["", "blur"] and batch["id"].tolist() == ["x", ""]
    assert batch["seed"].dtype == np.int64 and batch["seed"].tolist() == [3, 4]
    assert batch["fps"].tolist() == [5, 7]
    assert batch["steps"].tolist() == [0, 9]  # 0: each stage's preset value
    assert batch["guidance"].dtype == np.float32 and np.isnan(batch["guidance"][0]) and batch["guidance"][1] == 2.5
    assert batch["motion"].dtype == np.float32 and batch["motion"].shape == (2, 2)
    assert np.isnan(batch["motion"][0]).all() and np.allclose(batch["motion"][1], [0.1, 0.0])
    assert to_batch([Request(prompt="a")])["motion"].shape == (1, 2)


def test_runners_cover_the_cascade_in_order():
    assert list(RUNNER_OF) == list(STAGE_NAMES)
    with pytest.raises(ValueError, match="a super-resolution stage is one of sr_low, sr_high, got 'decoder'"):
        SuperResolutionRunner("decoder", preset="tiny")


@pytest.mark.parametrize("stage, resolve", [("sr_low", cascade.super_resolve_video),
                                            ("sr_high", cascade.super_resolve_frames)])
def test_the_super_resolution_runner_is_its_stages_function(stage, resolve, tiny_preset_file, tiny_config):
    """One runner class for SR_l^t and SR_h; each stage's runner gives exactly what its cascade function gives."""
    cfg = getattr(tiny_config, stage)
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (2, 3, tiny_config.decoder.frames, cfg.in_size, cfg.in_size), dtype=np.uint8)
    runner = RUNNER_OF[stage](preset=tiny_preset_file, device="cpu")
    out = runner({"seed": np.array([5, 6]), "steps": np.array([0, 0]), "video": video, "kept": np.array([1, 2])})
    assert out["kept"].tolist() == [1, 2]
    with torch.inference_mode():
        expected = resolve(runner.net, runner.cfg, from_uint8(video), [5, 6])
    assert out["video"].shape == (2, 3, tiny_config.decoder.frames, cfg.out_size, cfg.out_size)
    assert np.array_equal(out["video"], to_uint8(expected))


def test_mav_generate_with_a_latte_preset_writes_76_frames(tmp_path):
    """The tiny Latte cascade at the paper's frame counts (16 keyframes, skip 5) through ``mav generate``."""
    from importlib import resources

    from workflows.cli import main
    from workflows.video import decode_mp4

    text = (resources.files("cluster") / "presets" / "tiny-latte.yaml").read_text()
    preset = tmp_path / "latte-76.yaml"
    for small in (("frames: 4", "frames: 16"), ("skip: 2", "skip: 5"), ("out_size: 16", "out_size: 12"),
                  ("in_size: 16", "in_size: 12"), ("out_size: 32", "out_size: 16")):  # SR kept small: the test is ↑F's
        text = text.replace(*small)
    preset.write_text(text)
    assert main(["generate", "a red circle on a white background", "--preset", str(preset), "--seed", "3",
                 "--steps", "1", "--out", str(tmp_path / "v.mp4")]) == 0
    frames, _ = decode_mp4((tmp_path / "v.mp4").read_bytes())
    assert frames.shape == (76, 16, 16, 3)
