"""One Serve application (tiny stages) on the session's Ray instance, shared by every test of this package."""

import dataclasses
import time
import uuid

import pytest

from stages.config import STAGE_NAMES, FrameNoiseConfig, dump_yaml

from .helpers import App, free_port


SR_HIGH_REPLICAS = 2  # SR_h's frames fan out over both: every served video is made of two chunks


def tiny_overrides(key: str) -> dict:
    """Small, fast settings: stages share the test instance's CPUs, batches wait long enough to fill, dead
    replicas are noticed within a second, SR_h runs two replicas, one tuner replica tunes on one CPU worker,
    and the ingress sees the API key."""
    stage = {"ray_actor_options": {"num_cpus": 0.25, "num_gpus": 0}, "health_check_period_s": 1,
             "max_ongoing_requests": 8, "max_queued_requests": 32,
             "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.2}}
    return {**{name: stage for name in STAGE_NAMES},
            "sr_high": {**stage, "num_replicas": SR_HIGH_REPLICAS},
            "encoder": {"ray_actor_options": {"num_cpus": 0.25}, "health_check_period_s": 1},
            "tuner": {"ray_actor_options": {"num_cpus": 0.25}, "user_config": {"workers": 1, "gpus_per_worker": 0}},
            "api": {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": {"MAV_API_KEY": key}}}}}


@pytest.fixture(scope="session")
def serve_preset(tiny_config, tmp_path_factory) -> str:
    """The tiny cascade with D^t's noise half common to its frames, so that motion guidance has a part to move."""
    config = dataclasses.replace(tiny_config, decoder=dataclasses.replace(
        tiny_config.decoder, frame_noise=FrameNoiseConfig(shared=0.5)))
    path = tmp_path_factory.mktemp("serve") / "tiny-shared-noise.yaml"
    path.write_text(dump_yaml(config))
    return str(path)


# POST /v1/edits' bounds in the test application: a 32x32 clip of 12 frames at 30 fps passes
CLIP_LIMITS = {"max_clip_seconds": 2.0, "max_clip_frames": 48, "max_clip_side": 64}


@pytest.fixture(scope="session")
def serve_app(ray_session, s3_server, serve_preset, tmp_path_factory):
    import boto3
    from ray import serve

    from workflows.serve import AppArgs, run_local

    bucket = f"mav-serve-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    work = str(tmp_path_factory.mktemp("edits-work"))
    args = AppArgs(preset=serve_preset, output=f"s3://{bucket}/jobs", max_active_jobs=4, work=work, **CLIP_LIMITS)
    key = "test-key-" + uuid.uuid4().hex
    url = run_local(args, tiny_overrides(key), port=free_port())
    app = App(url=url, preset=serve_preset, output=args.output, key=key, max_active_jobs=args.max_active_jobs,
              work=work)
    with app.client() as c:
        deadline = time.monotonic() + 120
        while c.get("readyz").status_code != 200:
            assert time.monotonic() < deadline, "the application never became ready"
            time.sleep(0.5)
    yield app
    serve.shutdown()


@pytest.fixture
def client(serve_app):
    with serve_app.client() as c:
        yield c
