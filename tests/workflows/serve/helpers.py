"""What the Serve tests share besides fixtures: the deployed application's handle and small HTTP helpers."""

import asyncio
import socket
import time
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_mp4(data: bytes) -> bool:
    return len(data) > 12 and data[4:8] == b"ftyp"


@dataclass
class App:
    url: str
    preset: str               # the stages' preset file
    output: str               # where job videos go (S3 on moto)
    key: str                  # the ingress's MAV_API_KEY
    max_active_jobs: int
    work: str                 # where edits keep their clip and tuned bundle while they run

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 180), **kw)

    def post_many(self, path: str, bodies: list[dict]) -> list[httpx.Response]:
        """``bodies`` posted to ``path`` all at once."""
        async def post():
            async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=300) as c:
                return await asyncio.gather(*(c.post(path, json=b) for b in bodies))

        return asyncio.run(post())


def wait_job(client: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        assert time.monotonic() < deadline, f"job stuck: {job}"
        time.sleep(0.2)


def wait_edit(client: httpx.Client, edit_id: str, timeout: float = 240) -> tuple[dict, list[dict]]:
    """The edit once done or failed, and every distinct state seen on the way."""
    deadline, seen = time.monotonic() + timeout, []
    while True:
        edit = client.get(f"v1/edits/{edit_id}").json()
        if not seen or {k: v for k, v in edit.items() if k != "updated"} != {k: v for k, v in seen[-1].items() if k != "updated"}:
            seen.append(edit)
        if edit["status"] in ("done", "failed"):
            return edit, seen
        assert time.monotonic() < deadline, f"edit stuck: {edit}"
        time.sleep(0.2)
