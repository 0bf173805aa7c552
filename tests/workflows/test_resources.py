"""What a command asks of a cluster it joins: a need no node can meet stops at once with one line; a need the
cluster may meet later is shown as a wait; SIGTERM stops a batch job as Ctrl-C does. The cluster is a local
one of its own (``local_cluster``), joined by ``mav batch --address`` in a subprocess."""

import json
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from workflows.pools import default_pools_file, load_pools, parse_pools
from workflows.resources import Need, WaitWatch, pool_needs, replica_needs, shortfall
from workflows.shapes.data import synth

FIX = "give the pools fewer actors"
TINY_POOLS = "\n".join(f"{s}: {{actors: 1, cpus: 0.25}}" for s in
                       ("clip", "prior", "decoder", "interpolation", "sr_low", "sr_high", "writer"))


def test_pools_that_no_cluster_of_these_nodes_can_hold_name_the_stage_the_shortfall_and_the_fix():
    shipped = pool_needs(load_pools(), use_gpus=False)  # seven pools of one CPU each
    why = shortfall(shipped, [{"CPU": 2.0}], None, what="the pools", fix=FIX)
    assert why.startswith("decoder cannot be placed (1 × 1 CPU)")  # clip and prior take the two CPUs
    assert "the pools ask for 7 CPU in all, the cluster's 1 node has 2" in why
    assert "no autoscaler" in why and FIX in why and "ray start --num-cpus" in why
    assert shortfall(shipped, [{"CPU": 4.0}, {"CPU": 4.0}], None, what="the pools", fix=FIX) is None

    gpu = [Need("sr_high", 1, {"CPU": 1.0, "GPU": 2.0})]
    why = shortfall(gpu, [{"CPU": 8.0, "GPU": 1.0}], None, what="the pools", fix=FIX)
    assert why.startswith("sr_high: one actor asks for 1 CPU, 2 GPU, and no node has 2 GPU (the most any has is 1")
    assert "ray start --num-gpus" in why

    pinned = [Need("sr_high", 1, {"CPU": 1.0, "node_type_gpu": 0.01})]
    why = shortfall(pinned, [{"CPU": 8.0}], None, what="the pools", fix=FIX)
    assert "no node has 0.01 node_type_gpu (none has any" in why and "ray start --resources" in why
    # An autoscaler that may add a node of that type: a wait, not an error.
    assert shortfall(pinned, [{"CPU": 8.0}], [{"CPU": 4.0, "node_type_gpu": 1.0}], what="the pools", fix=FIX) is None
    assert "or node type" in shortfall(pinned, [{"CPU": 8.0}], [{"CPU": 4.0}], what="the pools", fix=FIX)


def test_fractions_that_fit_no_single_node_are_refused_even_when_the_totals_suffice():
    needs = [Need("decoder", 2, {"CPU": 0.75})]
    why = shortfall(needs, [{"CPU": 1.0}, {"CPU": 0.5}], None, what="the pools", fix=FIX)
    assert why.startswith("decoder cannot be placed") and "no node has 0.75 CPU left" in why


def test_serve_replicas_count_their_initial_or_minimum_replicas():
    overrides = {"decoder": {"autoscaling_config": {"min_replicas": 2}, "ray_actor_options": {"num_gpus": 1}},
                 "api": {"num_replicas": 3}}
    needs = {n.stage: n for n in replica_needs(overrides, {"decoder": 1.0, "api": 0.0})}
    assert (needs["decoder"].count, needs["decoder"].each) == (2, {"CPU": 1.0, "GPU": 1.0})
    assert (needs["api"].count, needs["api"].each["CPU"]) == (3, 0.0)


def _batch(cluster, tmp_path, pools: str, preset: str, rows: int = 3) -> list[str]:
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(rows)))
    (tmp_path / "pools.yaml").write_text(pools)
    return [sys.executable, "-m", "workflows.cli", "batch", "--prompts", str(src), "--output", str(tmp_path / "out"),
            "--preset", preset, "--pools", str(tmp_path / "pools.yaml"), "--address", cluster.address]


