"""The HTTP ingress: a FastAPI app deployed as ``api``, which validates a request, walks it through the six
stage deployments (``await handle.run.remote(rows)``) and keeps jobs in the ``jobs`` deployment.

Errors are JSON ``{"error": "..."}``: 422 naming the field, 413 (body limit), 401 (API key), 404 (unknown job
or route), 409 (a job's video before it is done), 500 (a stage raised), 503 with ``Retry-After`` (a stage's
queue or the job table is full, or a stage has no live replica).

The module does without ``from __future__ import annotations``: Serve's ingress rebuilds the routes where
string annotations cannot be resolved.
"""

import asyncio
import random
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from stages.config import STAGE_NAMES
from workflows.pipeline import Request, to_batch
from workflows.serve.config import AppArgs
from workflows.serve.middleware import MAX_BODY_BYTES, ApiKeyMiddleware, BodyLimitMiddleware
from workflows.serve.models import ErrorBody, JobCreated, JobStatus, VideoRequest

STAGE_RETRY_S = 60.0                # how long a call waits for a replacement of a dead stage replica


# ----------------------------------------------------------------------------------------------------
# Errors as JSON


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _field(loc: tuple | list) -> str:
    """A validation error's location as the request spells it: ``motion[0]``, ``prompt``; ``body`` for all."""
    name = ""
    for p in loc:
        if p == "body":
            continue
        name += f"[{p}]" if isinstance(p, int) else f".{p}" if name else str(p)
    return name or "body"


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


# ----------------------------------------------------------------------------------------------------
# The ingress


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
                           negative_prompt=body.negative_prompt, id=uuid.uuid4().hex,
                           motion=None if body.motion is None else tuple(body.motion))
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
                  "guidance": request.guidance, "negative_prompt": request.negative_prompt,
                  "motion": None if request.motion is None else list(request.motion)}
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
        from stages.fsio import join, write_bytes_atomic
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
        from stages.fsio import read_bytes

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
