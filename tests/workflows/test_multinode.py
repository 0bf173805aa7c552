"""More than one node: a local multi-node cluster (``local_cluster``: a head and worker nodes, each with its own
resources and a custom resource per node type), joined by ``mav batch`` and ``mav train`` with ``--address``
from subprocesses, as ``ray job submit`` drivers do. Worker nodes are killed mid-job."""

import json
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
import yaml

from workflows.shapes.data import synth
from workflows.train import read_metrics

pytestmark = pytest.mark.timeout(600)

HEAD, WORKER = "node_type_head", "node_type_worker"
# sr_high is pinned to the worker node type, every other pool to the head.
POOLS = {stage: {"actors": 1, "cpus": 0.25, "resources": {HEAD: 1}}
         for stage in ("clip", "prior", "decoder", "interpolation", "sr_low", "writer")}
POOLS["sr_high"] = {"actors": 1, "cpus": 0.25, "resources": {WORKER: 1}}

PLACES = """
import json, sys, ray
ray.init(address=sys.argv[1])
nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("node_type_")) for n in ray.nodes()}
actors = ray._private.state.actors()
print(json.dumps([[a["Name"], nodes.get(a["Address"]["NodeID"], [])] for a in actors.values() if a["Name"]]))
"""


def _places(address: str) -> dict[str, set[str]]:
    """Node types every ``mav batch`` stage actor of the cluster ran on (dead ones included), by stage."""
    out = subprocess.run([sys.executable, "-c", PLACES, address], capture_output=True, text=True, timeout=120)
    places: dict[str, set[str]] = {}
    for name, types in json.loads(out.stdout.strip().splitlines()[-1]):
        if name.startswith("mav-"):
            places.setdefault(name.split("-")[2], set()).update(types)
    return places


class Stderr:
    """A ``mav`` subprocess whose stderr lines are collected as they come (so its pipe never fills)."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(line.rstrip() for line in self.proc.stderr))
        self.reader.start()

    def wait_for(self, prefix: str, after: int = 0, timeout: float = 120) -> str:
        """The first line from line ``after`` on that starts with ``prefix``."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            found = [line for line in self.lines[after:] if line.startswith(prefix)]
            if found:
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"no line {prefix!r} in:\n" + "\n".join(self.lines[-20:]))

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self.reader.join()
        return code, "\n".join(self.lines)


def test_pinned_pool_runs_only_on_its_node_type_and_a_lost_node_loses_no_row(local_cluster, tmp_path, tiny_preset_file):
    cluster = local_cluster(num_cpus=2, resources={HEAD: 100})
    worker = cluster.add_node(num_cpus=1, resources={WORKER: 100})
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"prompt {i}", "steps": 30}) + "\n" for i in range(4)))
    (tmp_path / "pools.yaml").write_text(yaml.safe_dump(POOLS))
    out = tmp_path / "out"
    job = Stderr([sys.executable, "-m", "workflows.cli", "batch", "--prompts", str(src), "--output", str(out),
                  "--preset", tiny_preset_file, "--pools", str(tmp_path / "pools.yaml"), "--address", cluster.address])
    deadline = time.time() + 300
    while time.time() < deadline and job.proc.poll() is None and not (out.exists() and list(out.glob("*.mp4"))):
        time.sleep(0.2)
    seen = len(job.lines)
    cluster.remove_node(worker)  # SR_h's node dies with rows left in its queue
    # Its actor cannot go anywhere else until a node of its type joins, and the job says so.
    assert job.wait_for("waiting for resources: ", after=seen) == "waiting for resources: sr_high 1 actor (0.25 CPU, 1 node_type_worker each)"
    cluster.add_node(num_cpus=1, resources={WORKER: 100})
    code, err = job.finish()
    assert code == 0, err
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    journal = [json.loads(line)["id"] for part in (out / "_journal").iterdir() for line in part.read_text().splitlines()]
    assert sorted(journal) == sorted(r["id"] for r in rows)  # every row written exactly once
    assert len(list(out.glob("*.mp4"))) == 4
    faults = [line for line in err.splitlines() if line.startswith("faults: ")]
    assert faults and faults[0].startswith("faults: 1 stage actor(s) lost"), err
    assert int(faults[0].split(", ")[1].split()[0]) >= 1  # rows retried on the replacement
    places = _places(cluster.address)
    assert places["sr_high"] == {WORKER}  # both the lost actor and its replacement
    assert all(types == {HEAD} for stage, types in places.items() if stage != "sr_high")


def test_training_worker_node_lost_resumes_from_the_last_checkpoint(local_cluster, tmp_path, tiny_preset_file):
    """The worker asks for two CPUs: only the worker node has them. Its node dies after the first checkpoints;
    a new node joins; Ray Train's FailureConfig restarts the worker there, from the last checkpoint."""
    cluster = local_cluster(num_cpus=1, resources={HEAD: 100})
    worker = cluster.add_node(num_cpus=2, resources={WORKER: 100})
    data = tmp_path / "shapes"
    synth(str(data), images=16, videos=0, size=32, seed=1)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"batch_size": 4, "max_steps": 16, "checkpoint_every": 4,
                                                         "log_every": 2, "lr": 1e-3}))
    out = tmp_path / "model"
    job = Stderr([sys.executable, "-m", "workflows.cli", "train", "sr-high", "--data", str(data), "--output", str(out),
                  "--preset", tiny_preset_file, "--config", str(tmp_path / "train.yaml"), "--cpus-per-worker", "2",
                  "--address", cluster.address])
    deadline = time.time() + 300
    steps: list[float] = []
    while time.time() < deadline and job.proc.poll() is None and not (steps and max(steps) >= 6):
        try:
            steps = [r["step"] for r in read_metrics(str(out), "sr-high")]
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    assert job.proc.poll() is None and steps and max(steps) < 16, "training ended before its node could be killed"
    seen = len(job.lines)
    cluster.remove_node(worker)
    assert job.wait_for("waiting for resources: ", after=seen) == "waiting for resources: training workers 1 x (2 CPU each)"
    cluster.add_node(num_cpus=2, resources={WORKER: 100})
    code, err = job.finish()
    assert code == 0, err[-3000:]
    done = next(line for line in err.splitlines() if line.startswith("[sr-high] done: 16 steps"))
    resumed = int(done.split("resumed from the checkpoint of step ")[1].split(")")[0])
    assert 4 <= resumed < 16 and resumed % 4 == 0
