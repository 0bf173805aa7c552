"""``mav serve``: deploy the application of a Serve config file on a local Ray instance (or a cluster) and
serve it until Ctrl-C or SIGTERM.

    mav serve [--config cluster/serve.yaml] [--host 127.0.0.1] [--port 8000] [--checkpoint URL] [--preset NAME]
              [--address RAY_ADDRESS]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time

from workflows.errors import EXIT_FAILED, CliError, sigterm_as_interrupt
from workflows.presets import DEFAULT_MODEL, choose_model
from workflows.resources import WaitWatch, check_cluster, print_waits, replica_needs, waiting_replicas
from workflows.serve.config import (
    CPU_DEPLOYMENTS,
    DEPLOYMENTS,
    cpus_needed,
    fit_to_cluster,
    load_serve_config,
    parse_app_args,
)
from workflows.serve.middleware import API_KEY_ENV

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from workflows.outputs import check_writable
    from workflows.ray_cluster import init_ray
    from workflows.serve.app import run_local

    config = load_serve_config(args.config)
    app_args = dict(config.args)
    if args.checkpoint:
        app_args["checkpoint"] = args.checkpoint
    if args.preset:
        app_args["preset"] = args.preset
    spec = parse_app_args(app_args)
    checkpoint, preset = choose_model(spec.checkpoint, spec.preset)
    if spec.output:
        try:
            check_writable(spec.output)
        except Exception as e:
            raise CliError(f"cannot write to {spec.output}: {e}") from None
    port = args.port if args.port is not None else config.http_options.get("port", 8000)
    if not 1 <= port <= 65535:
        raise CliError(f"--port must be in 1..65535, got {port}")
    host = args.host or config.http_options.get("host") or "127.0.0.1"
    if host not in LOOPBACK and not os.environ.get(API_KEY_ENV):
        print(f"warning: serving on {host} without {API_KEY_ENV}: anyone who can reach it can generate videos",
              file=sys.stderr)

    try:
        local = init_ray(args.address, cpus_needed(config.overrides))
    except Exception as e:
        raise CliError(f"cannot start or join Ray ({args.address or 'local'}): {e}", EXIT_FAILED) from None
    if not local and os.environ.get(API_KEY_ENV):
        print(f"notice: {API_KEY_ENV} is read by the ingress replicas from their node's environment; "
              "set it on the cluster's nodes too", file=sys.stderr)

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    overrides, notices = fit_to_cluster(config.overrides, ray.cluster_resources())
    for notice in notices:
        print(f"notice: {notice}", file=sys.stderr)
    check_cluster(replica_needs(overrides, {name: 1.0 if name in CPU_DEPLOYMENTS else 0.0 for name in DEPLOYMENTS}),
                  what="the Serve deployments", fix="ask for fewer replicas or fractional num_cpus in the Serve config")

    dropped = 0
    with sigterm_as_interrupt() as stop:  # ray job stop, Kubernetes, a process manager: stop as on Ctrl-C
        try:
            print(f"deploying {config.name} ({checkpoint or 'fresh weights of preset ' + preset}); "
                  "loading the stages...", file=sys.stderr)
            with WaitWatch(functools.partial(waiting_replicas, config.name), print_waits()):
                url = run_local(spec, overrides, host=host, port=port, name=config.name,
                                route_prefix=config.route_prefix, proxy_location=config.proxy_location,
                                http_options={k: v for k, v in config.http_options.items() if k not in ("host", "port")})
            print(f"serving on {url}  (API docs: {url}docs; Ctrl-C stops)", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            if not stop.terminated:
                print("mav: stopping...", file=sys.stderr)
            dropped = _active_jobs(config.name)
        finally:
            try:  # the HTTP proxy goes first: no request is admitted from here on
                if local:
                    serve.shutdown()
                    ray.shutdown()
                else:
                    serve.delete(config.name)
            except Exception as e:  # already gone: nothing left to stop
                print(f"mav: while stopping: {type(e).__name__}: {e}", file=sys.stderr)
    what, status = stop.status()
    if not stop.terminated:
        print("mav: stopped", file=sys.stderr)
        return 0
    lost = f"; {dropped} job(s) queued or running were dropped" if dropped else ""
    print(f"mav: {what}: stopped serving{lost}", file=sys.stderr)
    return status


def _active_jobs(app_name: str) -> int:
    """Jobs queued or running in the application's job table (0 when it cannot be asked)."""
    from ray import serve

    try:
        return int(serve.get_deployment_handle("jobs", app_name=app_name).ready.remote().result(timeout_s=5)["active"])
    except Exception:
        return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``mav serve`` on the ``mav`` command's subparsers."""
    p = subparsers.add_parser("serve", help="serve the cascade over HTTP on Ray Serve (API, page, jobs)")
    p.add_argument("--config", help="Serve config YAML (default: the packaged cluster/serve.yaml)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1, or the config's http_options.host)")
    p.add_argument("--port", type=int, help="port (default 8000, or the config's http_options.port)")
    p.add_argument("--checkpoint", help="checkpoint bundle directory/URL (default: the config's, else the shipped "
                                        f"demo model cluster/models/{DEFAULT_MODEL} unless a preset is given)")
    p.add_argument("--preset", help="fresh (untrained) weights from this stage preset name or YAML path "
                                    "(default: the config's)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=cmd_serve)
    return p
