"""``mav serve``: its arguments, its one-line errors, and a whole run in its own process."""

import os
import signal
import subprocess
import sys

import httpx

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


def test_mav_serve_runs_until_interrupted(tiny_preset_file):
    """``mav serve`` in its own process: a local Ray instance, loopback, the URL on stdout, the API key from
    the environment, and a clean stop on Ctrl-C (SIGINT)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "serve", "--preset", tiny_preset_file,
                             "--port", str(port)], cwd=ROOT, env={**env, "MAV_API_KEY": "cli-key"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C as from a terminal
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving on http://127.0.0.1:{port}/"), line + proc.stderr.read()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.post("/v1/videos", json={"prompt": "x"}).status_code == 401
            r = c.post("/v1/videos", json={"prompt": "x", "seed": 1}, headers={"Authorization": "Bearer cli-key"})
            assert r.status_code == 200 and is_mp4(r.content)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and err.rstrip().endswith("mav: stopped"), err
        assert "cli-key" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
