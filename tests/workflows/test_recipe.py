"""`mav recipe` at smoke size on a real local Ray instance, then `mav eval` on its bundle; the eval's judge
on ground-truth synthetic videos."""

import argparse
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.checkpoint import load_bundle_config, load_stage_config
from stages.config import ConfigError
from workflows import evaluate, recipe
from workflows.synth import COLOURS, SHAPES, draw, moving_video, parse_holdout, synth
from workflows.video import decode_mp4

pytestmark = pytest.mark.timeout(600)

HELD = ("red triangle", "blue circle", "yellow square")


def smoke_recipe() -> recipe.RecipeConfig:
    """The shipped smoke recipe (cluster/recipes/shapes-smoke.yaml: the shapes preset, every step of the full
    recipe on a handful of items and steps)."""
    return recipe.load_recipe(recipe.recipe_path("shapes", "smoke"))


@pytest.fixture(scope="module")
def bundle(ray_session, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("recipe") / "shapes")
    state = recipe.run_recipe(smoke_recipe(), out, log=lambda text: None)
    return out, state


def run_eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mav")
    evaluate.add_parsers(parser.add_subparsers(dest="command", required=True))
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


def test_recipe_trains_every_stage_in_the_papers_order_into_one_bundle(bundle):
    out, state = bundle
    assert list(state["steps"]) == ["synth", "clip", "prior", "decoder", "sr-low", "sr-high", "keep-image-stages",
                                    "decoder-video", "sr-low-video", "interpolation"]
    assert all(s["seconds"] >= 0 for s in state["steps"].values())
    assert state["settings"]["holdout"] == list(HELD)
    load_bundle_config(out)  # every stage present and chained
    assert load_stage_config(out, "decoder").unet.temporal
    assert load_stage_config(out, "sr_low").unet.temporal
    assert not load_stage_config(f"{out}/_image", "decoder").unet.temporal  # the image-only baseline's D
    assert not load_stage_config(f"{out}/_image", "sr_low").unet.temporal
    assert recipe.read_state(out) == state


def test_captions_leave_the_held_out_combinations_out(bundle):
    _, state = bundle
    captions = set()
    for path in (Path(state["data"]) / "images").glob("*.parquet"):
        captions |= set(pq.read_table(path).column("caption").to_pylist())
    for colour, shape in parse_holdout(HELD):
        assert f"a {colour} {shape} on a white background" not in captions
    assert captions


def test_rerun_skips_finished_steps_and_other_settings_are_refused(bundle):
    out, state = bundle
    lines = []
    again = recipe.run_recipe(smoke_recipe(), out, log=lines.append)
    assert again["steps"] == state["steps"]
    assert sum("skipped" in line for line in lines) == len(recipe.RECIPE_ORDER)
    other = dataclasses.replace(smoke_recipe(), holdout=("green square",))
    with pytest.raises(ConfigError, match="other settings"):
        recipe.run_recipe(other, out)


def test_recipe_files_are_checked(tmp_path):
    for text, match in [("stages: {decoder-vidoe: {max_steps: 1}}", "decoder-vidoe"),
                        ("holdout: [pink circle]", "pink circle"),
                        ("train: {max_stepz: 3}", "max_stepz"),
                        ("data: {imagez: 3}", "imagez"),
                        ("data: {speed: [0.5, 0.1]}", "data: speed")]:
        path = tmp_path / "r.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            recipe.load_recipe(str(path))
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe.recipe_path("spheres")
    full = recipe.load_recipe(recipe.recipe_path("shapes"))
    assert full.holdout == HELD and full.stages["decoder-video"].frames == 16


