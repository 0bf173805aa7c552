"""One local Ray instance for the workflow tests, with logical GPUs so GPU scheduling paths run."""

import logging

import pytest


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """Started after the S3 server so that Ray's workers inherit its AWS_* environment, as workers on a
    real node inherit the node's credentials."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()
