"""`mav batch` on a real local Ray instance, prompt files and outputs on an S3-compatible server on loopback."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from workflows.batch import JobSpec, run_job
from workflows.engine import ROW_KEY, StageSpec, StreamingExecutor
from workflows.inputs import InputError
from workflows.pools import PoolConfig, parse_pools

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

POOLS = """
clip: {actors: 1, gpus: 0.25, cpus: 0.5, batch_size: 4}
prior: {actors: 1, gpus: 0.25, cpus: 0.5, batch_size: 4}
decoder: {actors: 1, gpus: 0.25, cpus: 0.5, batch_size: 2}
interpolation: {actors: 1, gpus: 0.25, cpus: 0.5, batch_size: 2}
sr_low: {actors: {min: 1, max: 2}, gpus: 0.25, cpus: 0.5, batch_size: 1}
sr_high: {actors: 1, gpus: 0.25, cpus: 0.5, batch_size: 1}
writer: {actors: 1, cpus: 0.5, batch_size: 2}
"""


@pytest.fixture
def pools():
    return parse_pools(POOLS)


def _put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)


def _manifest(output: str) -> list[dict]:
    with fsspec.open(f"{output}/manifest.parquet", "rb") as f:
        return pq.read_table(f).to_pylist()


def _videos(output: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(output)
    return sorted(p for p in fs.ls(path, detail=False) if p.endswith(".mp4"))


def test_every_input_format_from_s3(ray_session, s3_bucket, tiny_preset_file, pools):
    b = s3_bucket
    _put(f"{b}/in/a.txt", b"a red ball\n\n   \na blue square\n")
    _put(f"{b}/in/b.jsonl", b'{"prompt": "a green circle", "seed": 5, "fps": 8, "id": "green"}\n')
    _put(f"{b}/in/c.csv", b"prompt,seed,negative_prompt\na yellow star,9,blurry\n")
    table = pa.table({"prompt": ["a white cube"], "id": ["cube/../../etc"], "seed": [3]})
    with fsspec.open(f"{b}/in/d.parquet", "wb") as f:
        pq.write_table(table, f)
    result = run_job(JobSpec(prompts=(f"{b}/in/*",), output=f"{b}/out", preset=tiny_preset_file), pools)
    assert (result.ok, result.failed) == (5, 0)
    rows = {r["id"]: r for r in _manifest(f"{b}/out")}
    assert set(rows) == {"a-000001", "a-000004", "green", "c-000001", "cube/../../etc"}  # blank lines skipped
    assert rows["green"]["seed"] == 5 and rows["green"]["fps"] == 8
    assert rows["c-000001"]["negative_prompt"] == "blurry"
    videos = _videos(f"{b}/out")
    assert len(videos) == 5
    assert all("/out/" in v and ".." not in v.split("/out/")[1] and "/" not in v.split("/out/")[1] for v in videos)
    for r in rows.values():
        assert r["status"] == "ok" and r["output"].startswith(f"{b}/out/")
        assert all(r[f"seconds_{s}"] > 0 for s in ("clip", "prior", "decoder", "interpolation", "sr_low", "sr_high"))


def test_bad_rows_fail_alone_and_the_job_goes_on(ray_session, tmp_path, tiny_preset_file, pools):
    src = tmp_path / "p.jsonl"
    long_prompt = " ".join(["word"] * 120)
    src.write_bytes(
        b'{"prompt": "fine", "id": "ok1"}\n'
        b'{"prompt": "bad fps", "fps": 99, "id": "badfps"}\n'
        b'{"prompt": "again", "id": "ok1"}\n'
        + json.dumps({"prompt": long_prompt, "id": "long"}).encode() + b"\n"
        + b'{"prompt": "caf\xff", "id": "bytes"}\n'
        + b'{"prompt": "steps", "steps": "many", "id": "badsteps"}\n'
    )
    out = tmp_path / "out"
    result = run_job(JobSpec(prompts=(str(src),), output=str(out), preset=tiny_preset_file), pools)
    manifest = _manifest(str(out))
    assert [(r["status"], "duplicate id" in r["error"]) for r in manifest if r["id"] == "ok1"] == [("ok", False), ("failed", True)]
    rows = {r["id"]: r for r in manifest}
    assert rows["long"]["status"] == "ok"
    assert rows["long"]["truncated"] is True and result.truncated == 1
    assert "fps" in rows["badfps"]["error"] and rows["badfps"]["status"] == "failed"
    assert "steps" in rows["badsteps"]["error"]
    assert "UTF-8" in rows["p-000005"]["error"]  # an undecodable line keeps its line-number id
    assert len(manifest) == 6 and result.failed == 4 and result.ok == 2
    assert len(_videos(str(out))) == 2


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", b"\n\n", "empty"),
        ("cols.csv", b"promt,seed\nx,1\n", "unknown column 'promt'"),
        ("cols.jsonl", b'{"prompt": "x", "colour": "red"}\n', "unknown column 'colour'"),
        ("prompts.json", b"[]", "unsupported prompt file type"),
    ],
)
def test_unusable_input_is_rejected_before_anything_is_written(ray_session, tmp_path, tiny_preset_file, pools, name, content, match):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match):
        run_job(JobSpec(prompts=(str(tmp_path / name),), output=str(out), preset=tiny_preset_file), pools)
    assert not out.exists() or not any(out.iterdir())


def test_missing_bucket(ray_session, s3_server, tiny_preset_file, pools, tmp_path):
    with pytest.raises(InputError, match="no such file or bucket"):
        run_job(JobSpec(prompts=("s3://no-such-bucket-mav/p.txt",), output=str(tmp_path / "o"), preset=tiny_preset_file), pools)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrong_credentials(ray_session, tmp_path, tiny_preset_file, pools, monkeypatch):
    """An S3 server that checks credentials (moto with IAM auth on) refuses unknown keys."""
    import s3fs

    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(InputError, match="access denied|no such file"):
            run_job(JobSpec(prompts=("s3://bucket/p.txt",), output=str(tmp_path / "o"), preset=tiny_preset_file), pools)
    finally:
        server.terminate()
        server.wait()
        s3fs.S3FileSystem.clear_instance_cache()


def test_same_video_as_mav_generate(ray_session, tmp_path, tiny_preset_file, pools, one_thread):
    from workflows.cli import main

    (tmp_path / "p.jsonl").write_text('{"prompt": "a red ball", "seed": 42, "fps": 7, "id": "ball"}\n')
    single = parse_pools(POOLS.replace("batch_size: 4", "batch_size: 1").replace("batch_size: 2", "batch_size: 1"))
    run_job(JobSpec(prompts=(str(tmp_path / "p.jsonl"),), output=str(tmp_path / "out"), preset=tiny_preset_file), single)
    # On two threads the tiny untrained SR_h turned a one-level rounding difference in its input into dozens.
    assert main(["generate", "a red ball", "--seed", "42", "--fps", "7", "--preset", tiny_preset_file,
                 "--out", str(tmp_path / "gen.mp4")]) == 0
    [video] = _videos(str(tmp_path / "out"))
    assert open(video, "rb").read() == (tmp_path / "gen.mp4").read_bytes()


def test_resume_generates_only_what_is_missing(ray_session, tmp_path, tiny_preset_file, pools):
    src = tmp_path / "p.txt"
    src.write_text("one\ntwo\nthree\n")
    out = str(tmp_path / "out")
    first = run_job(JobSpec(prompts=(str(src),), output=out, preset=tiny_preset_file), pools)
    assert first.ok == 3
    mtimes = {p: os.path.getmtime(p) for p in _videos(out)}
    src.write_text("one\ntwo\nthree\nfour\n")
    second = run_job(JobSpec(prompts=(str(src),), output=out, preset=tiny_preset_file), pools)
    assert (second.ok, second.skipped) == (4, 3)
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items())  # nothing regenerated
    assert len(_videos(out)) == 4


def test_interrupt_then_resume_produces_every_video_exactly_once(tmp_path, tiny_preset_file):
    """Ctrl-C a real `mav batch` mid-job, rerun the same command: every row once, none lost."""
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"prompt {i}", "steps": 12}) + "\n" for i in range(24)))
    (tmp_path / "pools.yaml").write_text(POOLS)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "workflows.cli", "batch", "--prompts", str(src), "--output", str(out),
           "--preset", tiny_preset_file, "--pools", str(tmp_path / "pools.yaml")]
    # Ctrl-C as from a terminal: a test run started in the background ignores SIGINT, and so would its children.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while time.time() < deadline and not (out.exists() and len(list(out.glob("*.mp4"))) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    interrupted = {r["id"]: r["status"] for r in _manifest(str(out))}
    assert "pending" in interrupted.values()  # it really stopped mid-job
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rows = _manifest(str(out))
    assert len(rows) == 24 and all(r["status"] == "ok" for r in rows)
    assert len({r["id"] for r in rows}) == 24
    assert len(list(out.glob("*.mp4"))) == 24
    journal_ids = [json.loads(line)["id"] for part in (out / "_journal").iterdir() for line in part.read_text().splitlines()]
    assert sorted(journal_ids) == sorted(r["id"] for r in rows)  # each row generated into the output once
    assert not list(out.glob(".tmp-*"))


# -- the executor on its own ---------------------------------------------------------------------

class AddOne:
    def __call__(self, batch):
        return {**batch, "x": batch["x"] + 1}


class DieOnce:
    """Kills its own process the first time it sees row 5 (a marker file makes it once per test)."""

    def __init__(self, marker):
        self.marker = marker

    def __call__(self, batch):
        if 5 in batch[ROW_KEY] and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return {**batch, "x": batch["x"] * 10}


class Collect:
    def __init__(self, log):
        self.log = log

    def __call__(self, batch):
        with open(self.log, "a") as f:
            for k in batch[ROW_KEY]:
                f.write(f"{k}\n")
        return batch


def test_killed_actor_is_replaced_and_rows_produced_exactly_once(ray_session, tmp_path):
    pool = PoolConfig(cpus=0.5, batch_size=2)
    specs = [
        StageSpec("add", AddOne, pool),
        StageSpec("die", lambda: DieOnce(str(tmp_path / "died")), PoolConfig(cpus=0.5, batch_size=3)),
        StageSpec("collect", lambda: Collect(str(tmp_path / "log")), pool),
    ]
    executor = StreamingExecutor(specs)
    out = {}
    for c in executor.run({ROW_KEY: i, "x": i} for i in range(20)):
        assert not c.failed
        for k, x in zip(c.batch[ROW_KEY], c.batch["x"]):
            assert int(k) not in out
            out[int(k)] = int(x)
    executor.shutdown()
    assert (tmp_path / "died").exists()
    assert out == {i: (i + 1) * 10 for i in range(20)}
    logged = [int(line) for line in (tmp_path / "log").read_text().split()]
    assert sorted(logged) == list(range(20))  # the last stage saw every row exactly once


class FailOn:
    def __call__(self, batch):
        if 3 in batch[ROW_KEY]:
            raise ValueError("row 3 is bad")
        return batch


def test_a_row_that_raises_fails_alone(ray_session):
    executor = StreamingExecutor([StageSpec("f", FailOn, PoolConfig(cpus=0.5, batch_size=4))])
    ok, failed = set(), {}
    for c in executor.run({ROW_KEY: i, "x": i} for i in range(8)):
        failed.update(c.failed)
        if c.batch is not None:
            ok.update(int(k) for k in c.batch[ROW_KEY])
    executor.shutdown()
    assert ok == set(range(8)) - {3}
    assert failed == {3: ("f", "ValueError: row 3 is bad")}


def test_rows_in_flight_are_bounded(ray_session):
    """The driver admits rows only as earlier ones finish: the source is never read far ahead."""
    import time as _time

    class Slow:
        def __call__(self, batch):
            _time.sleep(0.05)
            return batch

    pool = PoolConfig(cpus=0.5, batch_size=2, queue_depth=2)
    executor = StreamingExecutor([StageSpec("s", Slow, pool)])
    consumed = []
    finished = 0
    peak = 0

    def source():
        for i in range(40):
            consumed.append(i)
            yield {ROW_KEY: i, "x": i}

    for c in executor.run(source()):
        finished += len(c.batch[ROW_KEY])
        peak = max(peak, len(consumed) - finished)
    executor.shutdown()
    assert finished == 40
    assert peak <= executor.max_rows_in_flight


# -- pools file ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, match",
    [
        ("decoderr: {actors: 1}", "unknown stage 'decoderr'"),
        ("decoder: {actorz: 1}", "unknown key 'decoder.actorz'"),
        ("decoder: {actors: {min: 3, max: 2}}", "min <= max"),
        ("decoder: {gpus: -1}", "gpus and cpus must be >= 0"),
        ("decoder: {batch_size: 0}", "batch_size must be >= 1"),
        ("decoder: {actors: two}", "decoder.actors: expected an integer"),
        ("decoder: [1, 2", "invalid YAML"),
    ],
)
def test_pools_errors(text, match):
    from stages.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        parse_pools(text)


def test_default_pools_file_and_one_stage_change():
    from workflows.pools import load_pools

    pools = load_pools()
    assert set(pools) == {"clip", "prior", "decoder", "interpolation", "sr_low", "sr_high", "writer"}
    changed = parse_pools("decoder: {actors: 3, gpus: 0.5, batch_size: 8}")
    assert changed["decoder"] == PoolConfig(min_actors=3, max_actors=3, gpus=0.5, batch_size=8)
    assert changed["sr_low"] == PoolConfig()  # other stages keep their defaults


def test_cluster_manifests_name_the_pools_file():
    import yaml

    here = os.path.join(os.path.dirname(__file__), "..", "..", "cluster")
    names = ["ray-cluster-aws.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob-batch.yaml"]
    for name in names:
        with open(os.path.join(here, name)) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        assert docs, name
        assert "cluster/pools.yaml" in json.dumps(docs), name
