"""`mav batch` on a real local Ray instance, prompt files and outputs on an S3-compatible server on loopback."""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages.fsio import read_yaml_mapping
from workflows.batch import JobSpec, run_job
from workflows.inputs import InputError
from workflows.pools import parse_pools
from workflows.progress import RowBars

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
    """Rows that fail on their own are recorded with the reason; the others go through every stage, counted
    per stage in the progress log (totals, rate, ETA)."""
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
    log = io.StringIO()
    result = run_job(JobSpec(prompts=(str(src),), output=str(out), preset=tiny_preset_file), pools,
                     progress=RowBars(log, every=3600))
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
    last = log.getvalue().splitlines()[-7:]  # with a long period: the first update and the final one
    assert [line.split()[0] for line in last] == ["clip", "prior", "decoder", "interpolation", "sr_low", "sr_high",
                                                   "writer"]
    assert all(re.search(r" 2/2 rows \[\d\d:\d\d<00:00, +[\d.]+\w*(rows?/s|s/row)\], busy \d/\d, queued 0$", line)
               for line in last), last


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


def test_interrupt_then_resume_produces_every_video_exactly_once(tmp_path, tiny_preset_file):
    """Ctrl-C a real `mav batch` mid-job, then rerun the same command over the prompt file with one more line:
    every row once, none lost, the videos already written left as they are."""
    src = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": f"prompt {i}", "steps": 6}) + "\n" for i in range(11)]
    src.write_text("".join(lines[:10]))
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
    written = {p: os.path.getmtime(p) for p in _videos(str(out))}
    src.write_text("".join(lines))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rows = _manifest(str(out))
    assert len(rows) == 11 and all(r["status"] == "ok" for r in rows)
    assert len({r["id"] for r in rows}) == 11
    assert len(list(out.glob("*.mp4"))) == 11
    assert all(os.path.getmtime(p) == t for p, t in written.items())  # nothing regenerated
    journal_ids = [json.loads(line)["id"] for part in (out / "_journal").iterdir() for line in part.read_text().splitlines()]
    assert sorted(journal_ids) == sorted(r["id"] for r in rows)  # each row generated into the output once
    assert not list(out.glob(".tmp-*"))


@pytest.fixture(scope="module")
def shared_noise_preset(tmp_path_factory, tiny_preset_file) -> str:
    """The tiny preset with D^t's frames sharing half their noise, so motion guidance has something to move."""
    data = read_yaml_mapping(tiny_preset_file)
    data["decoder"]["frame_noise"] = {"shared": 0.5}
    path = tmp_path_factory.mktemp("preset") / "tiny-shared.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_motion_column_in_every_format(ray_session, tmp_path, shared_noise_preset, pools):
    """``motion``: [dy, dx] in JSONL, "dy dx" in CSV, a list in Parquet; recorded in the manifest; a bad value
    fails its row with a reason naming motion; a rerun finds every motion unchanged."""
    rows = [
        {"prompt": "a red ball", "seed": 1, "id": "still"},
        {"prompt": "a red ball", "seed": 1, "id": "moving", "motion": [0.1, -0.25]},
        {"prompt": "a red ball", "seed": 1, "id": "null", "motion": None},
        {"prompt": "a red ball", "id": "fast", "motion": [0.6, 0]},
        {"prompt": "a red ball", "id": "one", "motion": [0.1]},
        {"prompt": "a red ball", "id": "text", "motion": "up"},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.csv").write_text('prompt,id,motion\na blue square,csv,0.05 0.1\na blue square,csv-empty,\n'
                                    'a blue square,csv-bad,"0.1,0.2"\n')
    with fsspec.open(str(tmp_path / "c.parquet"), "wb") as f:
        pq.write_table(pa.table({"prompt": ["a cube", "a cube"], "id": ["pq", "pq-null"],
                                 "motion": [[0.0, 0.2], None]}), f)
    job = JobSpec(prompts=(str(tmp_path / "a.jsonl"), str(tmp_path / "b.csv"), str(tmp_path / "c.parquet")),
                  output=str(tmp_path / "out"), preset=shared_noise_preset)
    result = run_job(job, pools)
    got = {r["id"]: r for r in _manifest(job.output)}
    assert {k: r["status"] for k, r in got.items() if r["status"] != "ok"} == {
        "fast": "failed", "one": "failed", "text": "failed", "csv-bad": "failed"}
    assert result.ok == 7
    for rid in ("fast", "one", "text", "csv-bad"):
        assert got[rid]["error"].startswith("motion: "), got[rid]["error"]
    assert got["moving"]["motion"] == pytest.approx([0.1, -0.25]) and got["still"]["motion"] is None
    assert got["null"]["motion"] is None and got["csv-empty"]["motion"] is None and got["pq-null"]["motion"] is None
    assert got["csv"]["motion"] == pytest.approx([0.05, 0.1]) and got["pq"]["motion"] == pytest.approx([0.0, 0.2])
    videos = {rid: open(got[rid]["output"], "rb").read() for rid in ("still", "moving", "null")}
    assert videos["still"] == videos["null"] != videos["moving"]  # same seed: only the motion differs
    again = run_job(job, pools)
    assert (again.ok, again.skipped) == (7, 7)
