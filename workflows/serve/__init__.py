"""``mav serve``: the cascade as a Ray Serve application, one deployment per stage, an HTTP API and a page.

    mav serve                                        # http://127.0.0.1:8000/ on a local Ray instance, demo model
    mav serve --checkpoint s3://bucket/model --port 8080 --address ray://head:10001
    MAV_API_KEY=... mav serve --host 0.0.0.0         # /v1/* then needs "Authorization: Bearer <key>"
    serve run cluster/serve.yaml                     # the same application with Ray's own CLI
    serve deploy cluster/serve.yaml                  # onto a running cluster (or cluster/kuberay-rayservice.yaml)

Deployments (their names are the keys of ``deployments:`` in ``cluster/serve.yaml``):

- ``clip``, ``prior``, ``decoder``, ``interpolation``, ``sr_low``, ``sr_high``: one per stage runner of
  ``workflows/runners.py``, loaded once in ``__init__``. Each scales on its own (``num_replicas`` or
  ``autoscaling_config``, ``ray_actor_options``) and batches dynamically (``@serve.batch``; ``user_config``
  gives ``max_batch_size`` and ``batch_wait_timeout_s``): concurrent requests share one forward pass.
- ``encoder``: joins SR_h's chunks and writes the MP4, on CPUs of its own.
- ``tuner``: an edit's tuning (Tune-A-Video: ``mav tune``'s run, its Ray Train workers in ``user_config``),
  one tuning per replica; the edit's rows then go through the stage deployments, ``decoder`` running the
  tuned D^t.
- ``jobs``: the job and edit table (one replica), so any ingress replica answers for any job.
- ``api``: the FastAPI ingress. It chains the calls: each stage's call takes the previous call's
  ``DeploymentResponse``, so frames go from stage replica to stage replica, never through the ingress.
  SR_h's frames are split into one chunk per running SR_h replica (each chunk with the video's own noise:
  the same bytes as one replica makes), so one video's latency falls as SR_h scales. A call whose replica
  is lost resumes at its stage; a job records the retry and ends done or failed, never left running.

HTTP API (OpenAPI at ``/docs``): ``POST /v1/videos`` (the MP4, the same bytes ``mav generate`` writes for
the same arguments and seed), ``POST /v1/jobs`` + ``GET /v1/jobs/{id}`` + ``GET /v1/jobs/{id}/video``,
``POST /v1/edits`` (multipart: a clip, its caption, prompts) + ``GET /v1/edits/{id}`` +
``GET /v1/edits/{id}/videos/{i}``, ``GET /healthz``, ``GET /readyz``, and the page at ``/``. Full queues and
busy tuners answer 503 with ``Retry-After``.

Modules: ``config`` (the app's args, the Serve config file, fitting it to the cluster), ``deployments``
(the stage deployments and the encoder), ``tuner`` (the tuning deployment), ``jobs`` (the job table),
``models`` (request and response models), ``middleware`` (API key, body limits), ``edits`` (an upload's
checks, an edit's outputs and work directory), ``api`` (the ingress and its routes), ``app`` (the
application builder), ``command`` (``mav serve``).
"""

from workflows.serve.app import build_app, build_application, run_local
from workflows.serve.command import add_parser, cmd_serve
from workflows.serve.config import (
    AppArgs,
    ServeConfig,
    cpus_needed,
    default_config_file,
    fit_to_cluster,
    load_serve_config,
    parse_app_args,
)

__all__ = ["AppArgs", "ServeConfig", "add_parser", "build_app", "build_application", "cmd_serve", "cpus_needed",
           "default_config_file", "fit_to_cluster", "load_serve_config", "parse_app_args", "run_local"]
