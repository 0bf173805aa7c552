"""Shared fixtures: a tiny cascade config (as a preset file and as a saved bundle), and an S3-compatible
server on loopback (moto's server mode)."""

import os
import uuid

import pytest

from stages.config import STAGE_NAMES, CascadeConfig, dump_yaml, from_dict

TINY_UNET = {"block_out_channels": [8, 16], "attention": [False, True], "attention_head_dim": 8,
             "norm_num_groups": 4, "cross_attention_dim": 16, "temporal_heads": 2}
TINY_SR_UNET = {"block_out_channels": [8, 16], "attention": [False, False], "norm_num_groups": 4,
                "cross_attention_dim": None, "temporal_heads": 2}

TINY = {
    "clip": {"embed_dim": 32, "text_width": 32, "text_heads": 2, "text_layers": 1, "image_size": 16,
             "vision_width": 32, "vision_layers": 1, "vision_patch_size": 8},
    "prior": {"embed_dim": 32, "layers": 1, "heads": 2, "head_dim": 16, "diffusion": {"steps": 2}},
    "decoder": {"frames": 4, "size": 8, "image_embed_dim": 32, "unet": TINY_UNET, "diffusion": {"steps": 2}},
    "interpolation": {"skip": 2, "image_embed_dim": 32, "unet": TINY_UNET, "diffusion": {"steps": 2}},
    "sr_low": {"in_size": 8, "out_size": 16, "unet": TINY_SR_UNET, "diffusion": {"steps": 2}},
    "sr_high": {"in_size": 16, "out_size": 32, "frame_batch": 4, "unet": {**TINY_SR_UNET, "temporal": False},
                "diffusion": {"steps": 2}},
}


@pytest.fixture(scope="session")
def tiny_config() -> CascadeConfig:
    return from_dict(CascadeConfig, TINY)


@pytest.fixture(scope="session")
def tiny_preset_file(tmp_path_factory, tiny_config) -> str:
    path = tmp_path_factory.mktemp("preset") / "tiny.yaml"
    path.write_text(dump_yaml(tiny_config))
    return str(path)


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
