"""``mav eval``'s pictures from a report of ground-truth videos: figures a group lacks are left out, not
drawn as zero or a crash."""

import io

import numpy as np
from PIL import Image

from workflows.pipeline import Request
from workflows.shapes.figures import plot, sample_gif, sample_sheet
from workflows.shapes.judge import judge_accuracy, judge_frames, summarise, video_metrics
from workflows.shapes.world import moving_video


def test_report_and_samples_draw_with_a_group_that_has_no_videos():
    rng = np.random.default_rng(0)
    targets = [("red", "circle"), ("blue", "square")]
    videos = [moving_video(rng, 32, 6, c, s) for c, s in targets]
    rows = [video_metrics(judge_frames(v), c, s) for v, (c, s) in zip(videos, targets)]
    groups = {"overall": summarise(rows), "seen": summarise(rows), "held_out": summarise([])}
    assert groups["held_out"]["colour_accuracy"] is None
    report = {"checkpoint": "models/shapes", "until": "sr_high", "sampling": "learned-only",
              "models": {"video": groups, "image_baseline": groups}, "judge": judge_accuracy(32, 6, 2)}
    assert Image.open(io.BytesIO(plot(report))).format == "PNG"
    requests = [Request(prompt=f"a {c} {s}") for c, s in targets]
    sheet = Image.open(io.BytesIO(sample_sheet({"video": videos, "image_baseline": videos}, requests, frames=4)))
    assert sheet.format == "PNG"
    gif = Image.open(io.BytesIO(sample_gif(videos, requests, fps=5)))
    assert gif.n_frames == 6 and gif.info["duration"] == 200 and gif.size == (2 * (2 * 32 + 4), 2 * 32 + 14 + 4)
