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
from workflows.resources import Need, pool_needs, replica_needs, shortfall

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


def test_a_wait_for_resources_is_shown_and_sigterm_stops_the_job_as_ctrl_c_does(local_cluster, tmp_path,
                                                                                   tiny_preset_file):
    """Another job holds the head's two CPUs: the pools fit the cluster, but not now. The job says what it waits
    for; SIGTERM (ray job stop, Kubernetes) then stops it with the manifest written, one line, exit 143."""
    cluster = local_cluster(num_cpus=2)
    held = subprocess.run([sys.executable, "-c", HOLD, cluster.address], capture_output=True, text=True, timeout=120)
    assert "held" in held.stdout, held.stderr
    proc = subprocess.Popen(_batch(cluster, tmp_path, TINY_POOLS, tiny_preset_file), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith("waiting for resources: "):
            break
    wait = lines[-1]
    assert wait.startswith("waiting for resources: "), lines
    for stage in ("clip", "prior", "writer"):
        assert f"{stage} 1 actor (0.25 CPU each)" in wait
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM received" not in err
    assert err.strip().splitlines()[-1].startswith("mav: stopped by SIGTERM; finished videos are kept")
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert rows and {r["status"] for r in rows} == {"pending"}  # the rows admitted so far, none made


def test_pinning_pools_is_plain_resources(tmp_path):
    pools = parse_pools("sr_high: {actors: 1, cpus: 1, resources: {node_type_gpu: 0.01}}")
    need = {n.stage: n for n in pool_needs(pools, use_gpus=False)}["sr_high"]
    assert need.each == {"CPU": 1.0, "GPU": 0.0, "node_type_gpu": 0.01}
