"""The HTTP ingress: a FastAPI app deployed as ``api``, which validates a request, chains the stage
deployments' calls and keeps jobs in the ``jobs`` deployment.

A request's frames never pass through the ingress: each stage's call takes the previous call's
``DeploymentResponse`` (Ray moves the rows from replica to replica), SR_h's call is split into one chunk
of the frames per running SR_h replica, and the ``encoder`` deployment joins the chunks and answers with
the MP4. When a call fails because its replica (or the node holding its output) was lost, the cascade
resumes from that stage, up to :data:`MAX_RETRIES` times; a job records each retry and ends ``done`` or
``failed`` with the reason, never left ``running``.

An edit (``POST /v1/edits``) is checked (``workflows.serve.edits``), tuned by the ``tuner`` deployment, then
run as a job's rows are, one row per prompt, the ``decoder`` call naming the tuned bundle.

Errors are JSON ``{"error": "..."}``: 422 naming the field, 413 (body limit, a clip over its bounds), 401
(API key), 404 (unknown job, edit or route), 409 (a video before it is done), 500 (a stage raised), 503 with
``Retry-After`` (a stage's queue or the job table is full, every tuner is busy, or a stage has no live
replica).

The module does without ``from __future__ import annotations``: Serve's ingress rebuilds the routes where
string annotations cannot be resolved.
"""

import asyncio
import random
import time
import uuid
from importlib import resources

from fastapi import FastAPI, File, Form, Request as HttpRequest, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError
from ray.serve.exceptions import BackPressureError, RayServeException
from starlette.exceptions import HTTPException

from stages.config import STAGE_NAMES
from workflows.pipeline import MAX_SEED, Request, to_batch
from workflows.serve.config import AppArgs
from workflows.serve.deployments import CHUNKED_STAGE, StageError, hop
from workflows.serve.edits import MAX_TUNE_STEPS, EditIntake, remove_work, write_videos
from workflows.serve.middleware import (
    MAX_BODY_BYTES,
    MAX_UPLOAD_BYTES,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
)
from workflows.serve.models import EditStatus, ErrorBody, JobCreated, JobStatus, VideoRequest
from workflows.serve.tuner import TuneFailed
from workflows.tune.job import TuneOptions

STEPS = (*STAGE_NAMES, "encoder")   # the calls of one request, in order
READY = (*STEPS, "tuner", "jobs")    # the deployments /readyz waits for
MAX_RETRIES = 3                     # resumptions of one request after lost replicas
RETRY_DELAY_S = 1.0                 # before the first resumption; grows with each
REPLACEMENT_WAIT_S = 120.0          # how long a resumed call waits for a live replica of its stage
REPLICAS_TTL_S = 5.0                # how long the count of running SR_h (or tuner) replicas is reused
TUNE_DEFAULTS = TuneOptions()       # an edit's tuning settings where the form omits them


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
api.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES, paths={"/v1/edits": MAX_UPLOAD_BYTES})
api.add_middleware(ApiKeyMiddleware)  # added last: runs first, before any body is read

ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 500, 503)}


class StageBusy(Exception):
    """A stage's queue is full (``max_queued_requests``)."""


class StageUnavailable(Exception):
    """A stage's replicas were lost more than ``MAX_RETRIES`` times in one request, or no replacement
    came within ``REPLACEMENT_WAIT_S``."""


class StageFailed(Exception):
    """A stage raised; the message names the stage."""


def _lost(error: BaseException) -> bool:
    """The call failed because a replica, its node or an object it held went away (worth resuming)."""
    cause = getattr(error, "cause", None)
    return any(isinstance(e, (RayActorError, ActorUnavailableError, ObjectLostError, RayServeException))
               for e in (error, cause) if e is not None)


def _describe(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:300]


def _running_replicas(deployment: str) -> int:
    app = serve.get_replica_context().app_name
    states = serve.status().applications[app].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


# ----------------------------------------------------------------------------------------------------
# The ingress


