"""``mav generate`` in-process and as a real process: MP4s with (frames-1)·skip+1 frames at fps·skip,
safe names, S3 output, byte-identical reruns, and one-line errors with no traceback."""

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from workflows.cli import main
from workflows.errors import EXIT_USAGE
from workflows.progress import StageBars
from workflows.video import decode_mp4

# Prompt 0 of every successful run below: seed 3, keyframes at 4 fps, so the video plays at 4 × skip.
PROMPT = "a red ball bouncing"
ARGS = ["--seed", "3", "--fps", "4"]



def run_mav(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in this process -> (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def decode(data: bytes) -> tuple[np.ndarray, float]:
    assert data[4:8] == b"ftyp", "not an MP4"
    return decode_mp4(data)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_preset_file) -> bytes:
    """The video of PROMPT from fresh tiny-preset weights, made in this process."""
    out = tmp_path_factory.mktemp("reference") / "ball.mp4"
    code, err = run_mav(["generate", PROMPT, "--out", str(out), "--preset", tiny_preset_file, *ARGS])
    assert code == 0, err
    assert f"wrote {out} (7 frames, 32x32, 8 fps)" in err
    return out.read_bytes()


def test_one_prompt_makes_one_mp4(reference, tiny_config):
    frames, fps = decode(reference)
    c = tiny_config
    assert frames.shape == ((c.decoder.frames - 1) * c.interpolation.skip + 1, c.sr_high.out_size, c.sr_high.out_size, 3)
    assert frames.shape[0] == 7 and fps == 4 * c.interpolation.skip == 8.0
    assert frames.std() > 0  # not a blank video


def test_console_script_gives_the_same_bytes(reference, tmp_path, tiny_preset_file):
    """The installed ``mav`` in a fresh process: same seed, same bytes; progress and result on stderr, clean."""
    mav = Path(sys.executable).with_name("mav")
    out = tmp_path / "ball.mp4"
    proc = subprocess.run([str(mav), "generate", PROMPT, "--out", str(out), "--preset", tiny_preset_file, *ARGS],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == reference
    lines = proc.stderr.splitlines()
    assert lines[0] == "seed 3"
    # Not a terminal: plain lines, one per finished stage (a stage running past 15 s would add more).
    stages = [line for line in lines if line.startswith("[")]
    assert list(dict.fromkeys(line.split()[0] for line in stages)) == [f"[{i}/6]" for i in range(1, 7)]
    assert all("\r" not in line and re.search(r" (\d+)/\1 steps \[", line) for line in stages), stages
    assert lines[-2] == f"wrote {out} (7 frames, 32x32, 8 fps)" and lines[-1].startswith("done in ")
    assert len(lines) == len(stages) + 3, proc.stderr  # no warnings or log lines from the libraries
    assert proc.stdout == ""


def test_several_prompts_into_a_directory_with_safe_names(reference, tmp_path, tiny_preset_file):
    out = tmp_path / "videos"
    prompts = [PROMPT, "../../etc/passwd; a blue\nsquare?"]
    code, err = run_mav(["generate", *prompts, "--out", str(out), "--preset", tiny_preset_file, *ARGS])
    assert code == 0, err
    assert "seed 3 (prompt i uses 3+i)" in err
    assert os.listdir(tmp_path) == ["videos"]  # nothing escaped the directory
    names = sorted(os.listdir(out))
    assert len(names) == 2
    assert re.fullmatch(r"000-a-red-ball-bouncing-[0-9a-f]{8}\.mp4", names[0]), names
    assert re.fullmatch(r"001-etc-passwd-a-blue-square-[0-9a-f]{8}\.mp4", names[1]), names

    first, fps0 = decode((out / names[0]).read_bytes())
    second, fps1 = decode((out / names[1]).read_bytes())
    alone, _ = decode(reference)
    assert first.shape == second.shape == alone.shape and fps0 == fps1 == 8.0
    # Prompt 0 keeps seed 3 in a batch (equal up to rounding of batched reductions); prompt 1 has seed 4.
    assert np.abs(first.astype(int) - alone.astype(int)).mean() < 1.0
    assert np.abs(second.astype(int) - first.astype(int)).mean() > 5.0


def test_checkpoint_bundle_to_s3(reference, s3_bucket, tiny_bundle):
    """A saved bundle of the preset's fresh weights makes the same bytes, written to S3 and nothing else."""
    url = f"{s3_bucket}/videos/ball.mp4"
    code, err = run_mav(["generate", PROMPT, "--out", url, "--checkpoint", tiny_bundle, *ARGS])
    assert code == 0, err
    assert f"wrote {url} (7 frames, 32x32, 8 fps)" in err
    fs, _ = fsspec.core.url_to_fs(s3_bucket)
    fs.invalidate_cache()
    assert fs.find(s3_bucket) == [url.removeprefix("s3://")]  # the write check's probe is gone
    assert fs.cat_file(url) == reference


@pytest.fixture
def broken_bundle(tmp_path, tiny_bundle, request) -> str:
    """A copy of the tiny bundle with one file overwritten by ``request.param`` = (file, bytes)."""
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    name, data = request.param
    (path / name).write_bytes(data)
    return str(path)


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mav: error: ")
    return lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", " ", "--out", "{tmp}/a.mp4", "--preset", "{preset}"], "prompt 1 is empty"),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "nope"], "unknown preset 'nope'; available: "),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{tmp}/missing.yaml"], "{tmp}/missing.yaml: no such file"),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{tmp}/bad.yaml"], "{tmp}/bad.yaml: invalid YAML at line 2"),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{tmp}/colour.yaml"],
         "preset {tmp}/colour.yaml: unknown config key 'decoder.colour'"),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--checkpoint", "{tmp}/nowhere"], "cannot read checkpoint {tmp}/nowhere: no clip/config.yaml"),
        (["generate", "a", "--out", "{tmp}/file/a.mp4", "--preset", "{preset}"], "cannot write to {tmp}/file/a.mp4: {tmp}/file is not a directory"),
        (["generate", "a", "--out", "{tmp}/file/sub/a.mp4", "--preset", "{preset}"], "cannot write to {tmp}/file/sub/a.mp4: "),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{preset}", "--fps", "0"], "--fps: must be an integer in 1..30, got 0"),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{preset}", "--fps", "31"], "--fps: must be an integer in 1..30, got 31"),
        (["generate", "a", "b", "--out", "{tmp}/a.mp4", "--preset", "{preset}"], "--out {tmp}/a.mp4: several prompts need a directory"),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{preset}", "--seed", "-1"], "--seed must be in 0.."),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{preset}", "--steps", "0"], "--steps: must be an integer in 1..1000"),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{preset}", "--guidance", "nan"], "--guidance: must be a number"),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{preset}", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{preset}", "--motion", "0.6", "0"],
         "--motion: must be two numbers [dy, dx] in -0.5..0.5 (frame sizes per keyframe), got (0.6, 0.0)"),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{preset}", "--motion", "nan", "0"], "--motion: must be two numbers"),
        (["generate", "a", "--out", "{tmp}/a.mp4", "--preset", "{preset}", "--motion", "0.1", "0"],
         "--motion: motion guidance moves the noise's common part, and this model's decoder D^t shares no noise"),
    ],
    ids=["empty-prompt", "unknown-preset", "missing-preset-file", "invalid-preset-yaml", "unknown-preset-key",
         "missing-checkpoint", "out-under-a-file", "out-deeper-under-a-file", "fps-0", "fps-31", "prompts-into-mp4",
         "negative-seed", "steps-0", "guidance-nan", "batch-size-0", "motion-too-fast", "motion-nan",
         "motion-without-shared-noise"],
)
def test_usage_errors_are_one_line(argv, message, tmp_path, tiny_preset_file):
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "bad.yaml").write_text("decoder: [1, 2\n")
    (tmp_path / "colour.yaml").write_text("decoder: {colour: red}\n")
    fill = {"tmp": str(tmp_path), "preset": tiny_preset_file}
    code, err = run_mav([a.format(**fill) for a in argv])
    assert code == EXIT_USAGE
    assert _one_error_line(err).startswith(f"mav: error: {message.format(**fill)}")
    assert not list(tmp_path.rglob("*.mp4"))


