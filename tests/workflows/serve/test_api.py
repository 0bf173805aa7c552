"""The ingress over real HTTP on the session's application: every route, validation, the body limit, the API
key, determinism and motion guidance."""

import re
import uuid

import httpx
import pytest

from stages.config import STAGE_NAMES

from .helpers import wait_job


def test_health_readiness_docs_and_page(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=60) as c:  # no API key: these are public
        assert c.get("healthz").json() == {"status": "ok"}
        ready = c.get("readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert set(ready.json()["deployments"]) == {*STAGE_NAMES, "encoder", "tuner", "jobs"}
        assert "swagger" in c.get("docs").text.lower()
        openapi = c.get("openapi.json").json()
        assert {"/v1/videos", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/video", "/v1/edits",
                "/v1/edits/{edit_id}", "/v1/edits/{edit_id}/videos/{index}", "/healthz", "/readyz"} <= set(openapi["paths"])
        assert "motion" in openapi["components"]["schemas"]["VideoRequest"]["properties"]
        page = c.get("")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="generate"' in page.text and 'id="edit"' in page.text and "<video" in page.text


def test_video_is_the_mp4_mav_generate_writes(client, serve_app, tmp_path, one_thread):
    """SR_h's frames were split over its two replicas; the MP4 is still the bytes of the unsplit video."""
    from workflows.cli import main
    from workflows.video import decode_mp4

    from .conftest import SR_HIGH_REPLICAS

    body = {"prompt": "a red ball bouncing", "seed": 3}
    first = client.post("v1/videos", json=body)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "video/mp4" and first.headers["x-seed"] == "3"
    assert first.headers["x-frame-chunks"] == str(SR_HIGH_REPLICAS)
    second = client.post("v1/videos", json=body)
    assert second.content == first.content  # same seed, same bytes

    out = tmp_path / "ball.mp4"
    assert main(["generate", body["prompt"], "--seed", "3", "--preset", serve_app.preset, "--out", str(out)]) == 0
    assert first.content == out.read_bytes()
    frames, fps = decode_mp4(first.content)
    assert frames.shape == (7, 32, 32, 3) and fps == 10.0  # (4 - 1) * 2 + 1 frames, fps 5 * skip 2


def test_request_fields_reach_the_stages(client, serve_app, one_thread):
    from workflows.pipeline import Pipeline, Request
    from workflows.video import encode_mp4

    body = {"prompt": "a blue square", "seed": 11, "fps": 7, "steps": 1, "guidance": 2.5, "negative_prompt": "blurry"}
    served = client.post("v1/videos", json=body)
    assert served.status_code == 200, served.text
    [video] = Pipeline(preset=serve_app.preset).generate([Request(**body)])
    assert served.content == encode_mp4(video.frames, video.fps)
    assert served.content != client.post("v1/videos", json={**body, "steps": 2}).content


def test_motion_guidance_reaches_the_decoder(client, serve_app, one_thread):
    """The app's D^t has half its noise common to the frames (frame_noise.shared 0.5): moving that part
    changes the video, and the served video is the one the in-process pipeline makes with the same motion."""
    from workflows.pipeline import Pipeline, Request
    from workflows.video import encode_mp4

    body = {"prompt": "a blue square", "seed": 12, "steps": 2}
    still = client.post("v1/videos", json=body)
    moving = client.post("v1/videos", json={**body, "motion": [0.5, -0.25]})  # the bound itself is accepted
    assert still.status_code == moving.status_code == 200, moving.text
    assert moving.content != still.content
    [video] = Pipeline(preset=serve_app.preset).generate([Request(**body, motion=(0.5, -0.25))])
    assert moving.content == encode_mp4(video.frames, video.fps)
    assert client.post("v1/videos", json={**body, "motion": None}).content == still.content  # null: off


def test_omitted_seed_is_random_and_reported(client):
    r = client.post("v1/videos", json={"prompt": "a green ring"})
    assert r.status_code == 200
    seed = int(r.headers["x-seed"])
    assert client.post("v1/videos", json={"prompt": "a green ring", "seed": seed}).content == r.content


def test_job_round_trip_with_progress_and_s3_output(client, serve_app):
    import fsspec

    body = {"prompt": "a yellow star", "seed": 21, "steps": 20, "motion": [0, 0.125]}
    created = client.post("v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.json()["seed"] == 21 and created.headers["location"].endswith(f"/v1/jobs/{job_id}")
    early = client.get(f"v1/jobs/{job_id}/video")
    assert early.status_code == 409 and "not ready" in early.json()["error"]
    assert "retry-after" in early.headers

    job = wait_job(client, job_id)
    assert job["status"] == "done", job
    assert job["progress"] == 1.0 and job["request"]["prompt"] == body["prompt"]
    assert job["request"]["motion"] == body["motion"]
    assert [s["name"] for s in job["stages"]] == list(STAGE_NAMES)
    assert all(s["status"] == "done" and s["batch_size"] >= 1 and s["seconds"] >= 0 for s in job["stages"])
    video = client.get(f"v1/jobs/{job_id}/video")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.headers["x-seed"] == "21"
    assert video.content == client.post("v1/videos", json=body).content
    assert job["output"] == f"{serve_app.output}/{job_id}.mp4"
    with fsspec.open(job["output"], "rb") as f:
        assert f.read() == video.content


def test_unknown_job_is_404(client):
    for path in (f"v1/jobs/{uuid.uuid4().hex}", f"v1/jobs/{uuid.uuid4().hex}/video", "v1/jobs/..%2Fetc", "v1/nothing"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"], path


# -- validation --------------------------------------------------------------------------------------

BAD = [
    ('{"seed": 1}', "prompt"),
    ('{"prompt": ""}', "prompt"),
    ('{"prompt": "   "}', "prompt"),
    ('{"prompt": 5}', "prompt"),
    ('{"prompt": null}', "prompt"),
    ('{"prompt": "x", "seed": -1}', "seed"),
    ('{"prompt": "x", "seed": "7"}', "seed"),
    ('{"prompt": "x", "seed": 9223372036854775808}', "seed"),
    ('{"prompt": "x", "seed": 1.5}', "seed"),
    ('{"prompt": "x", "fps": 0}', "fps"),
    ('{"prompt": "x", "fps": 31}', "fps"),
    ('{"prompt": "x", "fps": true}', "fps"),
    ('{"prompt": "x", "steps": 0}', "steps"),
    ('{"prompt": "x", "steps": 1001}', "steps"),
    ('{"prompt": "x", "guidance": -0.5}', "guidance"),
    ('{"prompt": "x", "guidance": 51}', "guidance"),
    ('{"prompt": "x", "guidance": "high"}', "guidance"),
    ('{"prompt": "x", "guidance": 1e999}', "guidance"),
    ('{"prompt": "x", "negative_prompt": 3}', "negative_prompt"),
    ('{"prompt": "x", "motion": [0.1]}', "motion"),
    ('{"prompt": "x", "motion": [0.1, 0.1, 0.1]}', "motion"),
    ('{"prompt": "x", "motion": []}', "motion"),
    ('{"prompt": "x", "motion": "left"}', "motion"),
    ('{"prompt": "x", "motion": 0.1}', "motion"),
    ('{"prompt": "x", "motion": {"dy": 0.1, "dx": 0}}', "motion"),
    ('{"prompt": "x", "motion": ["0.1", 0]}', "motion"),
    ('{"prompt": "x", "motion": [true, 0]}', "motion"),
    ('{"prompt": "x", "motion": [null, 0]}', "motion"),
    ('{"prompt": "x", "motion": [0, 0.51]}', "motion"),
    ('{"prompt": "x", "motion": [-0.6, 0]}', "motion"),
    ('{"prompt": "x", "motion": [1e999, 0]}', "motion"),
    ('{"prompt": "x", "colour": "red"}', "colour"),
    ('{"prompt": "x", ', "body"),
    ("[1, 2]", "body"),
    ("", "body"),
]


@pytest.mark.parametrize("path", ["v1/videos", "v1/jobs"])
@pytest.mark.parametrize("body,field", BAD, ids=[f"{f}:{b}" for b, f in BAD])
def test_invalid_requests_are_422_naming_the_field(client, path, body, field):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert re.match(rf"{field}(\[\d\])?: ", r.json()["error"]), r.json()


def test_motion_errors_name_the_component_and_the_bound(client):
    from workflows.pipeline import MAX_MOTION

    r = client.post("v1/jobs", json={"prompt": "x", "motion": [0, MAX_MOTION + 0.01]})
    assert r.status_code == 422
    assert r.json()["error"] == f"motion[1]: Input should be less than or equal to {MAX_MOTION}"


def test_oversize_body_is_413(client):
    big = b'{"prompt": "' + b"x" * 100_000 + b'"}'
    r = client.post("v1/videos", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds for streamed bodies too
        for _ in range(20):
            yield b"x" * 10_000

    r = client.post("v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_key(serve_app):
    key = serve_app.key
    with httpx.Client(base_url=serve_app.url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}, {"Authorization": f"Basic {key}"}):
            r = c.post("v1/videos", json={"prompt": "x", "seed": 1}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert key not in r.text
            assert c.get(f"v1/jobs/{uuid.uuid4().hex}", headers=headers).status_code == 401
        assert c.get(f"v1/jobs/{uuid.uuid4().hex}", headers={"Authorization": f"bearer {key}"}).status_code == 404
        assert c.get("healthz").status_code == 200 and c.get("").status_code == 200


def test_full_job_queue_is_503_with_retry_after(serve_app, client):
    bodies = [{"prompt": f"queued {i}", "seed": i, "steps": 5} for i in range(3 * serve_app.max_active_jobs)]
    responses = serve_app.post_many("v1/jobs", bodies)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {202, 503} and codes.count(202) >= 1 and codes.count(503) >= 1, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 503)
    for r in responses:
        if r.status_code == 202:
            assert wait_job(client, r.json()["id"])["status"] == "done"

