"""The application's configuration: its ``args`` (:class:`AppArgs`), the Serve config file that holds it
(``cluster/serve.yaml``, read as ``serve run`` / ``serve deploy`` read it) and the fitting of that file's
per-deployment requests to the cluster at hand."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from importlib import resources

from stages.config import STAGE_NAMES, ConfigError, from_dict
from stages.fsio import read_yaml_mapping
from workflows.runners import DTYPES

APP_NAME = "mav"
IMPORT_PATH = "workflows.serve:build_app"   # the application builder, as Serve config files name it
DEPLOYMENTS = (*STAGE_NAMES, "encoder", "tuner", "jobs", "api")  # the names a config's ``deployments:`` may override
CPU_DEPLOYMENTS = (*STAGE_NAMES, "encoder", "tuner")  # those whose replicas take one CPU unless configured


@dataclass(frozen=True, kw_only=True)
class AppArgs:
    """The ``args:`` of the application in a Serve config file."""

    preset: str | None = None           # fresh weights from this stage preset name or YAML path/URL
    checkpoint: str | None = None       # checkpoint bundle directory/URL; neither: the shipped demo model
    output: str | None = None           # fsspec URL under which finished job videos are written; None: kept in memory
    max_active_jobs: int = 64           # queued + running jobs; POST /v1/jobs answers 503 beyond
    keep_finished_jobs: int = 256       # finished jobs remembered (oldest forgotten first)
    retry_after_s: int = 5              # Retry-After of 503 answers
    dtype: str = "auto"                 # the stage networks' arithmetic: auto (bf16 on CUDA), fp32 or bf16
    work: str | None = None             # fsspec URL where an edit's clip and tuned bundle live while it runs
                                        # (shared storage on a multi-node cluster); None: this machine's temp dir
    max_clip_seconds: float = 30.0      # POST /v1/edits: longest clip accepted
    max_clip_frames: int = 300          # most frames of a clip
    max_clip_side: int = 1024           # largest width or height of a clip, pixels

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_active_jobs", "keep_finished_jobs", "retry_after_s", "max_clip_frames", "max_clip_side"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_clip_seconds > 0:
            raise ConfigError(f"max_clip_seconds must be > 0, got {self.max_clip_seconds}")

    @property
    def work_dir(self) -> str:
        return self.work or os.path.join(tempfile.gettempdir(), "mav-edits")


def parse_app_args(args: dict | None) -> AppArgs:
    """The ``args`` mapping -> AppArgs; unknown keys and wrong types raise ConfigError naming the key."""
    return from_dict(AppArgs, dict(args or {}), where="args")


def default_config_file() -> str:
    return str(resources.files("cluster") / "serve.yaml")


@dataclass(frozen=True)
class ServeConfig:
    """The one application of a Serve config file, as ``mav serve`` runs it."""

    name: str
    route_prefix: str
    args: dict
    overrides: dict[str, dict]          # deployment name -> ``Deployment.options`` keywords
    http_options: dict
    proxy_location: str | None = None   # HeadOnly, EveryNode or Disabled; None: Serve's default


def load_serve_config(path: str | None = None) -> ServeConfig:
    """Read a Serve config YAML (``serve run`` / ``serve deploy`` format) holding this application."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    path = path or default_config_file()
    data = read_yaml_mapping(path, ConfigError)
    try:
        schema = ServeDeploySchema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    apps = [a for a in schema.applications if a.import_path == IMPORT_PATH]
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected one application with import_path {IMPORT_PATH}, found {len(apps)}")
    app = apps[0]
    overrides = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments}
    http = schema.http_options.model_dump(exclude_unset=True) if "http_options" in schema.model_fields_set else {}
    proxy = schema.proxy_location.value if "proxy_location" in schema.model_fields_set else None
    return ServeConfig(name=app.name, route_prefix=app.route_prefix or "/", args=dict(app.args or {}),
                       overrides=overrides, http_options=http, proxy_location=proxy)


def fit_to_cluster(overrides: dict[str, dict], resources_available: dict[str, float]) -> tuple[dict, list[str]]:
    """Drop GPU and custom-resource requests the cluster cannot meet at all (a CPU-only machine runs the
    GPU config, as ``mav batch`` does with its pools), the tuner's Ray Train workers' GPUs included; returns
    the new overrides and a notice per kind."""
    fitted, dropped = {}, {}
    for name, opts in overrides.items():
        opts = dict(opts)
        actor = dict(opts.get("ray_actor_options") or {})
        if actor.get("num_gpus") and not resources_available.get("GPU"):
            dropped.setdefault("GPUs", []).append(name)
            actor["num_gpus"] = 0
        user = dict(opts.get("user_config") or {})
        if name == "tuner" and user.get("gpus_per_worker") and not resources_available.get("GPU"):
            dropped.setdefault("GPUs", []).append(f"{name} (its tuning's workers)")
            opts["user_config"] = {**user, "gpus_per_worker": 0}
        if actor.get("resources"):
            custom = dict(actor["resources"])
            for res in [r for r in custom if r not in resources_available]:
                dropped.setdefault(f"resource {res!r}", []).append(name)
                del custom[res]
            actor["resources"] = custom
        if actor:
            opts["ray_actor_options"] = actor
        fitted[name] = opts
    notices = [f"the cluster has no {what}; dropped from the requests of {', '.join(names)}"
               for what, names in dropped.items()]
    return fitted, notices


def cpus_needed(overrides: dict[str, dict]) -> float:
    """Logical CPUs the first replicas of every deployment ask for (code defaults where not overridden), and
    one tuning's Ray Train workers and data readers (the tuner's ``user_config.workers``, as ``mav tune``)."""
    from workflows.train import cpus_needed as training_cpus

    total = training_cpus(int((overrides.get("tuner", {}).get("user_config") or {}).get("workers", 1)), 1.0)
    for name in DEPLOYMENTS:
        opts = overrides.get(name, {})
        default = 1.0 if name in CPU_DEPLOYMENTS else 0.0
        cpus = float((opts.get("ray_actor_options") or {}).get("num_cpus", default))
        auto = opts.get("autoscaling_config") or {}
        replicas = opts.get("num_replicas", 1)
        if auto or replicas == "auto":
            replicas = int(auto.get("initial_replicas") or auto.get("min_replicas") or 1)
        total += cpus * max(1, int(replicas))
    return total
