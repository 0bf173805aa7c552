"""``POST /v1/edits`` over real HTTP on the session's application: bad uploads answered 422/413 with a message
and nothing left behind; a good edit tuned (Ray Train inside the tuner deployment, two steps) and run through
the stage deployments; a second edit refused with 503 while the one tuner replica is busy."""

import os
import tempfile

import fsspec
import numpy as np
import pytest

from stages.config import STAGE_NAMES
from workflows.shapes import world
from workflows.video import decode_mp4, encode_mp4

from .conftest import CLIP_LIMITS
from .helpers import is_mp4, wait_edit

CAPTION = "a red circle on a white background"
PROMPTS = ["a blue square on a white background", "a green triangle on a white background"]


def clip(frames: int = 12, size: int = 32, fps: float = 30) -> bytes:
    """A red circle moving on white."""
    return encode_mp4(world.moving_video(np.random.default_rng(0), size, frames, "red", "circle"), fps)


def form(**fields) -> dict:
    return {"caption": CAPTION, "prompt": PROMPTS[:1], "tune_steps": "2", "fps": "10", **fields}


def leftovers(serve_app) -> list[str]:
    """What rejected or finished edits could have left: work directories, decoded clips, videos in the output."""
    fs, root = fsspec.core.url_to_fs(f"{serve_app.output}/edits")
    written = fs.find(root) if fs.exists(root) else []
    temp = [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("mav-clip-")]
    return sorted(os.listdir(serve_app.work)) + temp + written


@pytest.mark.parametrize("video, fields, status, message", [
    (b"not a video at all", {}, 422, "video: not a video ffmpeg can read"),
    (b"", {}, 422, "video: the file is empty"),
    (clip(frames=3), {}, 422, "video: 3 frames, too short for D^t's 4 keyframes"),
    (clip(), {"caption": "   "}, 422, "caption: must not be blank"),
    (clip(), {"prompt": ["a blue square", " "]}, 422, "prompt[1]: must not be blank"),
    (clip(), {"prompt": []}, 422, "prompt: give at least one"),
    (clip(), {"caption": ""}, 422, "caption: must not be blank"),
    (clip(), {"tune_steps": "0"}, 422, "tune_steps: Input should be greater than or equal to 1"),
    (clip(frames=CLIP_LIMITS["max_clip_frames"] + 1, fps=60), {}, 413, f"more than {CLIP_LIMITS['max_clip_frames']} frames"),
    (clip(frames=12, fps=5), {}, 413, f"longer than {CLIP_LIMITS['max_clip_seconds']:g} s"),
    (clip(size=80), {}, 413, "80x80 pixels; at most 64 on a side"),
])
def test_bad_uploads_are_refused_with_a_message_leaving_nothing(client, serve_app, video, fields, status, message):
    before = leftovers(serve_app)
    r = client.post("v1/edits", data=form(**fields), files={"video": ("clip.mp4", video, "video/mp4")})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert leftovers(serve_app) == before


def test_a_body_over_the_upload_bound_is_413(client, serve_app):
    from workflows.serve.middleware import MAX_UPLOAD_BYTES

    r = client.post("v1/edits", data=form(), files={"video": ("big.mp4", b"\0" * (MAX_UPLOAD_BYTES + 1), "video/mp4")})
    assert r.status_code == 413 and f"over {MAX_UPLOAD_BYTES} bytes" in r.json()["error"]
    assert client.post("v1/jobs", content=b"{" * (64 * 1024 + 1)).status_code == 413  # other routes keep theirs


def test_an_edit_is_tuned_and_run_through_the_stages_while_a_second_is_refused(client, serve_app, tiny_config):
    first = client.post("v1/edits", data=form(prompt=PROMPTS, seed="3"), files={"video": ("circle.mp4", clip(), "video/mp4")})
    assert first.status_code == 202, first.text
    edit_id = first.json()["id"]
    assert first.json()["seed"] == 3 and first.headers["location"].endswith(f"/v1/edits/{edit_id}")

    busy = client.post("v1/edits", data=form(), files={"video": ("circle.mp4", clip(), "video/mp4")})
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) > 0
    assert "tuner" in busy.json()["error"]

    edit, seen = wait_edit(client, edit_id)
    assert edit["status"] == "done", edit
    assert edit["tuning"] == {**edit["tuning"], "phase": "done", "step": 2, "steps": 2}
    assert [s["status"] for s in edit["stages"]] == ["done"] * len(STAGE_NAMES) and edit["progress"] == 1.0
    phases = [s["tuning"]["phase"] for s in seen]
    assert "training" in phases and phases.index("training") < phases.index("done")
    assert all(s["status"] == "tuning" for s in seen if s["tuning"]["phase"] == "training")
    assert edit["request"]["clip"] == {**edit["request"]["clip"], "frames": 12, "width": 32, "height": 32}

    videos = []
    for i, (video, prompt) in enumerate(zip(edit["videos"], PROMPTS)):
        assert (video["prompt"], video["seed"]) == (prompt, 3 + i)
        r = client.get(video["url"])
        assert r.status_code == 200 and is_mp4(r.content) and r.headers["x-seed"] == str(3 + i)
        frames, fps = decode_mp4(r.content)
        c = tiny_config
        assert frames.shape == ((c.decoder.frames - 1) * c.interpolation.skip + 1, c.sr_high.out_size,
                                c.sr_high.out_size, 3)
        assert fps == 10 * c.interpolation.skip  # the clip's 30 fps sampled every third frame
        assert video["output"].endswith(f"edits/{edit_id}/{i}.mp4")
        fs, path = fsspec.core.url_to_fs(video["output"])
        assert fs.cat_file(path) == r.content
        videos.append(r.content)
    assert videos[0] != videos[1]
    assert leftovers(serve_app) == [f"{fsspec.core.url_to_fs(serve_app.output)[1]}/edits/{edit_id}/{i}.mp4"
                                    for i in range(2)]  # the clip and the tuned bundle are gone
    assert client.get(f"v1/edits/{edit_id}/videos/2").status_code == 404
    assert client.get("v1/edits/nope").status_code == 404


def test_an_edits_videos_are_written_whole_or_not_at_all(tmp_path):
    from workflows.serve.edits import remove_work, write_videos

    urls = write_videos(str(tmp_path / "out"), "e1", [b"a", b"b"])
    assert [open(u, "rb").read() for u in urls] == [b"a", b"b"] and urls[1].endswith("out/edits/e1/1.mp4")
    (tmp_path / "out" / "edits" / "e2").mkdir()
    (tmp_path / "out" / "edits" / "e2" / "1.mp4").mkdir()  # the second video cannot be written
    with pytest.raises(OSError):
        write_videos(str(tmp_path / "out"), "e2", [b"a", b"b"])
    assert os.listdir(tmp_path / "out" / "edits" / "e2") == ["1.mp4"]  # the first one was removed again
    (tmp_path / "work" / "e1" / "tuned").mkdir(parents=True)
    remove_work(str(tmp_path / "work"), "e1")
    remove_work(str(tmp_path / "work"), "never-started")
    assert os.listdir(tmp_path / "work") == []
