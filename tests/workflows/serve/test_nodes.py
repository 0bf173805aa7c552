"""More than one node: ``mav serve --address`` on a local multi-node cluster (``local_cluster``), SR_h pinned to a
worker node type; that node is removed mid-job, a new one joins, and the job and later requests succeed. The same
process shows ``mav serve``'s life as a command: the URL on stdout, the API key from the environment, and SIGTERM
handled as Ctrl-C is."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import yaml

from stages.config import STAGE_NAMES

from .helpers import free_port, is_mp4

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
HEAD, WORKER = "node_type_head", "node_type_worker"


def serve_config(preset: str) -> dict:
    """The application with small replicas on the head node (the tuner, the job table and the ingress too), SR_h on the
    worker node type, the HTTP proxy on the head only (the nodes share this machine's address)."""
    small = {"ray_actor_options": {"num_cpus": 0.25, "resources": {HEAD: 1}}, "health_check_period_s": 1}
    deployments = [{"name": name, **small} for name in (*STAGE_NAMES, "encoder", "tuner")]
    deployments += [{"name": name, "ray_actor_options": {"num_cpus": 0, "resources": {HEAD: 1}}} for name in ("jobs", "api")]
    deployments[STAGE_NAMES.index("sr_high")]["ray_actor_options"] = {"num_cpus": 0.25, "resources": {WORKER: 1}}
    return {"proxy_location": "HeadOnly",
            "applications": [{"name": "mav", "route_prefix": "/", "import_path": "workflows.serve:build_app",
                              "args": {"preset": preset}, "deployments": deployments}]}


def test_a_removed_replica_node_is_replaced_and_requests_go_on(local_cluster, tmp_path, tiny_preset_file, monkeypatch):
    monkeypatch.setenv("MAV_API_KEY", "cli-key")  # on the cluster's nodes, where the ingress replica reads it
    cluster = local_cluster(num_cpus=3, resources={HEAD: 100})
    worker = cluster.add_node(num_cpus=1, resources={WORKER: 100})
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config(tiny_preset_file)))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "serve", "--config", str(config), "--port", str(port),
                             "--address", cluster.address], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving on http://127.0.0.1:{port}/"), line + proc.stderr.read()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as c:
            assert c.post("/v1/videos", json={"prompt": "x"}).status_code == 401
            c.headers["Authorization"] = "Bearer cli-key"
            before = c.post("/v1/videos", json={"prompt": "x", "seed": 1})
            assert before.status_code == 200 and is_mp4(before.content), before.text
            job_id = c.post("/v1/jobs", json={"prompt": "across nodes", "seed": 2, "steps": 60}).json()["id"]
            deadline = time.monotonic() + 240
            while (job := c.get(f"/v1/jobs/{job_id}").json())["stages"][STAGE_NAMES.index("sr_high")]["status"] == "pending":
                assert job["status"] in ("queued", "running") and time.monotonic() < deadline, json.dumps(job)
                time.sleep(0.1)
            cluster.remove_node(worker)  # SR_h's only replica goes with its node, the job's chunk on it
            cluster.add_node(num_cpus=1, resources={WORKER: 100})
            deadline = time.monotonic() + 240
            while (job := c.get(f"/v1/jobs/{job_id}").json())["status"] not in ("done", "failed"):
                assert time.monotonic() < deadline, job
                time.sleep(0.5)
            assert job["status"] == "done", json.dumps(job)
            assert any(r.startswith("sr_high:") for r in job["retries"]), job["retries"]
            after = c.post("/v1/videos", json={"prompt": "x", "seed": 1})
            assert after.status_code == 200 and after.content == before.content
            assert c.post("/v1/jobs", json={"prompt": "long", "steps": 1000}).status_code == 202
        # SIGTERM (``ray job stop``, Kubernetes) stops it as Ctrl-C does: one line naming the job it dropped,
        # exit status 143, no Ray stack
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err
        assert err.splitlines()[-1] == "mav: stopped by SIGTERM: stopped serving; 1 job(s) queued or running were dropped", err
        assert "SIGTERM received" not in err and "Traceback" not in err and "cli-key" not in err
        # the application is deleted; the cluster's HTTP proxy, which outlives it, finds no route
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 404
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
