"""The judge: colour, shape, objects and position per frame, and the motion figures per video, exact on
ground truth rendered by the world and telling jumps, jitter and bounces from smooth motion."""

import numpy as np
import pytest

from workflows.shapes.judge import judge_accuracy, judge_frames, summarise, video_metrics
from workflows.shapes.world import COLOURS, SHAPES, draw, moving_video


def test_judge_reference_moves_at_the_rate_of_the_judged_videos():
    at_30, at_5 = judge_accuracy(64, 16, 12), judge_accuracy(64, 16, 12, fps=5)
    assert (at_30["fps"], at_5["fps"]) == (30.0, 5.0)
    # The same objects every sixth frame: six times the step per frame, less where a bounce cut a step short.
    ratio = at_5["reference"]["displacement_mean"] / at_30["reference"]["displacement_mean"]
    assert 5.0 < ratio <= 6.05


@pytest.mark.parametrize("size", [32, 64])
def test_judge_is_exact_on_ground_truth_videos(size):
    j = judge_accuracy(size, 76, 54)
    assert j["frame_colour_accuracy"] == 1.0 and j["frame_shape_accuracy"] == 1.0
    assert j["fill"]["square"]["min"] == 1.0
    assert j["fill"]["triangle"]["max"] < j["fill"]["circle"]["min"]
    assert j["reference"]["present"] == 1.0 and j["reference"]["colour_identity"] == 1.0
    assert j["reference"]["one_object"] == 1.0


def test_judge_reads_colour_shape_and_position_of_one_frame():
    for colour in COLOURS:
        for shape in SHAPES:
            frame = draw(shape, colour, cx=20.0, cy=40.0, r=12.0, size=64)
            j = judge_frames(frame.transpose(2, 0, 1)[:, None])
            assert (list(COLOURS)[j["colour"][0]], SHAPES[j["shape"][0]]) == (colour, shape)
            assert abs(j["centroid"][0, 0] - 20 / 64) < 0.01
    blank = np.full((3, 2, 64, 64), 255, np.uint8)
    m = video_metrics(judge_frames(blank), "red", "circle")
    assert m["present"] == 0.0 and not m["colour_ok"] and m["displacement_mean"] is None


def test_judge_counts_the_objects_of_a_frame():
    """A second object, or a speck too small to be one, in frames of one moving square."""
    rng = np.random.default_rng(1)
    video = moving_video(rng, 64, 4, "blue", "square").copy()
    second = draw("circle", "blue", cx=8.0, cy=8.0, r=6.0, size=64).transpose(2, 0, 1)
    video[:, 1] = np.minimum(video[:, 1], second)
    video[:, 2, 0:5, 59:64] = 0  # a 5x5 speck (25 pixels): foreground, too small for an object
    j = judge_frames(video)
    assert j["objects"].tolist()[:3] == [1, 2, 1]
    assert video_metrics(j, "blue", "square")["one_object"] == 0.75


def test_independent_frames_score_worse_coherence_than_motion():
    rng = np.random.default_rng(0)
    moving = video_metrics(judge_frames(moving_video(rng, 64, 16, "blue", "square")),
                                    "blue", "square")
    jumps = np.concatenate([moving_video(rng, 64, 1, "blue", "square") for _ in range(16)], axis=1)
    jumping = video_metrics(judge_frames(jumps), "blue", "square")
    assert jumping["displacement_mean"] > 3 * moving["displacement_mean"]
    assert jumping["acceleration_mean"] > 3 * moving["acceleration_mean"]
    assert jumping["largest_step"] > 3 * moving["largest_step"]


def test_largest_step_catches_one_jump_in_smooth_motion():
    xs = [16 + 2 * t for t in range(6)] + [44 + 2 * t for t in range(6)]  # 2 px a frame, one jump of 18 px
    video = np.stack([draw("square", "green", x, 32, 6, 64) for x in xs]).transpose(3, 0, 1, 2)
    m = video_metrics(judge_frames(video), "green", "square")
    assert abs(m["largest_step"] - 18 / 64) < 0.01 and m["jump"]
    assert m["displacement_mean"] < 0.5 * m["largest_step"]
    smooth = np.stack([draw("square", "green", 16 + 2 * t, 32, 6, 64) for t in range(12)]).transpose(3, 0, 1, 2)
    s = video_metrics(judge_frames(smooth), "green", "square")
    assert not s["jump"]
    report = summarise([m, m])
    assert report["largest_step"] == pytest.approx(m["largest_step"])
    mixed = summarise([m, m, s, s])
    assert mixed["largest_step"] == pytest.approx((m["largest_step"] + s["largest_step"]) / 2)
    assert mixed["jump"] == 0.5  # the share of videos with a jump


def test_a_jump_across_frames_without_the_object_is_a_step():
    """Smooth motion, the object gone for three frames, back 20 px away: one step, not an unseen one."""
    xs = [16 + 2 * t for t in range(6)] + [None] * 3 + [46 + 2 * t for t in range(6)]
    blank = np.full((64, 64, 3), 255, np.uint8)
    video = np.stack([draw("square", "green", x, 32, 6, 64) if x else blank for x in xs]).transpose(3, 0, 1, 2)
    m = video_metrics(judge_frames(video), "green", "square")
    assert m["present"] == pytest.approx(12 / 15)
    assert abs(m["largest_step"] - 20 / 64) < 0.01
    assert m["straightness"] == pytest.approx(1.0, abs=0.01) and abs(m["travel"] - 40 / 64) < 0.01


def test_straightness_tells_motion_from_jitter_in_place():
    line = np.stack([draw("circle", "red", 16 + 2 * t, 32, 8, 64) for t in range(12)]).transpose(3, 0, 1, 2)
    straight = video_metrics(judge_frames(line), "red", "circle")
    assert straight["straightness"] > 0.95 and abs(straight["travel"] - 22 / 64) < 0.02
    jitter = np.stack([draw("circle", "red", 32 + 2 * (-1) ** t, 32, 8, 64) for t in range(12)]).transpose(3, 0, 1, 2)
    shaking = video_metrics(judge_frames(jitter), "red", "circle")
    assert shaking["straightness"] < 0.1 and shaking["displacement_mean"] > 0.05
    assert abs(straight["reach"] - 22 / 64) < 0.02 and shaking["reach"] < 5 / 64


def test_reach_tells_a_bounce_from_standing_still():
    """Across the frame and back: it travels nowhere, but it reached 24 px from where it started."""
    xs = [16 + 4 * t for t in range(7)] + [40 - 4 * t for t in range(1, 7)]
    bounce = np.stack([draw("square", "blue", x, 32, 6, 64) for x in xs]).transpose(3, 0, 1, 2)
    m = video_metrics(judge_frames(bounce), "blue", "square")
    assert m["travel"] < 0.01 and abs(m["reach"] - 24 / 64) < 0.01 and m["straightness"] < 0.01


def test_judge_reference_moves_at_the_speed_of_the_ground_truth():
    slow, fast = (judge_accuracy(64, 16, 12, fps=5, speed=s) for s in ((0.1, 0.1), (0.4, 0.4)))
    assert (slow["speed"], fast["speed"]) == ([0.1, 0.1], [0.4, 0.4])
    ratio = fast["reference"]["displacement_mean"] / slow["reference"]["displacement_mean"]
    assert 3.0 < ratio <= 4.1  # four times the speed, less where a bounce cut a step short