@serve.deployment(max_ongoing_requests=64, max_queued_requests=128, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Api:
    """The ingress: validates requests, chains the stage deployments' calls, keeps jobs in ``jobs``."""

    def __init__(self, stages: dict, encoder, store, args: AppArgs, tuner) -> None:
        self.stages = stages
        self.encoder = encoder
        self.store = store
        self.args = args
        self.tuner = tuner
        self.edits = EditIntake(args)
        self.loaded: set[str] = set()
        self.tasks: set[asyncio.Task] = set()
        self.replicas: dict[str, tuple[int, float]] = {}  # deployment -> (running replicas, when asked)

    # -- the cascade -------------------------------------------------------------------------------

    async def _replicas(self, deployment: str) -> int:
        """Running replicas of ``deployment`` (at least 1), asked of the controller at most every
        :data:`REPLICAS_TTL_S`."""
        count, at = self.replicas.get(deployment, (1, float("-inf")))
        if time.monotonic() - at > REPLICAS_TTL_S:
            try:
                count = max(1, await asyncio.to_thread(_running_replicas, deployment))
            except Exception:  # the controller did not answer: keep the last count
                pass
            self.replicas[deployment] = (count, time.monotonic())
        return count

    def _issue(self, calls: list[list], first: dict, start: int, chunks: int, redo: list[int] | None,
               tuned: dict | None = None) -> None:
        """Calls of the steps from ``start`` on, each taking the previous step's responses; at ``start``,
        only the chunks ``redo`` (all when None). ``tuned``: D^t is that tuned bundle's (an edit)."""
        for i in range(start, len(STEPS)):
            name = STEPS[i]
            if name == "encoder":
                calls[i] = [self.encoder.encode.remote(*calls[i - 1])]
                continue
            arg = first if i == 0 else calls[i - 1][0]
            parts = [(k, chunks) for k in range(chunks)] if name == CHUNKED_STAGE else [None]
            extra = {"tuned": tuned} if tuned is not None and name == "decoder" else {}
            old = calls[i]
            calls[i] = [old[k] if i == start and redo is not None and k not in redo
                        else self.stages[name].run.remote(arg, *([part] if part else []), **extra)
                        for k, part in enumerate(parts)]

    async def _first_failure(self, calls: list[list]) -> tuple[int, list[int], BaseException] | None:
        """The first step with a failed call: (step, failed chunks, its error). Reads the results of the
        steps before it (only after a failure)."""
        for i, step in enumerate(calls):
            results = await asyncio.gather(*step, return_exceptions=True)
            failed = [k for k, r in enumerate(results) if isinstance(r, BaseException)]
            if failed:
                return i, failed, results[failed[0]]
        return None

    async def _watch(self, calls: list[list], start: int, on_stage) -> None:
        """Report each stage of this attempt as running (its calls are on replicas) and done (their outputs
        exist), without fetching the outputs."""
        for i in range(start, len(STEPS) - 1):
            refs = [await call._to_object_ref() for call in calls[i]]
            await on_stage(STEPS[i], "running")
            # What Serve itself awaits before passing a response on: the object exists, it is not fetched.
            await asyncio.gather(*(ref._ready() for ref in refs))
            await on_stage(STEPS[i], "done")

    async def _await_replacement(self, calls: list[list], step: int) -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*(c._to_object_ref() for c in calls[step])), REPLACEMENT_WAIT_S)
        except asyncio.TimeoutError:
            for c in calls[step]:
                c.cancel()
            raise StageUnavailable(f"{STEPS[step]} has no live replica: none came within {REPLACEMENT_WAIT_S:.0f} s") from None
        except Exception:  # the call failed: the cascade's handler sees it
            pass

    async def _cascade(self, requests: list[Request], on_stage=None, on_retry=None, *,
                       wait_when_busy: bool = False, tuned: dict | None = None) -> tuple[dict, list[str]]:
        """The encoder's answer for ``requests`` (rows of one batch) and the retries it took.
        ``on_stage(name, status)`` hears each stage start and finish, ``on_retry(name, reason)`` each
        resumption; ``tuned`` (an edit): the ``decoder`` deployment runs that tuned bundle's D^t."""
        first = hop(to_batch(requests))
        chunks = await self._replicas(CHUNKED_STAGE)  # SR_h's frames: one chunk per replica
        calls: list[list] = [[] for _ in STEPS]
        start, redo, retries = 0, None, []
        while True:
            self._issue(calls, first, start, chunks, redo, tuned)
            if retries:
                await self._await_replacement(calls, start)
            watcher = asyncio.ensure_future(self._watch(calls, start, on_stage)) if on_stage else None
            try:
                return await calls[-1][0], retries
            except Exception:
                found = await self._first_failure(calls)
            finally:
                if watcher is not None:
                    watcher.cancel()
            if found is None:  # every call answered when read again: the failure was passing a result on
                found = (len(STEPS) - 1, [0], RayServeException("the encoder's input could not be passed"))
            start, redo, error = found
            name = STEPS[start]
            cause = getattr(error, "cause", None) or error
            if isinstance(cause, StageError):
                raise StageFailed(str(cause))
            if isinstance(error, BackPressureError):
                if not wait_when_busy:
                    raise StageBusy(name)
                await asyncio.sleep(1.0)
            elif _lost(error):
                if len(retries) >= MAX_RETRIES:
                    raise StageUnavailable(f"{name} has no live replica: lost {len(retries) + 1} times, "
                                           f"last {_describe(error)}")
                retries.append(f"{name}: {_describe(error)}")
                if on_retry is not None:
                    await on_retry(name, retries[-1])
                await asyncio.sleep(RETRY_DELAY_S * len(retries))
            else:
                raise StageFailed(f"{name}: {_describe(error)}")

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
        missing = [n for n in READY if n not in self.loaded]
        if missing:
            handles = {**self.stages, "encoder": self.encoder, "tuner": self.tuner, "jobs": self.store}

            async def probe(name):
                try:
                    await asyncio.wait_for(handles[name].ready.remote(), timeout=2.0)
                    self.loaded.add(name)
                except Exception:
                    pass

            await asyncio.gather(*(probe(n) for n in missing))
        state = {n: n in self.loaded for n in READY}
        if all(state.values()):
            return JSONResponse({"ready": True, "deployments": state})
        return JSONResponse({"ready": False, "deployments": state,
                             "error": "not loaded yet: " + ", ".join(n for n, ok in state.items() if not ok)},
                            status_code=503)

    @api.post("/v1/videos", summary="generate a video and answer with the MP4", response_class=Response,
              responses={200: {"content": {"video/mp4": {}}, "description": "H.264 MP4; X-Seed gives the seed"},
                         **ERRORS})
    async def create_video(self, body: VideoRequest) -> Response:
        request = self._request(body)
        try:
            result, retries = await self._cascade([request])
        except StageBusy as e:
            return self._busy(f"stage {e}")
        except StageUnavailable as e:
            return _error(503, f"stage {e}", {"Retry-After": str(self.args.retry_after_s)})
        except StageFailed as e:
            return _error(500, f"generation failed in {e}")
        trace = result["trace"]
        headers = {
            "X-Seed": str(request.seed),
            "X-Batch-Sizes": ",".join(f"{n}={trace[n][1]}" for n in STAGE_NAMES if n in trace),
            "X-Stage-Seconds": ",".join(f"{n}={trace[n][0]:.3f}" for n in STAGE_NAMES if n in trace),
            "X-Frame-Chunks": str(result["chunks"]),
        }
        if retries:
            headers["X-Retries"] = str(len(retries))
        if result["truncated"][0]:
            headers["X-Prompt-Truncated"] = "1"
        return Response(result["mp4"][0], media_type="video/mp4", headers=headers)

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

        async def on_stage(name, status):
            await self.store.stage.remote(job_id, name, status)

        async def on_retry(name, reason):
            await self.store.retry.remote(job_id, name, reason)

        try:
            result, _ = await self._cascade([request], on_stage, on_retry, wait_when_busy=True)
            data, fps, trace = result["mp4"][0], result["video_fps"][0], result["trace"]
            if self.args.output:
                url = join(self.args.output, f"{job_id}.mp4")
                await asyncio.to_thread(write_bytes_atomic, url, data)
                await self.store.finish.remote(job_id, video_fps=fps, trace=trace, output=url)
            else:
                await self.store.finish.remote(job_id, video_fps=fps, trace=trace, data=data)
        except asyncio.CancelledError:
            self.store.fail.remote(job_id, "the server stopped before the job finished")
            raise
        except StageFailed as e:
            await self.store.fail.remote(job_id, f"generation failed in {e}")
        except StageUnavailable as e:
            await self.store.fail.remote(job_id, f"stage {e}")
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

    # -- edits (Tune-A-Video) ----------------------------------------------------------------------

    @api.post("/v1/edits", summary="tune D^t on an uploaded clip, then edit it with each prompt; poll "
              "/v1/edits/{id}", status_code=202, response_model=JobCreated, responses=ERRORS)
    async def create_edit(
        self,
        http: HttpRequest,
        video: UploadFile = File(description="the source clip (an MP4, or any video ffmpeg reads)"),
        caption: str = Form("", max_length=4000, description="what the clip shows, e.g. 'a red circle on a white background'"),
        prompt: list[str] = Form([], description="an edit prompt; repeat the field for several (one video each)"),
        seed: int | None = Form(None, ge=0, le=MAX_SEED, description="seed of the first prompt (prompt i uses seed + i); random if omitted"),
        steps: int | None = Form(None, ge=1, le=1000, description="sampling steps of every diffusion stage (the bundle's if omitted)"),
        guidance: float | None = Form(None, ge=0, le=50, allow_inf_nan=False, description="D^t's guidance scale w"),
        tune_steps: int = Form(TUNE_DEFAULTS.steps, ge=1, le=MAX_TUNE_STEPS, description="optimizer steps of the tuning"),
        fps: int = Form(TUNE_DEFAULTS.fps, ge=1, le=30, description="keyframe rate the clip is sampled at"),
        inversion: bool = Form(True, description="D^t starts from the clip's DDIM-inverted noise (false: fresh noise)"),
    ) -> JSONResponse:
        seed = seed if seed is not None else random.SystemRandom().randrange(0, 2**31)
        self.edits.check_text(caption, prompt, seed)
        data = await video.read()
        clip = await asyncio.to_thread(self.edits.check_clip, data)
        params = {"caption": caption, "prompts": list(prompt), "seed": seed, "steps": steps, "guidance": guidance,
                  "tune_steps": tune_steps, "fps": fps, "inversion": inversion,
                  "clip": {"name": video.filename, "bytes": len(data), "frames": clip.frames, "fps": clip.fps,
                           "width": clip.width, "height": clip.height}}
        try:
            edit_id, full = await self.store.create_edit.remote(params, await self._replicas("tuner"))
        except BackPressureError:
            edit_id, full = None, "the job queue"
        if edit_id is None:
            return self._busy(full)
        call = self.tuner.tune.remote(edit_id, data, caption, {"steps": tune_steps, "fps": fps, "seed": seed})
        task = asyncio.get_running_loop().create_task(self._run_edit(edit_id, call, params))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        location = str(http.url_for("edit_status", edit_id=edit_id))
        return JSONResponse({"id": edit_id, "status": "queued", "seed": seed}, status_code=202,
                            headers={"Location": location})

    async def _run_edit(self, edit_id: str, call, params: dict) -> None:
        """The tuning, then the edit's rows through the stage deployments with the tuned D^t, then the videos
        kept or written; the work directory removed however it ends."""
        from workflows.tune.edit import edit_requests

        async def on_stage(name, status):
            await self.store.stage.remote(edit_id, name, status)

        async def on_retry(name, reason):
            await self.store.retry.remote(edit_id, name, reason)

        try:
            tuned = await call
            requests = edit_requests(tuned["fps"], params["prompts"], seed=params["seed"], steps=params["steps"],
                                     guidance=params["guidance"])
            result, _ = await self._cascade(requests, on_stage, on_retry, wait_when_busy=True,
                                            tuned={"bundle": tuned["bundle"], "inversion": params["inversion"]})
            mp4s, fps = result["mp4"], result["video_fps"][0]
            outputs = [None] * len(mp4s)
            if self.args.output:
                outputs = await asyncio.to_thread(write_videos, self.args.output, edit_id, mp4s)
            videos = [{"prompt": r.prompt, "seed": r.seed, "url": f"v1/edits/{edit_id}/videos/{i}", "output": out}
                      for i, (r, out) in enumerate(zip(requests, outputs))]
            await self.store.finish_edit.remote(edit_id, video_fps=fps, videos=videos, trace=result["trace"],
                                                data=None if self.args.output else mp4s)
        except asyncio.CancelledError:
            self.store.fail_edit.remote(edit_id, "the server stopped before the edit finished")
            raise
        except Exception as e:
            await self.store.fail_edit.remote(edit_id, _edit_failure(e))
        finally:
            try:
                await asyncio.to_thread(remove_work, self.args.work_dir, edit_id)
            except OSError:
                pass

    @api.get("/v1/edits/{edit_id}", summary="an edit's status: its tuning, each stage, the videos when done",
             response_model=EditStatus, responses=ERRORS)
    async def edit_status(self, edit_id: str) -> dict:
        edit = await self.store.edit.remote(edit_id)
        if edit is None:
            raise HTTPException(404, f"no edit {edit_id!r}")
        return edit

    @api.get("/v1/edits/{edit_id}/videos/{index}", summary="a finished edit's MP4 for prompt `index`",
             response_class=Response, responses={200: {"content": {"video/mp4": {}}}, **ERRORS})
    async def edit_video(self, edit_id: str, index: int) -> Response:
        from stages.fsio import read_bytes

        edit, data = await self.store.edit_video.remote(edit_id, index)
        if edit is None:
            raise HTTPException(404, f"no edit {edit_id!r}")
        if edit["status"] == "failed":
            return _error(409, f"edit {edit_id} failed: {edit['error']}")
        if edit["status"] != "done":
            return _error(409, f"edit {edit_id} is {edit['status']}; its videos are not ready yet", {"Retry-After": "1"})
        if not 0 <= index < len(edit["videos"]):
            raise HTTPException(404, f"edit {edit_id} has {len(edit['videos'])} videos; no video {index}")
        if data is None:
            try:
                data = await asyncio.to_thread(read_bytes, edit["videos"][index]["output"])
            except FileNotFoundError:
                raise HTTPException(404, f"video {index} of edit {edit_id} is gone") from None
        return Response(data, media_type="video/mp4", headers={"X-Seed": str(edit["videos"][index]["seed"])})


def _edit_failure(error: BaseException) -> str:
    """What failed in an edit, for its record: the tuning's own message, or the stage that failed."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, TuneFailed):
        return f"tuning failed: {cause}"
    if isinstance(cause, StageFailed):
        return f"editing failed in {cause}"
    if isinstance(cause, StageUnavailable):
        return f"stage {cause}"
    return f"{type(cause).__name__}: {cause}"[:500]
