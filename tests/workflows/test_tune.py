"""``mav tune`` then ``mav edit`` on the tiny bundle: the tuned bundle (tuned D^t with sparse-causal attention,
references for the other stages, the inverted noise, the settings), only the named parameters changed,
edits as MP4s locally and in S3, deterministic for a seed, and bad inputs as one-line errors that write
nothing."""

import contextlib
import io

import fsspec
import numpy as np
import pytest
import torch

from stages.checkpoint import REFERENCE_FILE, load_stage
from stages.config import STAGE_NAMES
from stages.fsio import write_bytes_atomic
from stages.inversion import load_inversion
from stages.tuning import trainable_parameters
from workflows.cli import main
from workflows.shapes import world
from workflows.tune import load_settings
from workflows.video import decode_mp4, encode_mp4

CAPTION = "a red circle on a white background"
EDIT = "a blue square on a white background"
TUNE = ["--steps", "3", "--lr", "0.01", "--fps", "10"]  # 3 steps, large enough to move every trained weight


def run_mav(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _write_clip(url: str, frames: int) -> str:
    """A red circle moving on white, 32x32 at 30 fps."""
    write_bytes_atomic(url, encode_mp4(world.moving_video(np.random.default_rng(0), 32, frames, "red", "circle"), 30))
    return url


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return _write_clip(str(tmp_path_factory.mktemp("clip") / "circle.mp4"), 24)


@pytest.fixture(scope="module")
def tuned(ray_session, tmp_path_factory, tiny_bundle, clip) -> tuple[str, str]:
    """(tuned bundle, mav tune's stderr) of the clip, tuned from the tiny bundle on a local Ray."""
    out = str(tmp_path_factory.mktemp("tuned") / "circle")
    code, err = run_mav(["tune", clip, "--caption", CAPTION, "--output", out, "--checkpoint", tiny_bundle, *TUNE])
    assert code == 0, err
    return out, err


def test_the_tuned_bundle(tuned, tiny_bundle, tiny_config):
    out, err = tuned
    settings = load_settings(out)
    frames = tiny_config.decoder.frames
    assert settings.frames == tuple(range(0, 3 * frames, 3)) and settings.fps == 10.0  # every 3rd of 30 fps
    assert (settings.caption, settings.condition, settings.train, settings.steps) == (CAPTION, "frames", "queries", 3)
    cfg, net = load_stage(out, "decoder")
    assert cfg.unet.spatial_attention == "sparse_causal" and cfg.diffusion.sampler == "ddim"
    assert list(settings.parameters) == trainable_parameters(net, "queries")
    assert all(f"  {name}" in err.splitlines() for name in settings.parameters)  # printed, one per line
    fs = fsspec.filesystem("file")
    for stage in STAGE_NAMES:
        if stage != "decoder":  # referenced, not copied
            assert fs.ls(f"{out}/{stage}", detail=False) == [f"{out}/{stage}/{REFERENCE_FILE}"]
            base_cfg, _ = load_stage(tiny_bundle, stage)
            assert load_stage(out, stage)[0] == base_cfg
    inversion = load_inversion(out)
    assert inversion.noise.shape == (1, 3, frames, tiny_config.decoder.size, tiny_config.decoder.size)
    assert inversion.steps == cfg.diffusion.steps and inversion.fps == 10.0


def test_only_the_named_parameters_change(tuned, tiny_bundle):
    out, _ = tuned
    names = set(load_settings(out).parameters)
    base = load_stage(tiny_bundle, "decoder")[1].state_dict()
    after = load_stage(out, "decoder")[1].state_dict()
    assert base.keys() == after.keys()
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed == names
    assert any(".to_q." in n for n in names) and any(".temporal_attn." in n for n in names)
    assert not any(".to_k." in n or ".to_v." in n or ".temporal_conv." in n for n in names)


def test_steps_zero_inverts_the_base_decoder_untuned(clip, tiny_bundle, tmp_path):
    out = str(tmp_path / "untuned")
    code, err = run_mav(["tune", clip, "--caption", CAPTION, "--output", out, "--checkpoint", tiny_bundle,
                         "--steps", "0", "--fps", "10"])
    assert code == 0, err
    assert load_settings(out).parameters == () and not (tmp_path / "untuned" / "_train").exists()
    cfg, net = load_stage(out, "decoder")
    assert cfg.unet.spatial_attention == "sparse_causal" and cfg.diffusion.sampler == "ddim"
    base = load_stage(tiny_bundle, "decoder")[1].state_dict()
    assert all(torch.equal(base[k], v) for k, v in net.state_dict().items())
    assert load_inversion(out) is not None


def test_edit_end_to_end_is_deterministic(tuned, tmp_path, tiny_config):
    out, _ = tuned
    videos = {}
    for name, extra in (("a", []), ("b", []), ("fresh", ["--no-inversion"])):
        path = tmp_path / f"{name}.mp4"
        code, err = run_mav(["edit", "--tuned", out, EDIT, "--out", str(path), "--seed", "5", *extra])
        assert code == 0, err
        videos[name] = path.read_bytes()
    assert videos["a"] == videos["b"]  # same seed, same bytes
    assert videos["fresh"] != videos["a"]  # the inverted noise is what it starts from
    frames, fps = decode_mp4(videos["a"])
    c = tiny_config
    assert frames.shape == ((c.decoder.frames - 1) * c.interpolation.skip + 1, c.sr_high.out_size, c.sr_high.out_size, 3)
    assert fps == 10 * c.interpolation.skip


def test_tune_and_edit_in_s3(ray_session, s3_bucket, tiny_bundle):
    clip = _write_clip(f"{s3_bucket}/in/circle.mp4", 12)
    out = f"{s3_bucket}/tuned/circle"
    code, err = run_mav(["tune", clip, "--caption", CAPTION, "--output", out, "--checkpoint", tiny_bundle,
                         "--steps", "2", "--fps", "30", "--train", "temporal"])
    assert code == 0, err
    assert load_settings(out).train == "temporal" and load_inversion(out) is not None
    code, err = run_mav(["edit", "--tuned", out, EDIT, CAPTION, "--out", f"{s3_bucket}/edits", "--seed", "1",
                         "--steps", "3"])  # another step count than the inversion's: inverted afresh
    assert code == 0, err
    fs, _ = fsspec.core.url_to_fs(s3_bucket)
    videos = sorted(p for p in fs.find(f"{s3_bucket}/edits") if p.endswith(".mp4"))
    assert len(videos) == 2 and all(decode_mp4(fs.cat_file(p))[0].shape[0] == 7 for p in videos)


@pytest.fixture(scope="module")
def bad_clips(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    (d / "text.mp4").write_text("not a video at all")
    return {"text": str(d / "text.mp4"), "short": _write_clip(str(d / "short.mp4"), 3), "missing": str(d / "none.mp4")}


@pytest.mark.parametrize("case, message", [
    ("text", "not a video"),
    ("short", "3 frames, too short for D^t's 4 keyframes"),
    ("missing", "no such file"),
    ("caption", "--caption is empty"),
    ("train", "invalid choice"),
])
def test_bad_tune_inputs_are_one_line_and_write_nothing(case, message, bad_clips, clip, tmp_path, tiny_bundle,
                                                         capsys):
    video = bad_clips.get(case, clip)
    caption = "  " if case == "caption" else CAPTION
    extra = ["--train", "everything"] if case == "train" else []
    out = tmp_path / "out"
    if case == "train":  # argparse's own refusal
        with pytest.raises(SystemExit) as exit_info:
            main(["tune", video, "--caption", caption, "--output", str(out), *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    else:
        code, err = run_mav(["tune", video, "--caption", caption, "--output", str(out), "--checkpoint", tiny_bundle])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_bad_edit_inputs_are_one_line(tuned, tiny_bundle, tmp_path):
    out, _ = tuned
    for argv, message in (
        (["edit", "--tuned", out, " ", "--out", str(tmp_path / "e.mp4")], "prompt 1 is empty"),
        (["edit", "--tuned", tiny_bundle, EDIT, "--out", str(tmp_path / "e.mp4")], "is not a tuned bundle"),
        (["tune", "x.mp4", "--caption", CAPTION, "--output", out], "already holds a tuned bundle"),
    ):
        code, err = run_mav(argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())
