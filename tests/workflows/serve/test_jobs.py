"""The job table as a plain class (Serve's decorator keeps it as ``func_or_class``): admission, progress,
and forgetting the oldest finished jobs."""

import asyncio

from stages.config import STAGE_NAMES


def test_job_table_admits_tracks_and_forgets():
    from workflows.serve.jobs import JobStore

    store = JobStore.func_or_class(max_active_jobs=2, keep_finished_jobs=1)
    run = asyncio.run
    first, second = run(store.create({"seed": 1})), run(store.create({"seed": 2}))
    assert first and second and first != second
    assert run(store.create({"seed": 3})) is None  # two queued or running: full

    run(store.stage(first, "clip", "done", 0.5, 2))
    job = run(store.status(first))
    assert job["status"] == "running" and job["progress"] == 1 / len(STAGE_NAMES)
    assert job["stages"][0] == {"name": "clip", "status": "done", "seconds": 0.5, "batch_size": 2}

    run(store.finish(first, video_fps=10.0, data=b"mp4"))
    assert run(store.video(first)) == (run(store.status(first)), b"mp4")
    assert run(store.status(first))["progress"] == 1.0
    third = run(store.create({"seed": 3}))  # a finished job frees its place
    assert third is not None

    run(store.fail(second, "boom"))  # keep_finished_jobs=1: the first finished job is forgotten
    assert run(store.status(first)) is None and run(store.video(first)) == (None, None)
    assert run(store.status(second))["error"] == "boom"
    run(store.finish(second, video_fps=10.0, data=b"late"))  # a closed job stays as it closed
    assert run(store.status(second))["status"] == "failed" and run(store.video(second))[1] is None
