"""The job table of ``POST /v1/jobs`` and ``POST /v1/edits``: a deployment of exactly one replica, so any
ingress replica answers for any job or edit."""

from __future__ import annotations

import time
import uuid
from collections import deque

from ray import serve

from stages.config import STAGE_NAMES

JOB_STATES = ("queued", "running", "done", "failed")
EDIT_STATES = ("queued", "tuning", "editing", "done", "failed")
TUNING_PHASES = ("waiting", "preparing", "training", "inverting", "done")


def _now() -> float:
    return round(time.time(), 3)


def _stages_done(job: dict, trace: dict | None) -> None:
    """Every stage of a finished job or edit done, with its seconds and batch size from ``trace`` (stage ->
    ``[seconds, batch_size]``) where it has them."""
    for entry in job["stages"]:
        seconds, batch_size = (trace or {}).get(entry["name"], (entry["seconds"], entry["batch_size"]))
        entry.update(status="done", seconds=seconds, batch_size=batch_size)


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class JobStore:
    """Job and edit states and (without ``output``) finished videos. Keep exactly one replica: it is the table.

    Jobs and edits share ``max_active_jobs`` and ``keep_finished_jobs``; an edit's videos are kept under
    ``(id, i)``. The table also counts the edits whose tuning runs, so that a new edit is refused at once
    when every tuner replica is taken.
    """

    def __init__(self, max_active_jobs: int, keep_finished_jobs: int) -> None:
        self.max_active = max_active_jobs
        self.keep = keep_finished_jobs
        self.jobs: dict[str, dict] = {}
        self.edits: dict[str, dict] = {}
        self.videos: dict[str | tuple[str, int], bytes] = {}
        self.finished: deque[str] = deque()
        self.active = 0
        self.tuning: set[str] = set()

    async def ready(self) -> dict:
        return {"jobs": len(self.jobs), "edits": len(self.edits), "active": self.active}

    async def create(self, params: dict) -> str | None:
        """A new queued job's id, or None when ``max_active_jobs`` are queued or running."""
        if self.active >= self.max_active:
            return None
        job_id = uuid.uuid4().hex
        self.jobs[job_id] = {
            "id": job_id, "status": "queued", "request": params, "created": _now(), "updated": _now(),
            "stages": [{"name": s, "status": "pending", "seconds": None, "batch_size": None} for s in STAGE_NAMES],
            "progress": 0.0, "error": None, "video_fps": None, "output": None, "retries": [],
        }
        self.active += 1
        return job_id

    async def stage(self, job_id: str, name: str, status: str, seconds: float | None = None,
                    batch_size: int | None = None) -> None:
        """A job's or an edit's stage ``name`` is ``status`` now."""
        job = self._open(job_id)
        if job is None:
            return
        if job_id in self.jobs:
            job["status"] = "running"
        for entry in job["stages"]:
            if entry["name"] == name:
                entry.update(status=status, seconds=seconds, batch_size=batch_size)
        self._update(job_id, job)

    async def retry(self, job_id: str, name: str, reason: str) -> None:
        """The job or edit resumes at stage ``name`` (its replica was lost): that stage and the later ones are
        pending again, and ``reason`` joins its ``retries``."""
        job = self._open(job_id)
        if job is None:
            return
        job["retries"].append(reason)
        names = [e["name"] for e in job["stages"]]
        for entry in job["stages"][names.index(name) if name in names else len(names):]:
            entry.update(status="pending", seconds=None, batch_size=None)
        self._update(job_id, job)

    def _open(self, job_id: str) -> dict | None:
        """The job or edit ``job_id`` while it is neither done nor failed."""
        job = self.jobs.get(job_id) or self.edits.get(job_id)
        return None if job is None or job["status"] in ("done", "failed") else job

    def _update(self, job_id: str, job: dict) -> None:
        if job_id in self.edits:
            self._edit_progress(job)
        else:
            self._progress(job)

    def _progress(self, job: dict) -> None:
        job["progress"] = sum(e["status"] == "done" for e in job["stages"]) / len(job["stages"])
        job["updated"] = _now()

    async def finish(self, job_id: str, *, video_fps: float, trace: dict | None = None, data: bytes | None = None,
                     output: str | None = None) -> None:
        """The job is done; ``trace`` maps a stage to ``[seconds, batch_size]``."""
        if self._close(job_id, "done"):
            job = self.jobs[job_id]
            job.update(video_fps=video_fps, output=output, progress=1.0)
            _stages_done(job, trace)
            if data is not None:
                self.videos[job_id] = data

    async def fail(self, job_id: str, error: str) -> None:
        if self._close(job_id, "failed"):
            self.jobs[job_id]["error"] = error

    def _close(self, job_id: str, status: str) -> bool:
        job = self.jobs.get(job_id) or self.edits.get(job_id)
        if job is None or job["status"] in ("done", "failed"):
            return False
        job.update(status=status, updated=_now())
        self.active -= 1
        self.tuning.discard(job_id)
        self.finished.append(job_id)
        while len(self.finished) > self.keep:
            old = self.finished.popleft()
            self.jobs.pop(old, None)
            edit = self.edits.pop(old, None)
            self.videos.pop(old, None)
            for i in range(len(edit["videos"]) if edit else 0):
                self.videos.pop((old, i), None)
        return True

    async def status(self, job_id: str) -> dict | None:
        return self.jobs.get(job_id)

    async def video(self, job_id: str) -> tuple[dict | None, bytes | None]:
        job = self.jobs.get(job_id)
        return job, self.videos.get(job_id) if job is not None else None

    # -- edits ------------------------------------------------------------------------------------

    async def create_edit(self, params: dict, tuners: int) -> tuple[str | None, str]:
        """A new edit's id, its tuning counted as running, or (None, what is full): ``max_active_jobs`` jobs
        and edits are queued or running, or ``tuners`` tunings run already."""
        if self.active >= self.max_active:
            return None, "the job queue"
        if len(self.tuning) >= tuners:
            return None, "the tuner (one tuning per replica)"
        edit_id = uuid.uuid4().hex
        self.edits[edit_id] = {
            "id": edit_id, "status": "queued", "request": params, "created": _now(), "updated": _now(),
            "tuning": {"phase": "waiting", "step": 0, "steps": params["tune_steps"], "loss": None, "seconds": None},
            "stages": [{"name": s, "status": "pending", "seconds": None, "batch_size": None} for s in STAGE_NAMES],
            "progress": 0.0, "error": None, "video_fps": None, "videos": [], "retries": [],
        }
        self.active += 1
        self.tuning.add(edit_id)
        return edit_id, ""

    async def edit_tuning(self, edit_id: str, phase: str, step: int = 0, loss: float | None = None,
                          seconds: float | None = None) -> None:
        """The edit's tuning reached ``phase`` (:data:`TUNING_PHASES`) and optimizer step ``step``; ``done``
        frees its tuner."""
        edit = self._open(edit_id)
        if edit is None:
            return
        edit["status"] = "tuning" if phase != "done" else "editing"
        edit["tuning"].update(phase=phase, step=step, loss=loss, seconds=seconds)
        if phase == "done":
            self.tuning.discard(edit_id)
        self._edit_progress(edit)

    def _edit_progress(self, edit: dict) -> None:
        """The tuning counts as one step beside the six stages, its share by optimizer steps."""
        tuning = edit["tuning"]
        tuned = 1.0 if tuning["phase"] == "done" else 0.9 * tuning["step"] / max(1, tuning["steps"])
        done = sum(e["status"] == "done" for e in edit["stages"])
        edit["progress"] = (tuned + done) / (1 + len(edit["stages"]))
        edit["updated"] = _now()

    async def finish_edit(self, edit_id: str, *, video_fps: float, videos: list[dict], trace: dict | None = None,
                          data: list[bytes] | None = None) -> None:
        """The edit is done: ``videos`` (one dict per prompt), their bytes ``data`` unless written elsewhere."""
        if self._close(edit_id, "done"):
            edit = self.edits[edit_id]
            edit.update(video_fps=video_fps, videos=videos, progress=1.0)
            _stages_done(edit, trace)
            for i, mp4 in enumerate(data or ()):
                self.videos[(edit_id, i)] = mp4

    async def fail_edit(self, edit_id: str, error: str) -> None:
        if self._close(edit_id, "failed"):
            self.edits[edit_id]["error"] = error

    async def edit(self, edit_id: str) -> dict | None:
        return self.edits.get(edit_id)

    async def edit_video(self, edit_id: str, index: int) -> tuple[dict | None, bytes | None]:
        edit = self.edits.get(edit_id)
        return edit, self.videos.get((edit_id, index)) if edit is not None else None
