"""Starting or joining Ray: one helper for ``mav batch``, ``mav serve``, ``mav train`` and ``mav recipe``."""

from __future__ import annotations

import logging
import math
import os


def init_ray(address: str | None, cpus_needed: float = 0.0, *, log_to_driver: bool = False) -> bool:
    """Join ``address`` (or the cluster of a ``ray job submit`` driver, through ``RAY_ADDRESS``), else
    start a local instance with at least ``cpus_needed`` logical CPUs (so every actor the command needs
    first can be placed, even on a machine with fewer cores). Returns True if it started a local one.
    A Ray already initialised in this process is kept as it is."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(logging_level=logging.ERROR, log_to_driver=log_to_driver)
    if address:
        ray.init(address=address, **kwargs)
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return False
    # "local": a new instance even where another one on this machine wrote /tmp/ray/ray_current_cluster
    # (``ray start``, ray.cluster_utils), which a bare ray.init() would join instead.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), include_dashboard=False,
             **kwargs)
    return True
