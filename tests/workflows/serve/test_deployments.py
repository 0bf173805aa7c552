"""The stage deployments: dynamic batching (with and without Serve), SR_h's frames in chunks, and a job that
loses a stage replica while it runs."""

import asyncio

import httpx
import numpy as np
import pytest

from stages.config import ConfigError, from_dict

from .helpers import is_mp4, wait_job


def test_stage_batches_are_split_back_row_by_row(tiny_preset_file):
    """The batching core without Serve: concatenated rows give each request what it gets alone."""
    from workflows import columns
    from workflows.pipeline import Request, to_batch
    from workflows.runners import DecoderRunner, PriorRunner, TextEncoderRunner

    clip, prior, decoder = (cls(preset=tiny_preset_file, device="cpu") for cls in (TextEncoderRunner, PriorRunner, DecoderRunner))
    items = [to_batch([Request(prompt=p, seed=s, steps=st)]) for p, s, st in (("a", 1, 2), ("b", 2, 1), ("a", 3, 2))]
    items.append(to_batch([Request(prompt="c", seed=4), Request(prompt="d", seed=5)]))  # a request may carry rows
    alone = [decoder(prior(clip(item))) for item in items]
    together = columns.split(decoder(prior(clip(columns.concat(items)))), [1, 1, 1, 2])
    for one, back in zip(alone, together):
        assert set(back) == set(one) and list(back["seed"]) == list(one["seed"])
        assert np.abs(back["video"].astype(int) - one["video"].astype(int)).max() <= 1


def test_sr_high_chunks_joined_are_the_whole_video_bit_for_bit(tiny_preset_file, one_thread):
    """Each chunk of SR_h's frames is run with the video's own noise: joined, the chunks are the frames the
    whole video gives, to the last bit, however many chunks (more chunks than passes: some are empty)."""
    from workflows.pipeline import Request, to_batch
    from workflows.runners import RUNNER_OF
    from workflows.serve.deployments import frame_chunk

    sr_high = RUNNER_OF["sr_high"](preset=tiny_preset_file, device="cpu")
    rng = np.random.default_rng(0)
    rows = {**to_batch([Request(prompt="x", seed=5), Request(prompt="y", seed=6)]),
            "video": rng.integers(0, 256, (2, 3, 7, 16, 16), dtype=np.uint8)}
    whole = sr_high(rows)["video"]
    fb = sr_high.cfg.frame_batch
    assert whole.shape[2] == 7 and fb < 7  # more than one pass
    for n in (2, 3):
        parts = [frame_chunk(7, (k, n), fb) for k in range(n)]
        assert [p.start for p in parts][0] == 0 and all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        assert all(p.start % fb == 0 for p in parts) and parts[-1].stop == 7
        chunks = [sr_high({**rows, "video": rows["video"][:, :, p]})["video"] for p in parts if p.start < p.stop]
        assert np.array_equal(np.concatenate(chunks, axis=2), whole), n
    assert frame_chunk(7, (0, 3), fb) == slice(0, 0)  # two passes, three chunks: one is empty


def test_batch_settings_are_checked_by_name():
    from workflows.serve.deployments import BatchSettings

    assert from_dict(BatchSettings, {"max_batch_size": 16}).max_batch_size == 16
    for bad, name in (({"max_batch_size": 0}, "max_batch_size"), ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s"),
                      ({"max_batch_sise": 2}, "max_batch_sise")):
        with pytest.raises(ConfigError, match=name):
            from_dict(BatchSettings, bad, where="decoder.user_config")


def test_16_concurrent_requests_are_answered_and_batched(serve_app):
    from ray import serve

    bodies = [{"prompt": f"a shape number {i}", "seed": 100 + i} for i in range(16)]
    responses = serve_app.post_many("v1/videos", bodies)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1
    for r in responses:
        if r.status_code == 200:
            assert is_mp4(r.content)
        else:
            assert int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"]
    sizes = [int(kv.split("=")[1]) for r in responses if r.status_code == 200 for kv in r.headers["x-batch-sizes"].split(",")]
    assert max(sizes) > 1, "no stage ever ran two requests in one forward pass"
    stats = serve.get_deployment_handle("clip", app_name="mav").stats.remote().result()
    assert max(int(n) for n in stats["batch_sizes"]) > 1 and stats["max_batch_size"] == 8


def _replicas(stage: str) -> list[dict]:
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::mav#{stage}#")]


def _kill_while_running(serve_app, stage: str, replicas: list[dict], body: dict, also: int = 0):
    """Start a job (and ``also`` plain requests), kill ``replicas`` of ``stage`` while the job's calls of that
    stage are on them; returns the job's id and the plain requests' responses."""
    import ray

    from stages.config import STAGE_NAMES

    async def run():
        async with httpx.AsyncClient(base_url=serve_app.url, headers=serve_app.headers, timeout=300) as c:
            job_id = (await c.post("v1/jobs", json={**body, "seed": 0})).json()["id"]
            inflight = [asyncio.ensure_future(c.post("v1/videos", json={**body, "seed": i})) for i in range(1, also + 1)]
            while True:
                job = (await c.get(f"v1/jobs/{job_id}")).json()
                status = job["stages"][STAGE_NAMES.index(stage)]["status"]
                assert status != "done", f"{stage} finished before it could be killed"
                if status == "running":
                    break
                await asyncio.sleep(0.05)
            for replica in replicas:
                ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
            return job_id, await asyncio.gather(*inflight)

    return asyncio.run(run())


def test_job_resumes_where_its_stage_replica_died(serve_app, client):
    """The decoder's only replica is killed while it holds the job and three requests: each resumes at the
    decoder once Serve has replaced the replica, and the job ends done, its retry recorded."""
    body = {"prompt": "a survivor", "seed": 77}
    before = client.post("v1/videos", json=body).content
    [replica] = _replicas("decoder")
    job_id, responses = _kill_while_running(serve_app, "decoder", [replica], {"prompt": "in flight", "steps": 60}, also=3)
    assert [r.status_code for r in responses] == [200] * 3, [(r.status_code, r.text[:200]) for r in responses]
    job = wait_job(client, job_id)
    assert job["status"] == "done", job
    assert len(job["retries"]) == 1 and job["retries"][0].startswith("decoder: ActorDiedError"), job["retries"]
    assert all(s["status"] == "done" for s in job["stages"])
    assert client.post("v1/videos", json=body).content == before  # a new replica, the same video
    after = [a["name"] for a in _replicas("decoder")]
    assert replica["name"] not in after and len(after) == 1


def test_lost_sr_high_chunks_run_again(serve_app, client):
    """Both SR_h replicas die while they hold the job's two chunks: the chunks run again on their
    replacements, and the video is the one the same request makes without a loss."""
    from .conftest import SR_HIGH_REPLICAS

    body = {"prompt": "a chunk survivor", "steps": 40}
    replicas = _replicas("sr_high")
    assert len(replicas) == SR_HIGH_REPLICAS
    job_id, _ = _kill_while_running(serve_app, "sr_high", replicas, body)
    job = wait_job(client, job_id)
    assert job["status"] == "done", job
    assert [r.split(":")[0] for r in job["retries"]] == ["sr_high"], job["retries"]
    video = client.get(f"v1/jobs/{job_id}/video").content
    assert video == client.post("v1/videos", json={**body, "seed": 0}).content
