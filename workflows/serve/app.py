"""Building the application: what ``import_path: workflows.serve:build_app`` names (``serve run`` /
``serve deploy`` / KubeRay), and a local run of it on Serve's HTTP proxy (``mav serve``, the tests)."""

from __future__ import annotations

from ray import serve

from stages.config import STAGE_NAMES, ConfigError
from workflows.presets import choose_model
from workflows.serve.api import Api
from workflows.serve.config import APP_NAME, DEPLOYMENTS, AppArgs, parse_app_args
from workflows.serve.deployments import Encoder, Stage
from workflows.serve.jobs import JobStore
from workflows.serve.tuner import Tuner


def build_application(args: AppArgs, overrides: dict[str, dict] | None = None) -> serve.Application:
    """The application; ``overrides`` maps a deployment name to ``Deployment.options`` keywords."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEPLOYMENTS))
    if unknown:
        raise ConfigError(f"unknown deployment {unknown[0]!r}; expected one of: {', '.join(DEPLOYMENTS)}")

    def options(name: str) -> dict:
        return {"name": name, **{k: v for k, v in overrides.get(name, {}).items() if k != "name"}}

    checkpoint, preset = choose_model(args.checkpoint, args.preset)
    stages = {name: Stage.options(**options(name)).bind(name, checkpoint, preset, args.dtype)
              for name in STAGE_NAMES}
    encoder = Encoder.options(**options("encoder")).bind()
    store = JobStore.options(**options("jobs")).bind(args.max_active_jobs, args.keep_finished_jobs)
    tuner = Tuner.options(**options("tuner")).bind(checkpoint, preset, args.work_dir, store)
    return Api.options(**options("api")).bind(stages, encoder, store, args, tuner)


def build_app(args: dict) -> serve.Application:
    """Application builder for ``import_path: workflows.serve:build_app`` (``serve run`` / ``serve deploy``)."""
    return build_application(parse_app_args(args))


def run_local(args: AppArgs, overrides: dict[str, dict] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
              name: str = APP_NAME, route_prefix: str = "/", http_options: dict | None = None,
              proxy_location: str | None = None) -> str:
    """Start Serve's HTTP proxy on ``host:port`` in the connected Ray instance (on the nodes ``proxy_location``
    says) and deploy the application; returns once every deployment is running, with the page's URL."""
    serve.start(http_options={**(http_options or {}), "host": host, "port": port},
                **({"proxy_location": proxy_location} if proxy_location else {}))
    serve.run(build_application(args, overrides), name=name, route_prefix=route_prefix, blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else shown}:{port}{route_prefix.rstrip('/')}/"
