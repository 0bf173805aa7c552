"""One local Ray instance for the workflow tests, with logical GPUs so GPU scheduling paths run."""

import logging
import os

import pytest


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """Started after the S3 server so that Ray's workers inherit its AWS_* environment, as workers on a
    real node inherit the node's credentials."""
    import ray

    # Ray Train's controller checks its workers every 2 s by default, which adds seconds to each of the
    # suite's many short training runs (a 2-step job: 17 s -> 13 s in fit); workers inherit this.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, num_gpus=2, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)  # "local": never a cluster another process started on this machine
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """This process computes on one thread, as the suite's stage actors and replicas do (they ask for under
    one CPU): float reductions round differently on another thread count, so only then do ``mav generate``'s
    bytes match theirs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def local_cluster():
    """A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and worker nodes, each a
    raylet with its own resources), apart from ``ray_session``: this process never connects to it; ``mav``
    commands join it with ``--address``, as ``ray job submit`` drivers do. Yields a function that starts the
    head (``start(num_cpus=..., resources=...)``) and returns the Cluster; ``add_node``/``remove_node`` on it add
    and kill worker nodes."""
    from ray.cluster_utils import Cluster

    clusters = []

    def start(**head) -> Cluster:
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={"include_dashboard": False, **head})
        clusters.append(cluster)
        return cluster

    yield start
    for cluster in clusters:
        cluster.shutdown()