def test_eval_reports_both_models_per_prompt_and_overall(report, bundle):
    out_dir, rep = report
    assert rep["holdout"] == sorted(HELD)
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
    judge = rep["judge"]
    assert judge["videos"] == 6 and judge["frame_colour_accuracy"] == 1.0 and judge["frame_shape_accuracy"] == 1.0
    for name in ("report.png", "samples.png"):
        assert Image.open(out_dir / name).format == "PNG"
    frames, fps = decode_mp4(Path(rep["models"]["video"]["prompts"][0]["video"]).read_bytes())
    gif = Image.open(out_dir / "samples.gif")  # the trained model's videos, playing at their own rate
    assert gif.format == "GIF" and gif.n_frames == len(frames) and gif.info["duration"] == round(1000 / fps)
    assert gif.size[0] == 3 * (2 * frames.shape[2] + 4)


def test_eval_until_decoder_judges_the_keyframes(bundle, tmp_path):
    """``--until decoder``: D^t's keyframes are judged, against ground truth at the keyframes' rate."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a blue square on a white background", "seed": 4}) + "\n")
    assert run_eval(["--checkpoint", bundle[0], "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                     "--until", "decoder", "--no-baseline", "--judge-videos", "3"]) == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["until"] == "decoder" and set(rep["models"]) == {"video"}
    frames, fps = decode_mp4(Path(rep["models"]["video"]["prompts"][0]["video"]).read_bytes())
    d = load_bundle_config(bundle[0]).decoder
    assert frames.shape[:3] == (d.frames, d.size, d.size) and fps == 5
    assert (rep["judge"]["size"], rep["judge"]["frames"], rep["judge"]["fps"]) == (d.size, d.frames, 5.0)
    # The ground truth moves at the speeds of the recipe's videos.
    assert rep["judge"]["speed"] == list(smoke_recipe().data.speed)


def test_judge_reference_moves_at_the_rate_of_the_judged_videos():
    at_30, at_5 = evaluate.judge_accuracy(64, 16, 12), evaluate.judge_accuracy(64, 16, 12, fps=5)
    assert (at_30["fps"], at_5["fps"]) == (30.0, 5.0)
    # The same objects every sixth frame: six times the step per frame, less where a bounce cut a step short.
    ratio = at_5["reference"]["displacement_mean"] / at_30["reference"]["displacement_mean"]
    assert 5.0 < ratio <= 6.05


def test_eval_refuses_prompts_it_cannot_judge(bundle, tmp_path):
    from workflows.errors import CliError

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball bouncing\n")
    with pytest.raises(CliError, match="one colour .* and one shape"):
        run_eval(["--checkpoint", bundle[0], "--prompts", str(prompts), "--out", str(tmp_path / "o")])
    with pytest.raises(CliError, match="pink"):
        run_eval(["--checkpoint", bundle[0], "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                  "--holdout", "pink circle"])


@pytest.mark.parametrize("size", [32, 64])
def test_judge_is_exact_on_ground_truth_synth_videos(size):
    j = evaluate.judge_accuracy(size, 76, 54)
    assert j["frame_colour_accuracy"] == 1.0 and j["frame_shape_accuracy"] == 1.0
    assert j["fill"]["square"]["min"] == 1.0
    assert j["fill"]["triangle"]["max"] < j["fill"]["circle"]["min"]
    assert j["reference"]["present"] == 1.0 and j["reference"]["colour_identity"] == 1.0
    assert j["reference"]["one_object"] == 1.0


def test_judge_reads_colour_shape_and_position_of_one_frame():
    for colour in COLOURS:
        for shape in SHAPES:
            frame = draw(shape, colour, cx=20.0, cy=40.0, r=12.0, size=64)
            j = evaluate.judge_frames(frame.transpose(2, 0, 1)[:, None])
            assert (list(COLOURS)[j["colour"][0]], SHAPES[j["shape"][0]]) == (colour, shape)
            assert abs(j["centroid"][0, 0] - 20 / 64) < 0.01
    blank = np.full((3, 2, 64, 64), 255, np.uint8)
    m = evaluate.video_metrics(evaluate.judge_frames(blank), "red", "circle")
    assert m["present"] == 0.0 and not m["colour_ok"] and m["displacement_mean"] is None


def test_judge_counts_the_objects_of_a_frame():
    """A second object, or a speck too small to be one, in frames of one moving square."""
    rng = np.random.default_rng(1)
    video = moving_video(rng, 64, 4, "blue", "square").copy()
    second = draw("circle", "blue", cx=8.0, cy=8.0, r=6.0, size=64).transpose(2, 0, 1)
    video[:, 1] = np.minimum(video[:, 1], second)
    video[:, 2, 0:5, 59:64] = 0  # a 5x5 speck (25 pixels): foreground, too small for an object
    j = evaluate.judge_frames(video)
    assert j["objects"].tolist()[:3] == [1, 2, 1]
    assert evaluate.video_metrics(j, "blue", "square")["one_object"] == 0.75


def test_independent_frames_score_worse_coherence_than_motion():
    rng = np.random.default_rng(0)
    moving = evaluate.video_metrics(evaluate.judge_frames(moving_video(rng, 64, 16, "blue", "square")),
                                    "blue", "square")
    jumps = np.concatenate([moving_video(rng, 64, 1, "blue", "square") for _ in range(16)], axis=1)
    jumping = evaluate.video_metrics(evaluate.judge_frames(jumps), "blue", "square")
    assert jumping["displacement_mean"] > 3 * moving["displacement_mean"]
    assert jumping["acceleration_mean"] > 3 * moving["acceleration_mean"]
    assert jumping["largest_step"] > 3 * moving["largest_step"]


def test_largest_step_catches_one_jump_in_smooth_motion():
    from workflows.synth import draw

    xs = [16 + 2 * t for t in range(6)] + [44 + 2 * t for t in range(6)]  # 2 px a frame, one jump of 18 px
    video = np.stack([draw("square", "green", x, 32, 6, 64) for x in xs]).transpose(3, 0, 1, 2)
    m = evaluate.video_metrics(evaluate.judge_frames(video), "green", "square")
    assert abs(m["largest_step"] - 18 / 64) < 0.01 and m["jump"]
    assert m["displacement_mean"] < 0.5 * m["largest_step"]
    smooth = np.stack([draw("square", "green", 16 + 2 * t, 32, 6, 64) for t in range(12)]).transpose(3, 0, 1, 2)
    s = evaluate.video_metrics(evaluate.judge_frames(smooth), "green", "square")
    assert not s["jump"]
    report = evaluate.summarise([m, m])
    assert report["largest_step"] == pytest.approx(m["largest_step"])
    mixed = evaluate.summarise([m, m, s, s])
    assert mixed["largest_step"] == pytest.approx((m["largest_step"] + s["largest_step"]) / 2)
    assert mixed["jump"] == 0.5  # the share of videos with a jump


def test_a_jump_across_frames_without_the_object_is_a_step():
    """Smooth motion, the object gone for three frames, back 20 px away: one step, not an unseen one."""
    from workflows.synth import draw

    xs = [16 + 2 * t for t in range(6)] + [None] * 3 + [46 + 2 * t for t in range(6)]
    blank = np.full((64, 64, 3), 255, np.uint8)
    video = np.stack([draw("square", "green", x, 32, 6, 64) if x else blank for x in xs]).transpose(3, 0, 1, 2)
    m = evaluate.video_metrics(evaluate.judge_frames(video), "green", "square")
    assert m["present"] == pytest.approx(12 / 15)
    assert abs(m["largest_step"] - 20 / 64) < 0.01
    assert m["straightness"] == pytest.approx(1.0, abs=0.01) and abs(m["travel"] - 40 / 64) < 0.01


def test_straightness_tells_motion_from_jitter_in_place():
    from workflows.synth import draw

    line = np.stack([draw("circle", "red", 16 + 2 * t, 32, 8, 64) for t in range(12)]).transpose(3, 0, 1, 2)
    straight = evaluate.video_metrics(evaluate.judge_frames(line), "red", "circle")
    assert straight["straightness"] > 0.95 and abs(straight["travel"] - 22 / 64) < 0.02
    jitter = np.stack([draw("circle", "red", 32 + 2 * (-1) ** t, 32, 8, 64) for t in range(12)]).transpose(3, 0, 1, 2)
    shaking = evaluate.video_metrics(evaluate.judge_frames(jitter), "red", "circle")
    assert shaking["straightness"] < 0.1 and shaking["displacement_mean"] > 0.05
    assert abs(straight["reach"] - 22 / 64) < 0.02 and shaking["reach"] < 5 / 64


def test_reach_tells_a_bounce_from_standing_still():
    """Across the frame and back: it travels nowhere, but it reached 24 px from where it started."""
    from workflows.synth import draw

    xs = [16 + 4 * t for t in range(7)] + [40 - 4 * t for t in range(1, 7)]
    bounce = np.stack([draw("square", "blue", x, 32, 6, 64) for x in xs]).transpose(3, 0, 1, 2)
    m = evaluate.video_metrics(evaluate.judge_frames(bounce), "blue", "square")
    assert m["travel"] < 0.01 and abs(m["reach"] - 24 / 64) < 0.01 and m["straightness"] < 0.01


def test_synth_videos_move_at_the_given_speed(tmp_path):
    """Frame widths per second at the renderer's FPS: the centroid's step per frame is speed / FPS."""
    from workflows.synth import FPS

    for speed in (0.1, 0.4):
        steps = []
        for seed in range(6):
            video = moving_video(np.random.default_rng(seed), 64, 31, "red", "square", (speed, speed))
            c = evaluate.judge_frames(video)["centroid"]
            steps.append(np.linalg.norm(c[1:] - c[:-1], axis=1).mean())  # a bounce keeps the path's length
        assert abs(np.median(steps) - speed / FPS) < 0.15 * speed / FPS
    for bad, match in (((0.3, 0.1), "low <= high"), ((0.0, 0.1), "0 < low"), (("fast",), "two numbers")):
        with pytest.raises(ValueError, match=match):
            synth(str(tmp_path / "x"), images=0, videos=1, speed=bad)
    assert not (tmp_path / "x").exists()


def test_eval_judges_against_ground_truth_at_the_recipes_speed(tmp_path):
    from workflows.synth import SPEED

    assert evaluate.default_speed(str(tmp_path)) == SPEED  # no recipe.json: synth.py's speeds
    (tmp_path / "_recipe").mkdir()
    (tmp_path / "_recipe" / "recipe.json").write_text(json.dumps({"settings": {"data": {"speed": [0.1, 0.3]}}}))
    assert evaluate.default_speed(str(tmp_path)) == (0.1, 0.3)
    slow, fast = (evaluate.judge_accuracy(64, 16, 12, fps=5, speed=s) for s in ((0.1, 0.1), (0.4, 0.4)))
    assert (slow["speed"], fast["speed"]) == ([0.1, 0.1], [0.4, 0.4])
    ratio = fast["reference"]["displacement_mean"] / slow["reference"]["displacement_mean"]
    assert 3.0 < ratio <= 4.1  # four times the speed, less where a bounce cut a step short


def test_synth_holdout_is_checked_and_leaves_pairs_out(tmp_path):
    with pytest.raises(ValueError, match="pink"):
        parse_holdout(["pink circle"])
    with pytest.raises(ValueError, match="not a palette colour"):
        synth(str(tmp_path / "x"), images=1, videos=0, holdout=[("red", "cube")])
    synth(str(tmp_path / "d"), images=40, videos=0, size=16, holdout=[(c, "circle") for c in COLOURS])
    captions = pq.read_table(tmp_path / "d" / "images" / "part-00000.parquet").column("caption").to_pylist()
    assert len(captions) == 40 and not any("circle" in c for c in captions)
    img = Image.open(io.BytesIO(pq.read_table(tmp_path / "d" / "images" / "part-00000.parquet")
                                .column("image")[0].as_py()))
    assert img.size == (16, 16)
