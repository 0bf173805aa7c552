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


def test_edits_share_the_table_and_take_one_tuner_each():
    from workflows.serve.jobs import JobStore

    store = JobStore.func_or_class(max_active_jobs=3, keep_finished_jobs=4)
    run = asyncio.run
    params = {"seed": 0, "tune_steps": 10}
    first, _ = run(store.create_edit(params, 1))
    assert first and run(store.create_edit(params, 1)) == (None, "the tuner (one tuning per replica)")

    run(store.edit_tuning(first, "training", 5, 0.25))
    edit = run(store.edit(first))
    assert edit["status"] == "tuning" and edit["tuning"]["step"] == 5
    assert edit["progress"] == 0.9 * 5 / 10 / (1 + len(STAGE_NAMES))
    run(store.edit_tuning(first, "done", 10, 0.2, 3.5))
    assert run(store.edit(first))["status"] == "editing"
    second, _ = run(store.create_edit(params, 1))  # the tuning is over: the tuner takes the next edit
    assert second and run(store.create({"seed": 1}))  # jobs and edits share max_active_jobs
    assert run(store.create_edit(params, 2)) == (None, "the job queue")

    run(store.stage(first, "clip", "done"))
    assert run(store.edit(first))["status"] == "editing"
    run(store.finish_edit(first, video_fps=20.0, videos=[{"prompt": "p", "seed": 0}], data=[b"mp4"]))
    assert run(store.edit_video(first, 0)) == (run(store.edit(first)), b"mp4")
    assert run(store.edit(first))["progress"] == 1.0
    run(store.fail_edit(second, "tuning failed: boom"))  # a failed tuning frees its tuner
    assert run(store.edit(second))["error"] == "tuning failed: boom" and not store.tuning
    assert run(store.edit_video(second, 0)) == (run(store.edit(second)), None)
