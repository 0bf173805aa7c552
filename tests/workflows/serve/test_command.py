"""``mav serve``: its arguments, its one-line errors, and a whole run in its own process."""

import os
import signal
import subprocess
import sys

import httpx
import pytest

from .helpers import free_port, is_mp4

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")


def test_serve_subcommand_parses():
    import argparse

    from workflows.serve import add_parser, cmd_serve

    parser = argparse.ArgumentParser(prog="mav")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve"])
    assert args.func is cmd_serve and args.host is None and args.port is None and args.address is None
    args = parser.parse_args(["serve", "--config", "c.yaml", "--host", "0.0.0.0", "--port", "9000",
                              "--checkpoint", "s3://b/m", "--preset", "paper", "--address", "ray://h:10001"])
    assert (args.config, args.host, args.port, args.checkpoint, args.preset, args.address) == (
        "c.yaml", "0.0.0.0", 9000, "s3://b/m", "paper", "ray://h:10001")


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, tiny_preset_file, capsys):
    """Refused before Ray starts."""
    from workflows.cli import main

    for argv, message in (
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml: no such file"),
        (["--preset", tiny_preset_file, "--port", "70000"], "--port must be in 1..65535, got 70000"),
        (["--preset", str(tmp_path / "nope.yaml")], "nope.yaml"),
    ):
        assert main(["serve", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("mav: error: ") and message in err and err.count("\n") == 1, err


def test_mav_serve_runs_until_sigterm(tiny_preset_file):
    """``mav serve`` in its own process: a local Ray instance, loopback, the URL on stdout, the API key from
    the environment; SIGTERM (``ray job stop``, Kubernetes) stops it as Ctrl-C does: no request admitted
    after it, one line naming the job it dropped, exit status 143, no Ray stack."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "serve", "--preset", tiny_preset_file,
                             "--port", str(port)], cwd=ROOT, env={**env, "MAV_API_KEY": "cli-key"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving on http://127.0.0.1:{port}/"), line + proc.stderr.read()
        key = {"Authorization": "Bearer cli-key"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.post("/v1/videos", json={"prompt": "x"}).status_code == 401
            r = c.post("/v1/videos", json={"prompt": "x", "seed": 1}, headers=key)
            assert r.status_code == 200 and is_mp4(r.content)
            assert c.post("/v1/jobs", json={"prompt": "long", "steps": 1000}, headers=key).status_code == 202
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err
        assert err.splitlines()[-1] == "mav: stopped by SIGTERM: stopped serving; 1 job(s) queued or running were dropped", err
        assert "SIGTERM received" not in err and "Traceback" not in err and "cli-key" not in err
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
