"""The Serve application on a real local Ray instance: every route over real HTTP, batching, backpressure,
a killed stage replica, the API key, validation and determinism. One application (tiny stages) is shared by
this module and test_page.py."""

import argparse
import asyncio
import os
import socket
import time
import uuid
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import yaml

from stages.config import STAGE_NAMES, ConfigError

KEY = "test-key-" + uuid.uuid4().hex
MAX_ACTIVE_JOBS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class App:
    url: str
    output: str               # where job videos go (S3 on moto)
    headers: dict

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 180), **kw)


def tiny_overrides() -> dict:
    """Small, fast settings: stages share the test instance's CPUs, batches wait long enough to fill, dead
    replicas are noticed within a second, and the ingress sees the API key."""
    stage = {"ray_actor_options": {"num_cpus": 0.25, "num_gpus": 0}, "health_check_period_s": 1,
             "max_ongoing_requests": 8, "max_queued_requests": 32,
             "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.2}}
    return {**{name: stage for name in STAGE_NAMES},
            "api": {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": {"MAV_API_KEY": KEY}}}}}


_shared: dict[str, App] = {}


@pytest.fixture(scope="session")
def serve_app(ray_session, s3_server, tiny_preset_file):
    """The application, deployed once per session: test_page.py imports this fixture, which gives it a
    second definition, so both definitions hand out the one application cached here."""
    from ray import serve

    if "app" not in _shared:
        _shared["app"] = deploy(s3_server, tiny_preset_file)
    yield _shared["app"]
    if _shared.pop("app", None) is not None:
        serve.shutdown()


def deploy(s3_server: str, preset: str) -> App:
    import boto3

    from workflows.serve import AppArgs, run_local

    bucket = f"mav-serve-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    args = AppArgs(preset=preset, output=f"s3://{bucket}/jobs", max_active_jobs=MAX_ACTIVE_JOBS)
    url = run_local(args, tiny_overrides(), port=free_port())
    app = App(url=url, output=args.output, headers={"Authorization": f"Bearer {KEY}"})
    with app.client() as c:
        deadline = time.monotonic() + 120
        while c.get("readyz").status_code != 200:
            assert time.monotonic() < deadline, "the application never became ready"
            time.sleep(0.5)
    return app


@pytest.fixture
def client(serve_app):
    with serve_app.client() as c:
        yield c


def is_mp4(data: bytes) -> bool:
    return len(data) > 12 and data[4:8] == b"ftyp"


def wait_job(client, job_id, timeout=180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        assert time.monotonic() < deadline, f"job stuck: {job}"
        time.sleep(0.2)


async def post_many(app: App, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=app.url, headers=app.headers, timeout=300) as c:
        return await asyncio.gather(*(c.post(path, json=b) for b in bodies))


# -- routes ------------------------------------------------------------------------------------------


def test_health_readiness_docs_and_page(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=60) as c:  # no API key: these are public
        assert c.get("healthz").json() == {"status": "ok"}
        ready = c.get("readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert set(ready.json()["deployments"]) == {*STAGE_NAMES, "jobs"}
        assert "swagger" in c.get("docs").text.lower()
        paths = c.get("openapi.json").json()["paths"]
        assert {"/v1/videos", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/video", "/healthz", "/readyz"} <= set(paths)
        page = c.get("")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="generate"' in page.text and "<video" in page.text


def test_video_is_the_mp4_mav_generate_writes(client, tiny_preset_file, tmp_path, one_thread):
    from workflows.cli import main
    from workflows.video import decode_mp4

    body = {"prompt": "a red ball bouncing", "seed": 3}
    first = client.post("v1/videos", json=body)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "video/mp4" and first.headers["x-seed"] == "3"
    second = client.post("v1/videos", json=body)
    assert second.content == first.content  # same seed, same bytes

    out = tmp_path / "ball.mp4"
    assert main(["generate", body["prompt"], "--seed", "3", "--preset", tiny_preset_file, "--out", str(out)]) == 0
    assert first.content == out.read_bytes()
    frames, fps = decode_mp4(first.content)
    assert frames.shape == (7, 32, 32, 3) and fps == 10.0  # (4 - 1) * 2 + 1 frames, fps 5 * skip 2


def test_request_fields_reach_the_stages(client, tiny_preset_file):
    from workflows.pipeline import Pipeline, Request
    from workflows.video import encode_mp4

    body = {"prompt": "a blue square", "seed": 11, "fps": 7, "steps": 1, "guidance": 2.5, "negative_prompt": "blurry"}
    served = client.post("v1/videos", json=body)
    assert served.status_code == 200, served.text
    [video] = Pipeline(preset=tiny_preset_file).generate([Request(**body)])
    assert served.content == encode_mp4(video.frames, video.fps)
    assert served.content != client.post("v1/videos", json={**body, "steps": 2}).content


def test_omitted_seed_is_random_and_reported(client):
    r = client.post("v1/videos", json={"prompt": "a green ring"})
    assert r.status_code == 200
    seed = int(r.headers["x-seed"])
    assert client.post("v1/videos", json={"prompt": "a green ring", "seed": seed}).content == r.content


def test_job_round_trip_with_progress_and_s3_output(client, serve_app):
    import fsspec

    body = {"prompt": "a yellow star", "seed": 21, "steps": 20}
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
    assert [s["name"] for s in job["stages"]] == list(STAGE_NAMES)
    assert all(s["status"] == "done" and s["batch_size"] >= 1 and s["seconds"] >= 0 for s in job["stages"])
    video = client.get(f"v1/jobs/{job_id}/video")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
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
    assert r.json()["error"].startswith(f"{field}:"), r.json()


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
    with httpx.Client(base_url=serve_app.url, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            r = c.post("v1/videos", json={"prompt": "x", "seed": 1}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert KEY not in r.text
            assert c.get(f"v1/jobs/{uuid.uuid4().hex}", headers=headers).status_code == 401
        assert c.get(f"v1/jobs/{uuid.uuid4().hex}", headers={"Authorization": f"bearer {KEY}"}).status_code == 404
        assert c.get("healthz").status_code == 200 and c.get("").status_code == 200


# -- load: batching, backpressure, failures ------------------------------------------------------------


def test_16_concurrent_requests_are_answered_and_batched(serve_app):
    from ray import serve

    bodies = [{"prompt": f"a shape number {i}", "seed": 100 + i} for i in range(16)]
    responses = asyncio.run(post_many(serve_app, "v1/videos", bodies))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1
    for r in responses:
        if r.status_code == 200:
            assert is_mp4(r.content)
        else:
            assert int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"]
    sizes = [int(kv.split("=")[1]) for r in responses if r.status_code == 200 for kv in r.headers["x-batch-sizes"].split(",")]
    assert max(sizes) > 1, "no stage ever ran two requests in one forward pass"
    stats = serve.get_deployment_handle("clip", app_name="mav").stats.remote().result()
    assert max(int(n) for n in stats["batch_sizes"]) > 1 and stats["max_batch_size"] == 8


def test_full_job_queue_is_503_with_retry_after(serve_app, client):
    bodies = [{"prompt": f"queued {i}", "seed": i, "steps": 5} for i in range(3 * MAX_ACTIVE_JOBS)]
    responses = asyncio.run(post_many(serve_app, "v1/jobs", bodies))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {202, 503} and codes.count(202) >= 1 and codes.count(503) >= 1, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 503)
    for r in responses:
        if r.status_code == 202:
            assert wait_job(client, r.json()["id"])["status"] == "done"


def test_killed_stage_replica_is_replaced(serve_app, client):
    import ray

    body = {"prompt": "a survivor", "seed": 77}
    before = client.post("v1/videos", json=body).content
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::mav#decoder#")]
    assert len(replicas) == 1, replicas
    slow = {"prompt": "in flight", "steps": 60}

    async def kill_while_decoding():
        async with httpx.AsyncClient(base_url=serve_app.url, headers=serve_app.headers, timeout=300) as c:
            job_id = (await c.post("v1/jobs", json={**slow, "seed": 0})).json()["id"]
            inflight = [asyncio.ensure_future(c.post("v1/videos", json={**slow, "seed": i})) for i in range(1, 4)]
            while True:  # the job's decoder call is running: the replica holds requests when it dies
                job = (await c.get(f"v1/jobs/{job_id}")).json()
                assert job["stages"][2]["status"] != "done", "the decoder finished before it could be killed"
                if job["stages"][2]["status"] == "running":
                    break
                await asyncio.sleep(0.05)
            ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
            return job_id, await asyncio.gather(*inflight)

    job_id, responses = asyncio.run(kill_while_decoding())
    assert {r.status_code for r in responses} <= {200, 503}, [(r.status_code, r.text[:200]) for r in responses]
    job = wait_job(client, job_id)
    assert job["status"] == "done" or "no live replica" in job["error"], job
    deadline = time.monotonic() + 180
    while (r := client.post("v1/videos", json=body)).status_code != 200:
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(1)
    assert r.content == before  # a new replica, the same video
    after = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::mav#decoder#")]
    assert replicas[0]["name"] not in after and len(after) == 1


# -- configuration and command line (no Ray needed) -----------------------------------------------------

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_serve_config_file_and_kuberay_manifest_agree():
    from ray.serve.schema import ServeDeploySchema

    from workflows.serve import default_config_file, load_serve_config, parse_app_args

    with open(default_config_file()) as f:
        config = yaml.safe_load(f)
    ServeDeploySchema.model_validate(config)
    loaded = load_serve_config()
    assert set(loaded.overrides) == {*STAGE_NAMES, "jobs", "api"}
    for stage in STAGE_NAMES:
        opts = loaded.overrides[stage]
        assert "num_replicas" in opts or "autoscaling_config" in opts, stage
        assert {"num_cpus", "num_gpus"} <= set(opts["ray_actor_options"]), stage
        assert {"max_ongoing_requests", "max_queued_requests", "user_config"} <= set(opts), stage
        assert opts["max_ongoing_requests"] >= opts["user_config"]["max_batch_size"], stage
    parse_app_args(loaded.args)
    with open(os.path.join(ROOT, "cluster", "kuberay-rayservice.yaml")) as f:
        service = yaml.safe_load(f)
    assert service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded["applications"] == config["applications"]


def test_app_args_are_checked_by_name():
    from workflows.serve import build_app, build_application, parse_app_args

    assert parse_app_args({"preset": "paper", "output": "s3://b/v"}).output == "s3://b/v"
    with pytest.raises(ConfigError, match="presett"):
        build_app({"presett": "cpu"})
    with pytest.raises(ConfigError, match="max_active_jobs"):
        parse_app_args({"max_active_jobs": 0})
    with pytest.raises(ConfigError, match="max_active_jobs"):
        parse_app_args({"max_active_jobs": "many"})
    with pytest.raises(ConfigError, match="decodr"):
        build_application(parse_app_args({}), {"decodr": {"num_replicas": 2}})


def test_config_is_fitted_to_a_cluster_without_gpus(tmp_path):
    from workflows.serve import cpus_needed, fit_to_cluster, load_serve_config

    overrides = load_serve_config().overrides
    fitted, notices = fit_to_cluster(overrides, {"CPU": 2.0})
    assert all(not (o.get("ray_actor_options") or {}).get("num_gpus") for o in fitted.values())
    assert notices == ["the cluster has no GPUs; dropped from the requests of "
                       "clip, prior, decoder, interpolation, sr_low, sr_high"]
    same, none = fit_to_cluster(overrides, {"CPU": 8.0, "GPU": 4.0, **{r: 1.0 for o in overrides.values()
                                for r in (o.get("ray_actor_options") or {}).get("resources", {})}})
    assert same == overrides and none == []
    assert cpus_needed(overrides) >= len(STAGE_NAMES) * min(
        o["ray_actor_options"]["num_cpus"] for n, o in overrides.items() if n in STAGE_NAMES)

    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: x\n    import_path: somewhere:else\n")
    with pytest.raises(ConfigError, match="workflows.serve:build_app"):
        load_serve_config(str(bad))


def test_serve_subcommand_parses():
    import argparse

    from workflows.serve import add_parser, cmd_serve

    parser = argparse.ArgumentParser(prog="mav")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve"])
    assert args.func is cmd_serve and args.host is None and args.port is None and args.address is None
    args = parser.parse_args(["serve", "--config", "c.yaml", "--host", "0.0.0.0", "--port", "9000",
                              "--checkpoint", "s3://b/m", "--preset", "paper", "--address", "ray://h:10001"])
    assert (args.config, args.host, args.port, args.checkpoint, args.preset, args.address) == (
        "c.yaml", "0.0.0.0", 9000, "s3://b/m", "paper", "ray://h:10001")


def test_mav_serve_runs_until_interrupted(tiny_preset_file):
    """``mav serve`` in its own process: a local Ray instance, loopback, the URL on stdout, the API key from
    the environment, and a clean stop on Ctrl-C (SIGINT)."""
    import signal
    import subprocess
    import sys

    from workflows.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "serve" not in commands:
        pytest.skip("mav serve is not wired into workflows/cli.py yet (workflows.serve.add_parser)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "serve", "--preset", tiny_preset_file,
                             "--port", str(port)], cwd=ROOT, env={**env, "MAV_API_KEY": "cli-key"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C as from a terminal
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving on http://127.0.0.1:{port}/"), line + proc.stderr.read()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.post("/v1/videos", json={"prompt": "x"}).status_code == 401
            r = c.post("/v1/videos", json={"prompt": "x", "seed": 1}, headers={"Authorization": "Bearer cli-key"})
            assert r.status_code == 200 and is_mp4(r.content)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and err.rstrip().endswith("mav: stopped"), err
        assert "cli-key" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stage_batches_are_split_back_row_by_row(tiny_preset_file):
    """The batching core without Serve: concatenated rows give each request what it gets alone."""
    from workflows.pipeline import Request, to_batch
    from workflows.runners import DecoderRunner, PriorRunner, TextEncoderRunner
    from workflows.serve import _concat, _split

    clip, prior, decoder = (cls(preset=tiny_preset_file, device="cpu") for cls in (TextEncoderRunner, PriorRunner, DecoderRunner))
    items = [to_batch([Request(prompt=p, seed=s, steps=st)]) for p, s, st in (("a", 1, 2), ("b", 2, 1), ("a", 3, 2))]
    items.append(to_batch([Request(prompt="c", seed=4), Request(prompt="d", seed=5)]))  # a request may carry rows
    alone = [decoder(prior(clip(item))) for item in items]
    together = _split(decoder(prior(clip(_concat(items)))), [1, 1, 1, 2])
    for one, back in zip(alone, together):
        assert set(back) == set(one) and list(back["seed"]) == list(one["seed"])
        assert np.abs(back["video"].astype(int) - one["video"].astype(int)).max() <= 1
