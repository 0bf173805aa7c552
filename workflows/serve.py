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
- ``jobs``: the job table (one replica), so any ingress replica answers for any job.
- ``api``: the FastAPI ingress. It calls the stages in turn with ``await handle.run.remote(rows)``.

HTTP API (OpenAPI at ``/docs``): ``POST /v1/videos`` (the MP4, the same bytes ``mav generate`` writes for
the same arguments and seed), ``POST /v1/jobs`` + ``GET /v1/jobs/{id}`` + ``GET /v1/jobs/{id}/video``,
``GET /healthz``, ``GET /readyz``, and the page at ``/``. Full queues answer 503 with ``Retry-After``.
"""


import argparse
import asyncio
import dataclasses
import hmac
import logging
import math
import os
import random
import sys
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from importlib import resources

import numpy as np
import ray
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from stages.config import STAGE_NAMES, ConfigError, from_dict
from workflows.pipeline import DEFAULT_FPS, MAX_SEED, Request, to_batch
from workflows.presets import DEFAULT_MODEL, choose_model
from workflows.runners import RUNNERS

APP_NAME = "mav"
API_KEY_ENV = "MAV_API_KEY"
MAX_BODY_BYTES = 64 * 1024          # a request is a prompt and a few numbers
STAGE_RETRY_S = 60.0                # how long a call waits for a replacement of a dead stage replica
RUNNER_OF = {cls.stage: cls for cls in RUNNERS}
JOB_STATES = ("queued", "running", "done", "failed")

logger = logging.getLogger("ray.serve")


# ----------------------------------------------------------------------------------------------------
# Application arguments (the ``args:`` of an application in cluster/serve.yaml)


@dataclass(frozen=True, kw_only=True)
class AppArgs:
    preset: str | None = None           # fresh weights from this stage preset name or YAML path/URL
    checkpoint: str | None = None       # checkpoint bundle directory/URL; neither: the shipped demo model
    output: str | None = None           # fsspec URL under which finished job videos are written; None: kept in memory
    max_active_jobs: int = 64           # queued + running jobs; POST /v1/jobs answers 503 beyond
    keep_finished_jobs: int = 256       # finished jobs remembered (oldest forgotten first)
    retry_after_s: int = 5              # Retry-After of 503 answers

    def __post_init__(self) -> None:
        for name in ("max_active_jobs", "keep_finished_jobs", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class BatchSettings:
    """A stage deployment's ``user_config``."""

    max_batch_size: int = 4             # requests sharing one forward pass
    batch_wait_timeout_s: float = 0.05  # how long a batch waits to fill

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 0 <= self.batch_wait_timeout_s <= 60:
            raise ConfigError(f"batch_wait_timeout_s must be in 0..60, got {self.batch_wait_timeout_s}")


def parse_app_args(args: dict | None) -> AppArgs:
    """The ``args`` mapping -> AppArgs; unknown keys and wrong types raise ConfigError naming the key."""
    return from_dict(AppArgs, dict(args or {}), where="args")


# ----------------------------------------------------------------------------------------------------
# Stage deployments


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _rows(batch: dict[str, np.ndarray]) -> int:
    return len(batch["seed"])