def test_a_cluster_too_small_for_the_pools_stops_at_once_with_one_line(local_cluster, tmp_path, tiny_preset_file):
    """The new user's case: a 2-CPU head, the shipped pools (seven pools of one CPU each)."""
    cluster = local_cluster(num_cpus=2)
    with open(default_pools_file()) as f:
        cmd = _batch(cluster, tmp_path, f.read(), tiny_preset_file)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines == [lines[-1]] and lines[-1].startswith("mav: error: the cluster cannot hold the pools: decoder "), lines
    assert "ray start --num-cpus" in lines[-1]
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "out" / "manifest.parquet").exists()


HOLD = """
import sys, time, ray
ray.init(address=sys.argv[1])
@ray.remote(num_cpus=2)
class Holder:
    def ready(self):
        return True
holder = Holder.options(name="holder", lifetime="detached").remote()
ray.get(holder.ready.remote())
print("held", flush=True)
"""


def _wait_then_sigterm(cmd: list[str]) -> tuple[str, str]:
    """Run ``cmd`` until it says what it waits for, then SIGTERM it: (the waiting line, the rest of stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith("waiting for resources: "):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert lines and lines[-1].startswith("waiting for resources: "), lines + [err]
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM received" not in err
    return lines[-1], err


def test_a_wait_for_resources_is_shown_and_sigterm_stops_batch_and_training_as_ctrl_c_does(local_cluster, tmp_path,
                                                                                          tiny_preset_file):
    """Another job holds the head's two CPUs: what the commands ask for fits the cluster, but not now. Each says
    what it waits for; SIGTERM (ray job stop, Kubernetes) then stops it as Ctrl-C does: one line, exit 143, the
    batch job's manifest written."""
    cluster = local_cluster(num_cpus=2)
    held = subprocess.run([sys.executable, "-c", HOLD, cluster.address], capture_output=True, text=True, timeout=120)
    assert "held" in held.stdout, held.stderr
    wait, err = _wait_then_sigterm(_batch(cluster, tmp_path, TINY_POOLS, tiny_preset_file))
    for stage in ("clip", "prior", "writer"):
        assert f"{stage} 1 actor (0.25 CPU each)" in wait
    assert err.strip().splitlines()[-1].startswith("mav: stopped by SIGTERM; finished videos are kept")
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert rows and {r["status"] for r in rows} == {"pending"}  # the rows admitted so far, none made

    synth(str(tmp_path / "shapes"), images=8, videos=0, size=32, seed=1)
    (tmp_path / "train.yaml").write_text("max_steps: 4\nbatch_size: 2\ncache_data: false\n")
    wait, err = _wait_then_sigterm([sys.executable, "-m", "workflows.cli", "train", "sr-high", "--data",
                                    str(tmp_path / "shapes"), "--output", str(tmp_path / "model"), "--preset",
                                    tiny_preset_file, "--config", str(tmp_path / "train.yaml"), "--address",
                                    cluster.address])
    assert wait == "waiting for resources: training workers 1 x (1 CPU each)"
    assert err.strip().splitlines()[-1].startswith("mav: stopped by SIGTERM; the run's checkpoints are kept under ")


def test_pinning_pools_is_plain_resources(tmp_path):
    pools = parse_pools("sr_high: {actors: 1, cpus: 1, resources: {node_type_gpu: 0.01}}")
    need = {n.stage: n for n in pool_needs(pools, use_gpus=False)}["sr_high"]
    assert need.each == {"CPU": 1.0, "GPU": 0.0, "node_type_gpu": 0.01}


def test_a_wait_is_said_when_it_starts_changes_and_every_few_seconds_and_its_end_once():
    pending = ["", "decoder 1 actor", "decoder 1 actor", "decoder 1 actor", "decoder 1 actor", "", ""]
    shown = []
    with WaitWatch(lambda: pending.pop(0) if len(pending) > 1 else pending[0], shown.append, every=0.05, poll=0.03):
        time.sleep(0.6)
    assert shown[0] == "waiting for resources: decoder 1 actor"
    assert shown.count("waiting for resources: decoder 1 actor") >= 2  # said again while it lasts
    assert shown[-1] is None and shown.count(None) == 1
