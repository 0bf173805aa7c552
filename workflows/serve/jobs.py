"""The job table of ``POST /v1/jobs``: a deployment of exactly one replica, so any ingress replica answers
for any job."""

from __future__ import annotations

import time
import uuid
from collections import deque

from ray import serve

from stages.config import STAGE_NAMES

JOB_STATES = ("queued", "running", "done", "failed")


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
            "progress": 0.0, "error": None, "video_fps": None, "output": None, "retries": [],
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
        self._progress(job)

    async def retry(self, job_id: str, name: str, reason: str) -> None:
        """The job resumes at stage ``name`` (its replica was lost): that stage and the later ones are
        pending again, and ``reason`` joins the job's ``retries``."""
        job = self.jobs.get(job_id)
        if job is None or job["status"] in ("done", "failed"):
            return
        job["retries"].append(reason)
        names = [e["name"] for e in job["stages"]]
        for entry in job["stages"][names.index(name) if name in names else len(names):]:
            entry.update(status="pending", seconds=None, batch_size=None)
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
            for entry in job["stages"]:
                seconds, batch_size = (trace or {}).get(entry["name"], (entry["seconds"], entry["batch_size"]))
                entry.update(status="done", seconds=seconds, batch_size=batch_size)
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
