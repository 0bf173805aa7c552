"""``mav eval`` on the smoke recipe's bundle: both models judged per prompt and overall, the keyframes with
``--until decoder``, motion guidance recorded and labelled, prompts it cannot judge refused."""

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from stages.checkpoint import load_bundle_config
from workflows import shapes
from workflows.errors import CliError
from workflows.shapes import evaluate
from workflows.shapes.world import SPEED
from workflows.video import decode_mp4

from .conftest import HELD, smoke_recipe

pytestmark = pytest.mark.timeout(600)


def run_eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mav")
    shapes.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def report(bundle, tmp_path_factory):
    out, _ = bundle
    d = tmp_path_factory.mktemp("eval")
    prompts = d / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in [
        {"id": "a", "prompt": "a green circle on a white background", "seed": 1},
        {"id": "b", "prompt": "a red triangle on a white background", "seed": 2},
        {"id": "c", "prompt": "A Purple SQUARE.", "seed": 3},
    ]) + "\n")
    assert run_eval(["--checkpoint", out, "--prompts", str(prompts), "--out", str(d / "out"), "--judge-videos", "6",
                     "--batch-size", "2"]) == 0
    return d / "out", json.loads((d / "out" / "report.json").read_text())


def test_eval_reports_both_models_per_prompt_and_overall(report, bundle):
    out_dir, rep = report
    assert rep["holdout"] == sorted(HELD)
    assert (rep["sampling"], rep["motion"], rep["guided_prompts"]) == ("learned-only", None, 0)
    assert set(rep["models"]) == {"video", "image_baseline"}
    assert rep["models"]["image_baseline"]["stages"]["decoder"].endswith("_image")
    assert rep["models"]["image_baseline"]["stages"]["interpolation"] == bundle[0]
    for m in rep["models"].values():
        assert m["overall"]["videos"] == 3 and m["seen"]["videos"] == 2 and m["held_out"]["videos"] == 1
        for key in ("colour_accuracy", "shape_accuracy", "colour_identity", "shape_identity", "present"):
            assert 0 <= m["overall"][key] <= 1
        rows = {r["id"]: r for r in m["prompts"]}
        for rid, expected in (("b", ("red", "triangle", True)), ("c", ("purple", "square", False))):
            assert (rows[rid]["target_colour"], rows[rid]["target_shape"], rows[rid]["held_out"]) == expected
        for r in m["prompts"]:
            assert r["video"].startswith(str(out_dir)) and Path(r["video"]).stat().st_size > 0
            assert r["motion"] is None
    judge = rep["judge"]
    assert judge["videos"] == 6 and judge["frame_colour_accuracy"] == 1.0 and judge["frame_shape_accuracy"] == 1.0
    for name in ("report.png", "samples.png"):
        assert Image.open(out_dir / name).format == "PNG"
    frames, fps = decode_mp4(Path(rep["models"]["video"]["prompts"][0]["video"]).read_bytes())
    gif = Image.open(out_dir / "samples.gif")  # the trained model's videos, playing at their own rate
    assert gif.format == "GIF" and gif.n_frames == len(frames) and gif.info["duration"] == round(1000 / fps)
    assert gif.size[0] == 3 * (2 * frames.shape[2] + 4)


def test_eval_until_decoder_judges_the_keyframes_and_labels_motion_guidance(bundle, tmp_path, capsys):
    """``--until decoder``: D^t's keyframes are judged, against ground truth at the keyframes' rate.
    ``--motion``: every prompt guided, and the report and the summary say so."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a blue square on a white background", "seed": 4}) + "\n")
    assert run_eval(["--checkpoint", bundle[0], "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                     "--until", "decoder", "--no-baseline", "--judge-videos", "3", "--motion", "0", "0.1"]) == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["until"] == "decoder" and set(rep["models"]) == {"video"}
    assert (rep["sampling"], rep["motion"], rep["guided_prompts"]) == ("motion-guided", [0.0, 0.1], 1)
    assert rep["models"]["video"]["prompts"][0]["motion"] == pytest.approx([0.0, 0.1])
    assert "sampling: motion-guided (--motion 0 0.1; 1 of 1 prompts guided)" in capsys.readouterr().err
    frames, fps = decode_mp4(Path(rep["models"]["video"]["prompts"][0]["video"]).read_bytes())
    d = load_bundle_config(bundle[0]).decoder
    assert frames.shape[:3] == (d.frames, d.size, d.size) and fps == 5
    assert (rep["judge"]["size"], rep["judge"]["frames"], rep["judge"]["fps"]) == (d.size, d.frames, 5.0)
    # The ground truth moves at the speeds of the recipe's videos.
    assert rep["judge"]["speed"] == list(smoke_recipe().data.speed)


def test_eval_refuses_prompts_it_cannot_judge(bundle, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball bouncing\n")
    with pytest.raises(CliError, match="one colour .* and one shape"):
        run_eval(["--checkpoint", bundle[0], "--prompts", str(prompts), "--out", str(tmp_path / "o")])
    with pytest.raises(CliError, match="pink"):
        run_eval(["--checkpoint", bundle[0], "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                  "--holdout", "pink circle"])
    with pytest.raises(CliError, match="motion"):
        run_eval(["--checkpoint", bundle[0], "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                  "--motion", "0", "2"])


def test_motion_given_on_the_command_line_guides_the_rows_without_their_own(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "a red circle on a white background", "motion": [0.1, 0.0]},
        {"prompt": "a blue square on a white background"},
    ]) + "\n")
    spec = evaluate.EvalSpec(checkpoint=str(tmp_path), prompts=(str(prompts),), out=str(tmp_path / "o"))
    learned = evaluate.read_requests(spec)
    assert [r.motion for r in learned] == [(0.1, 0.0), None] and evaluate.sampling(learned) == "motion-guided"
    guided = evaluate.read_requests(dataclasses.replace(spec, motion=(0.0, -0.2)))
    assert [r.motion for r in guided] == [(0.1, 0.0), (0.0, -0.2)]
    assert evaluate.sampling(learned[1:]) == "learned-only"


def test_eval_judges_against_ground_truth_at_the_recipes_speed(tmp_path):
    assert evaluate.default_speed(str(tmp_path)) == SPEED  # no recipe.json: the world's speeds
    (tmp_path / "_recipe").mkdir()
    (tmp_path / "_recipe" / "recipe.json").write_text(json.dumps({"settings": {"data": {"speed": [0.1, 0.3]}}}))
    assert evaluate.default_speed(str(tmp_path)) == (0.1, 0.3)