def test_missing_bucket_is_a_usage_error(s3_server, tmp_path, tiny_preset_file):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/videos/a.mp4"
    code, err = run_mav(["generate", "a", "--out", url, "--preset", tiny_preset_file])
    assert code == EXIT_USAGE
    assert _one_error_line(err).startswith(f"mav: error: cannot write to {url}: ")


@pytest.mark.parametrize(
    "broken_bundle, message",
    [
        pytest.param(("prior/config.yaml", b"layers: [1, 2\n"), "cannot read checkpoint {bundle}: prior: invalid YAML",
                     ),
        (("decoder/config.yaml", b"colour: red\n"), "cannot read checkpoint {bundle}: unknown config key 'decoder.colour'"),
    ],
    indirect=["broken_bundle"],
    ids=["invalid-yaml", "unknown-key"],
)
def test_unreadable_checkpoint_config(broken_bundle, message, tmp_path):
    code, err = run_mav(["generate", "a", "--out", str(tmp_path / "a.mp4"), "--checkpoint", broken_bundle])
    assert code == EXIT_USAGE
    assert _one_error_line(err).startswith(f"mav: error: {message.format(bundle=broken_bundle)}")
    assert not list(tmp_path.rglob("*.mp4"))


@pytest.mark.parametrize("broken_bundle", [("sr_high/model.safetensors", b"\x00" * 7)], indirect=True, ids=["garbage"])
def test_corrupt_checkpoint_weights(broken_bundle, tmp_path):
    """Weights are read when the networks load, before anything is announced: the error is the only line."""
    code, err = run_mav(["generate", "a", "--out", str(tmp_path / "a.mp4"), "--checkpoint", broken_bundle, "--seed", "9"])
    assert code == EXIT_USAGE
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mav: error: cannot read checkpoint {broken_bundle}: sr_high/model.safetensors: ")
    assert not list(tmp_path.rglob("*.mp4"))


