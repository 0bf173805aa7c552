"""The renderer: shapes moving at the speed asked for, and the checks of what users name in the world."""

import numpy as np
import pytest

from workflows.shapes.judge import judge_frames
from workflows.shapes.world import FPS, moving_video, parse_holdout, prompt_target


def test_videos_move_at_the_given_speed():
    """Frame widths per second at the renderer's FPS: the centroid's step per frame is speed / FPS."""
    for speed in (0.1, 0.4):
        steps = []
        for seed in range(6):
            video = moving_video(np.random.default_rng(seed), 64, 31, "red", "square", (speed, speed))
            c = judge_frames(video)["centroid"]
            steps.append(np.linalg.norm(c[1:] - c[:-1], axis=1).mean())  # a bounce keeps the path's length
        assert abs(np.median(steps) - speed / FPS) < 0.15 * speed / FPS


def test_holdouts_and_prompts_are_read_in_the_worlds_words():
    assert parse_holdout(["red triangle"]) == [("red", "triangle")]
    with pytest.raises(ValueError, match="pink"):
        parse_holdout(["pink circle"])
    assert prompt_target("A Purple SQUARE.") == ("purple", "square")
    with pytest.raises(ValueError, match="one colour .* and one shape"):
        prompt_target("a red ball bouncing")