def _split(batch: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Inverse of ``_concat``: consecutive rows back into batches of ``sizes`` rows."""
    parts, at = [], 0
    for n in sizes:
        parts.append({k: v[at : at + n] for k, v in batch.items()})
        at += n
    return parts


@serve.deployment(max_ongoing_requests=8, max_queued_requests=32, ray_actor_options={"num_cpus": 1})
class Stage:
    """One stage runner behind dynamic batching: ``run(rows) -> {"rows", "batch_size", "seconds"}``.

    ``rows`` is a batch of the runners' row columns (usually one row, as the ingress sends it). Requests
    arriving together are concatenated into one batch (rows with different ``steps`` are fine: the runner
    groups them), run in one call and split back; the runner's per-row seeds make each row's output
    independent of its batch.
    """

    def __init__(self, stage: str, checkpoint: str | None, preset: str) -> None:
        import torch

        if stage not in RUNNER_OF:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(RUNNER_OF)}")
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        self.stage = stage
        self.runner = RUNNER_OF[stage](checkpoint=checkpoint, preset=preset)
        self.settings = BatchSettings()
        self.batch_sizes: Counter[int] = Counter()
        self.busy_seconds = 0.0
        self._apply(self.settings)

    def reconfigure(self, user_config: dict | None) -> None:
        self.settings = from_dict(BatchSettings, dict(user_config or {}), where=f"{self.stage}.user_config")
        self._apply(self.settings)

    def _apply(self, settings: BatchSettings) -> None:
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def ready(self) -> dict:
        return {"stage": self.stage, "pid": os.getpid(), "device": str(self.runner.device)}

    async def stats(self) -> dict:
        return {"stage": self.stage, "pid": os.getpid(), "batch_sizes": dict(self.batch_sizes),
                "calls": sum(self.batch_sizes.values()), "busy_seconds": self.busy_seconds,
                **dataclasses.asdict(self.settings)}

    async def run(self, rows: dict[str, np.ndarray]) -> dict:
        result = await self._batched(rows)
        if isinstance(result, BaseException):
            raise result
        return result

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[dict[str, np.ndarray]]) -> list[dict | BaseException]:
        start = time.perf_counter()
        try:
            outs = await asyncio.to_thread(self._run_together, items)
        except Exception as e:  # one request's rows must not fail the others: run each alone
            if len(items) == 1:
                outs = [e]
            else:
                outs = []
                for item in items:
                    try:
                        outs.append(await asyncio.to_thread(self.runner, item))
                    except Exception as row_error:
                        outs.append(row_error)
        seconds = time.perf_counter() - start
        self.busy_seconds += seconds
        n = sum(_rows(item) for item in items)
        self.batch_sizes[n] += 1
        return [o if isinstance(o, BaseException) else {"rows": o, "batch_size": n, "seconds": seconds} for o in outs]

    def _run_together(self, items: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        if len(items) == 1:
            return [self.runner(items[0])]
        return _split(self.runner(_concat(items)), [_rows(item) for item in items])


# ----------------------------------------------------------------------------------------------------
# The job table


def _now() -> float:
    return round(time.time(), 3)


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class JobStore:
    """Job states and (without ``output``) finished videos. Keep exactly one replica: it is the table."""

    def __init__(self, max_active_jobs: int, keep_finished_jobs: int) -> None:
        self.max_active = max_active_jobs
        self.keep = keep_finished_jobs
        self.jobs: dict[str, dict] = {}
        self.videos: dict[str, bytes] = {}
        self.finished: deque[str] = deque()
        self.active = 0

    async def ready(self) -> dict:
        return {"jobs": len(self.jobs), "active": self.active}

    async def create(self, params: dict) -> str | None:
        """A new queued job's id, or None when ``max_active_jobs`` are queued or running."""
        if self.active >= self.max_active:
            return None
        job_id = uuid.uuid4().hex
        self.jobs[job_id] = {
            "id": job_id, "status": "queued", "request": params, "created": _now(), "updated": _now(),
            "stages": [{"name": s, "status": "pending", "seconds": None, "batch_size": None} for s in STAGE_NAMES],
            "progress": 0.0, "error": None, "video_fps": None, "output": None,
        }
        self.active += 1
        return job_id

    async def stage(self, job_id: str, name: str, status: str, seconds: float | None = None,
                    batch_size: int | None = None) -> None:
        job = self.jobs.get(job_id)
        if job is None or job["status"] in ("done", "failed"):
            return
        job["status"] = "running"
        for entry in job["stages"]:
            if entry["name"] == name:
                entry.update(status=status, seconds=seconds, batch_size=batch_size)
        job["progress"] = sum(e["status"] == "done" for e in job["stages"]) / len(job["stages"])
        job["updated"] = _now()

    async def finish(self, job_id: str, *, video_fps: float, data: bytes | None = None, output: str | None = None) -> None:
        if self._close(job_id, "done"):
            self.jobs[job_id].update(video_fps=video_fps, output=output, progress=1.0)
            if data is not None:
                self.videos[job_id] = data

    async def fail(self, job_id: str, error: str) -> None:
        if self._close(job_id, "failed"):
            self.jobs[job_id]["error"] = error

    def _close(self, job_id: str, status: str) -> bool:
        job = self.jobs.get(job_id)
        if job is None or job["status"] in ("done", "failed"):
            return False
        job.update(status=status, updated=_now())
        self.active -= 1
        self.finished.append(job_id)
        while len(self.finished) > self.keep:
            old = self.finished.popleft()
            self.jobs.pop(old, None)
            self.videos.pop(old, None)
        return True

    async def status(self, job_id: str) -> dict | None:
        return self.jobs.get(job_id)

    async def video(self, job_id: str) -> tuple[dict | None, bytes | None]:
        job = self.jobs.get(job_id)
        return job, self.videos.get(job_id) if job is not None else None


# ----------------------------------------------------------------------------------------------------
# HTTP boundary: request and response models, errors, middleware


class VideoRequest(BaseModel):
    """A video to generate; omitted fields take ``mav generate``'s defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000, description="the text x")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random if omitted (answered in X-Seed / the job)")
    fps: int = Field(DEFAULT_FPS, ge=1, le=30, description="keyframe rate D^t is conditioned on; plays at fps × skip")
    steps: int | None = Field(None, ge=1, le=1000, description="sampling steps of every diffusion stage (preset's if omitted)")
    guidance: float | None = Field(None, ge=0, le=50, allow_inf_nan=False, description="decoder guidance scale w")
    negative_prompt: str = Field("", max_length=4000, description="the prior's unconditional branch")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class JobCreated(BaseModel):
    id: str
    status: str
    seed: int


class StageState(BaseModel):
    name: str
    status: str = Field(description="pending, running or done")
    seconds: float | None = None
    batch_size: int | None = Field(None, description="rows in the forward pass this job shared")


class JobStatus(BaseModel):
    id: str
    status: str = Field(description=" / ".join(JOB_STATES))
    request: dict
    created: float
    updated: float
    stages: list[StageState]
    progress: float = Field(description="fraction of stages done")
    error: str | None = None
    video_fps: float | None = None
    output: str | None = Field(None, description="where the video was written, when the server has an output URL")


class ErrorBody(BaseModel):
    error: str


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


async def _validation_error(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
    messages = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            messages.append(f"body: invalid JSON ({err.get('ctx', {}).get('error', 'cannot parse')})")
        elif err.get("type") == "model_attributes_type":
            messages.append("body: expected a JSON object")
        else:
            messages.append(f"{_field(err.get('loc', ()))}: {err.get('msg')}")
    detail = [{"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg")), "type": str(err.get("type"))}
              for err in exc.errors()]  # without the rejected input: it may be large, or not JSON (inf)
    return JSONResponse({"error": "; ".join(messages) or "invalid request", "detail": detail}, status_code=422)


async def _http_error(request: HttpRequest, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


def _path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class ApiKeyMiddleware:
    """With ``MAV_API_KEY`` set in the replica's environment, ``/v1/*`` needs ``Authorization: Bearer <key>``.

    The comparison takes constant time; the key is never logged or echoed.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        key = os.environ.get(API_KEY_ENV)
        if scope["type"] == "http" and key and _path(scope).startswith("/v1/"):
            given = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization" and value[:7].lower() == b"bearer ":
                    given = value[7:].strip()
            if not hmac.compare_digest(given, key.encode()):
                await _send_json(send, 401, {"error": "missing or wrong API key (Authorization: Bearer <key>)"},
                                 [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Bodies over ``max_bytes`` answer 413, whether announced by Content-Length or streamed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                await self._too_large(send)
                return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._too_large(send)
                return
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        await _send_json(send, 413, {"error": f"request body over {self.max_bytes} bytes"})


def _page() -> str:
    return (resources.files("workflows") / "static" / "index.html").read_text(encoding="utf-8")


api = FastAPI(
    title="Make-A-Video",
    version="1",
    description="Text-to-video: ŷ = SR_h ∘ SR_l^t ∘ ↑F ∘ D^t ∘ P ∘ (x̂, CLIP_text(x)), one Ray Serve deployment "
                "per stage. With MAV_API_KEY set on the server, /v1/* needs `Authorization: Bearer <key>`.",
)
api.add_exception_handler(RequestValidationError, _validation_error)
api.add_exception_handler(HTTPException, _http_error)
api.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
api.add_middleware(ApiKeyMiddleware)  # added last: runs first, before any body is read

ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 500, 503)}


class StageBusy(Exception):
    """A stage's queue is full (``max_queued_requests``)."""


class StageUnavailable(Exception):
    """A stage has had no live replica for ``STAGE_RETRY_S``."""


class StageFailed(Exception):
    """A stage raised; the message names the stage."""


@serve.deployment(max_ongoing_requests=64, max_queued_requests=128, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Api:
    """The ingress: validates requests, walks them through the six stage deployments, keeps jobs in ``jobs``."""

    def __init__(self, stages: dict, store, args: AppArgs) -> None:
        self.stages = stages
        self.store = store
        self.args = args
        self.loaded: set[str] = set()
        self.tasks: set[asyncio.Task] = set()

    # -- the cascade -------------------------------------------------------------------------------

    async def _call(self, name: str, rows: dict, *, wait_when_busy: bool) -> dict:
        deadline = time.monotonic() + STAGE_RETRY_S
        while True:
            try:
                return await self.stages[name].run.remote(rows)
            except BackPressureError:
                if not wait_when_busy:
                    raise StageBusy(name) from None
                await asyncio.sleep(1.0)
            except RayActorError:  # the replica died; the controller starts another, the handle drops this one
                if time.monotonic() > deadline:
                    raise StageUnavailable(name) from None
                await asyncio.sleep(0.5)
            except Exception as e:  # the runner raised (a RayTaskError carrying its exception as .cause)
                cause = getattr(e, "cause", None) or e
                lines = [line for line in str(cause).splitlines() if line.strip()]
                raise StageFailed(f"{name}: {type(cause).__name__}: {lines[0] if lines else ''}"[:500]) from None

    async def _cascade(self, request: Request, on_stage=None, *, wait_when_busy: bool = False) -> tuple[dict, dict]:
        rows = to_batch([request])
        trace = {}
        for name in STAGE_NAMES:
            if on_stage is not None:
                await on_stage(name, "running", None, None)
            result = await self._call(name, rows, wait_when_busy=wait_when_busy)
            rows = result["rows"]
            trace[name] = (result["seconds"], result["batch_size"])
            if on_stage is not None:
                await on_stage(name, "done", result["seconds"], result["batch_size"])
        return rows, trace

    def _request(self, body: VideoRequest) -> Request:
        seed = body.seed if body.seed is not None else random.SystemRandom().randrange(0, 2**31)
        try:
            return Request(prompt=body.prompt, seed=seed, fps=body.fps, steps=body.steps, guidance=body.guidance,
                           negative_prompt=body.negative_prompt, id=uuid.uuid4().hex)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    def _busy(self, what: str) -> JSONResponse:
        return _error(503, f"{what} is busy; retry later", {"Retry-After": str(self.args.retry_after_s)})

    # -- routes ------------------------------------------------------------------------------------

    @api.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(_page())

    @api.get("/healthz", summary="liveness")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="readiness: every stage deployment loaded", responses={503: {"model": ErrorBody}})
    async def readyz(self) -> JSONResponse:
        missing = [n for n in (*STAGE_NAMES, "jobs") if n not in self.loaded]
        if missing:
            handles = {**self.stages, "jobs": self.store}

            async def probe(name):
                try:
                    await asyncio.wait_for(handles[name].ready.remote(), timeout=2.0)
                    self.loaded.add(name)
                except Exception:
                    pass

            await asyncio.gather(*(probe(n) for n in missing))
        state = {n: n in self.loaded for n in (*STAGE_NAMES, "jobs")}
        if all(state.values()):
            return JSONResponse({"ready": True, "deployments": state})
        return JSONResponse({"ready": False, "deployments": state,
                             "error": "not loaded yet: " + ", ".join(n for n, ok in state.items() if not ok)},
                            status_code=503)

    @api.post("/v1/videos", summary="generate a video and answer with the MP4", response_class=Response,
              responses={200: {"content": {"video/mp4": {}}, "description": "H.264 MP4; X-Seed gives the seed"},
                         **ERRORS})
    async def create_video(self, body: VideoRequest) -> Response:
        from workflows.video import encode_mp4

        request = self._request(body)
        try:
            rows, trace = await self._cascade(request)
        except StageBusy as e:
            return self._busy(f"stage {e}")
        except StageUnavailable as e:
            return _error(503, f"stage {e} has no live replica", {"Retry-After": str(self.args.retry_after_s)})
        except StageFailed as e:
            return _error(500, f"generation failed in {e}")
        data = await asyncio.to_thread(encode_mp4, rows["video"][0], float(rows["video_fps"][0]))
        headers = {
            "X-Seed": str(request.seed),
            "X-Batch-Sizes": ",".join(f"{n}={b}" for n, (_, b) in trace.items()),
            "X-Stage-Seconds": ",".join(f"{n}={s:.3f}" for n, (s, _) in trace.items()),
        }
        if bool(rows["truncated"][0]):
            headers["X-Prompt-Truncated"] = "1"
        return Response(data, media_type="video/mp4", headers=headers)

    @api.post("/v1/jobs", summary="start generating a video; poll /v1/jobs/{id}", status_code=202,
              response_model=JobCreated, responses=ERRORS)
    async def create_job(self, body: VideoRequest, http: HttpRequest) -> JSONResponse:
        request = self._request(body)
        params = {"prompt": request.prompt, "seed": request.seed, "fps": request.fps, "steps": request.steps,
                  "guidance": request.guidance, "negative_prompt": request.negative_prompt}
        try:
            job_id = await self.store.create.remote(params)
        except BackPressureError:
            job_id = None
        if job_id is None:
            return self._busy("the job queue")
        task = asyncio.get_running_loop().create_task(self._run_job(job_id, request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        location = str(http.url_for("job_status", job_id=job_id))
        return JSONResponse({"id": job_id, "status": "queued", "seed": request.seed}, status_code=202,
                            headers={"Location": location})

    async def _run_job(self, job_id: str, request: Request) -> None:
        from workflows.outputs import join, write_bytes_atomic
        from workflows.video import encode_mp4

        async def on_stage(name, status, seconds, batch_size):
            await self.store.stage.remote(job_id, name, status, seconds, batch_size)

        try:
            rows, _ = await self._cascade(request, on_stage, wait_when_busy=True)
            fps = float(rows["video_fps"][0])
            data = await asyncio.to_thread(encode_mp4, rows["video"][0], fps)
            if self.args.output:
                url = join(self.args.output, f"{job_id}.mp4")
                await asyncio.to_thread(write_bytes_atomic, url, data)
                await self.store.finish.remote(job_id, video_fps=fps, output=url)
            else:
                await self.store.finish.remote(job_id, video_fps=fps, data=data)
        except asyncio.CancelledError:
            self.store.fail.remote(job_id, "the server stopped before the job finished")
            raise
        except StageFailed as e:
            await self.store.fail.remote(job_id, f"generation failed in {e}")
        except StageUnavailable as e:
            await self.store.fail.remote(job_id, f"stage {e} has no live replica")
        except Exception as e:
            await self.store.fail.remote(job_id, f"{type(e).__name__}: {e}"[:500])

    @api.get("/v1/jobs/{job_id}", summary="a job's status and per-stage progress", response_model=JobStatus,
             responses=ERRORS)
    async def job_status(self, job_id: str) -> dict:
        job = await self.store.status.remote(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @api.get("/v1/jobs/{job_id}/video", summary="a finished job's MP4", response_class=Response,
             responses={200: {"content": {"video/mp4": {}}}, **ERRORS})
    async def job_video(self, job_id: str) -> Response:
        from stages.checkpoint import read_bytes

        job, data = await self.store.video.remote(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        if job["status"] == "failed":
            return _error(409, f"job {job_id} failed: {job['error']}")
        if job["status"] != "done":
            return _error(409, f"job {job_id} is {job['status']}; the video is not ready yet",
                          {"Retry-After": "1"})
        if data is None:
            try:
                data = await asyncio.to_thread(read_bytes, job["output"])
            except FileNotFoundError:
                raise HTTPException(404, f"the video of job {job_id} is gone from {job['output']}") from None
        return Response(data, media_type="video/mp4", headers={"X-Seed": str(job["request"]["seed"])})


# ----------------------------------------------------------------------------------------------------
# Building the application


def build_application(args: AppArgs, overrides: dict[str, dict] | None = None) -> serve.Application:
    """The application; ``overrides`` maps a deployment name to ``Deployment.options`` keywords."""
    overrides = dict(overrides or {})
    known = (*STAGE_NAMES, "jobs", "api")
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"unknown deployment {unknown[0]!r}; expected one of: {', '.join(known)}")

    def options(name: str) -> dict:
        return {"name": name, **{k: v for k, v in overrides.get(name, {}).items() if k != "name"}}

    checkpoint, preset = choose_model(args.checkpoint, args.preset)
    stages = {name: Stage.options(**options(name)).bind(name, checkpoint, preset) for name in STAGE_NAMES}
    store = JobStore.options(**options("jobs")).bind(args.max_active_jobs, args.keep_finished_jobs)
    return Api.options(**options("api")).bind(stages, store, args)


def build_app(args: dict) -> serve.Application:
    """Application builder for ``import_path: workflows.serve:build_app`` (``serve run`` / ``serve deploy``)."""
    return build_application(parse_app_args(args))


# ----------------------------------------------------------------------------------------------------
# Serve config files and local runs


def default_config_file() -> str:
    return str(resources.files("cluster") / "serve.yaml")


@dataclass(frozen=True)
class ServeConfig:
    """The one application of a Serve config file, as ``mav serve`` runs it."""

    name: str
    route_prefix: str
    args: dict
    overrides: dict[str, dict]
    http_options: dict


def load_serve_config(path: str | None = None) -> ServeConfig:
    """Read a Serve config YAML (``serve run`` / ``serve deploy`` format) holding this application."""
    import fsspec
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    path = path or default_config_file()
    try:
        with fsspec.open(path, "r") as f:
            data = yaml.safe_load(f.read())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read Serve config {path}: {e}") from None
    try:
        schema = ServeDeploySchema.model_validate(data or {})
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    apps = [a for a in schema.applications if a.import_path == "workflows.serve:build_app"]
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected one application with import_path workflows.serve:build_app, "
                          f"found {len(apps)}")
    app = apps[0]
    overrides = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments}
    http = schema.http_options.model_dump(exclude_unset=True) if "http_options" in schema.model_fields_set else {}
    return ServeConfig(name=app.name, route_prefix=app.route_prefix or "/", args=dict(app.args or {}),
                       overrides=overrides, http_options=http)


def fit_to_cluster(overrides: dict[str, dict], resources_available: dict[str, float]) -> tuple[dict, list[str]]:
    """Drop GPU and custom-resource requests the cluster cannot meet at all (a CPU-only machine runs the
    GPU config, as ``mav batch`` does with its pools); returns the new overrides and a notice per kind."""
    fitted, dropped = {}, {}
    for name, opts in overrides.items():
        opts = dict(opts)
        actor = dict(opts.get("ray_actor_options") or {})
        if actor.get("num_gpus") and not resources_available.get("GPU"):
            dropped.setdefault("GPUs", []).append(name)
            actor["num_gpus"] = 0
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
    """Logical CPUs the first replicas of every deployment ask for (code defaults where not overridden)."""
    total = 0.0
    for name in (*STAGE_NAMES, "jobs", "api"):
        opts = overrides.get(name, {})
        default = 1.0 if name in STAGE_NAMES else 0.0
        cpus = float((opts.get("ray_actor_options") or {}).get("num_cpus", default))
        auto = opts.get("autoscaling_config") or {}
        replicas = opts.get("num_replicas", 1)
        replicas = int(auto.get("initial_replicas") or auto.get("min_replicas") or 1) if auto or replicas == "auto" else int(replicas)
        total += cpus * max(1, replicas)
    return total


def run_local(args: AppArgs, overrides: dict[str, dict] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
              name: str = APP_NAME, route_prefix: str = "/", http_options: dict | None = None) -> str:
    """Start Serve's HTTP proxy on ``host:port`` in the connected Ray instance and deploy the application;
    returns once every deployment is running, with the page's URL."""
    serve.start(http_options={**(http_options or {}), "host": host, "port": port})
    serve.run(build_application(args, overrides), name=name, route_prefix=route_prefix, blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else shown}:{port}{route_prefix.rstrip('/')}/"


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from stages.checkpoint import CheckpointError
    from workflows.errors import CliError
    from workflows.outputs import check_writable

    try:
        config = load_serve_config(args.config)
        app_args = dict(config.args)
        if args.checkpoint:
            app_args["checkpoint"] = args.checkpoint
        if args.preset:
            app_args["preset"] = args.preset
        spec = parse_app_args(app_args)
        checkpoint, preset = choose_model(spec.checkpoint, spec.preset)
    except (ConfigError, CheckpointError) as e:
        raise CliError(str(e)) from None
    if spec.output:
        try:
            check_writable(spec.output)
        except Exception as e:
            raise CliError(f"cannot write to {spec.output}: {e}") from None
    port = args.port if args.port is not None else config.http_options.get("port", 8000)
    if not 1 <= port <= 65535:
        raise CliError(f"--port must be in 1..65535, got {port}")
    host = args.host or config.http_options.get("host") or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(API_KEY_ENV):
        print(f"warning: serving on {host} without {API_KEY_ENV}: anyone who can reach it can generate videos",
              file=sys.stderr)

    local = not (args.address or os.environ.get("RAY_ADDRESS"))
    try:
        kwargs = dict(logging_level=logging.ERROR, log_to_driver=False)
        if local:
            need = cpus_needed(config.overrides)
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need)), include_dashboard=False, **kwargs)
        else:
            ray.init(address=args.address, **kwargs)
            if os.environ.get(API_KEY_ENV):
                print(f"notice: {API_KEY_ENV} is read by the ingress replicas from their node's environment; "
                      "set it on the cluster's nodes too", file=sys.stderr)
    except Exception as e:
        raise CliError(f"cannot start or join Ray ({args.address or 'local'}): {e}", 1) from None

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    overrides, notices = fit_to_cluster(config.overrides, ray.cluster_resources())
    for notice in notices:
        print(f"notice: {notice}", file=sys.stderr)
    stop = {"signal": None}

    def on_term(signum, frame):
        stop["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        print(f"deploying {config.name} ({checkpoint or 'fresh weights of preset ' + preset}); loading the stages...",
              file=sys.stderr)
        url = run_local(spec, overrides, host=host, port=port, name=config.name,
                        route_prefix=config.route_prefix,
                        http_options={k: v for k, v in config.http_options.items() if k not in ("host", "port")})
        print(f"serving on {url}  (API docs: {url}docs; Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("mav: stopping...", file=sys.stderr)
    finally:
        try:
            if local:
                serve.shutdown()
                ray.shutdown()
            else:
                serve.delete(config.name)
        except Exception as e:  # already gone: nothing left to stop
            print(f"mav: while stopping: {type(e).__name__}: {e}", file=sys.stderr)
    print("mav: stopped", file=sys.stderr)
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


__all__ = ["AppArgs", "BatchSettings", "add_parser", "build_app", "build_application", "cmd_serve",
           "load_serve_config", "run_local"]
