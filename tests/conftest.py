"""Shared fixtures: the tiny cascade (its preset file, its config, a saved bundle of it), and an S3-compatible
server on loopback (moto's server mode)."""

import os
import uuid
from importlib import resources

import pytest

from stages.config import STAGE_NAMES, CascadeConfig, load_yaml


@pytest.fixture(scope="session")
def tiny_preset_file() -> str:
    """The tiny preset (``cluster/presets/tiny.yaml``): a few channels, 4 keyframes of 8x8, 2 steps per stage."""
    return str(resources.files("cluster") / "presets" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_config(tiny_preset_file) -> CascadeConfig:
    with open(tiny_preset_file) as f:
        return load_yaml(CascadeConfig, f.read())


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_config) -> str:
    """A local checkpoint bundle of the six tiny stages, freshly built: the same weights a pipeline
    builds from ``tiny_preset_file``. Shared by the session; copy it before changing it."""
    from stages.cascade import build_stage
    from stages.checkpoint import save_bundle

    path = tmp_path_factory.mktemp("bundle") / "tiny"
    save_bundle(str(path), tiny_config, {name: build_stage(name, getattr(tiny_config, name)) for name in STAGE_NAMES})
    return str(path)


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on 127.0.0.1; AWS_* variables point botocore/s3fs at it for the session."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server):
    import boto3
    import s3fs

    name = f"mav-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()