def test_errors_in_a_real_process_are_one_line(tmp_path):
    """No import-time warnings or log lines reach stderr before the error."""
    mav = Path(sys.executable).with_name("mav")
    proc = subprocess.run([str(mav), "generate", "a", "--out", str(tmp_path / "a.mp4"), "--checkpoint", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr == f"mav: error: cannot read checkpoint {tmp_path / 'nowhere'}: no clip/config.yaml\n"


def test_progress_goes_to_the_current_stderr():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        StageBars()("clip", 1, 1)
    assert err.getvalue().startswith("[1/6] text encoder")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_live_bar_per_stage():
    """On a terminal each stage is a tqdm bar redrawn in place (carriage returns), one finished line each."""
    out = Terminal()
    bars = StageBars(out)
    for step in range(1, 4):
        bars("decoder", step, 3)
    bars("interpolation", 1, 1)
    text = out.getvalue()
    assert "\r" in text
    finished = [part for part in text.split("\n") if part.strip()]
    assert len(finished) == 2
    assert "[3/6] decoder D^t" in finished[0] and "3/3" in finished[0].rsplit("\r", 1)[-1]
    assert "[4/6] interpolation ↑F" in finished[1]


def test_progress_in_a_log_is_one_line_per_stage_and_periodic_while_it_runs():
    out = io.StringIO()
    bars = StageBars(out, every=0.0)
    for step in range(1, 4):
        bars("sr_low", step, 3)
    lines = out.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == [f"[5/6] SR_l^t           {i}/3 steps" for i in (1, 2, 3)]
    quiet = io.StringIO()
    bars = StageBars(quiet, every=3600)
    for step in range(1, 4):
        bars("sr_low", step, 3)
    assert len(quiet.getvalue().splitlines()) == 1  # only the finished stage
