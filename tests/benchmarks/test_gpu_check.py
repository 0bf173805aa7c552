"""benchmarks/gpu_check.py runs through in its --smoke mode (CPU, tiny preset) and writes every section."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--smoke", "--reps", "1", "--out", str(out)],
                   check=True, cwd=ROOT, timeout=900, capture_output=True)
    report = json.loads(out.read_text())
    assert report["device"]["smoke"] and report["device"]["name"] == "cpu"
    assert set(report["stages"]) == {"prior", "decoder", "interpolation", "sr_low", "sr_high"}
    for name, stage in report["stages"].items():
        for mode in ("fp32", "bf16"):
            assert stage[mode]["s_per_video"] > 0 and stage[mode]["estimate_mib"] > 0, (name, mode)
            assert stage[mode]["passes_per_video"] >= stage["steps"], (name, mode)
        assert "skipped" in stage["bf16-compiled"]
    layouts = {(row["layout"], row["dtype"]): row for row in report["temporal"]}
    assert len(layouts) == 6
    assert all(row["max_abs_diff_vs_conv1d"] < 1e-4 for (_, dtype), row in layouts.items() if dtype == "fp32")
    training = report["training"]
    assert training["backend"] == "gloo" and training["world_size"] == 1 and training["s_per_step"] > 0
    assert [r["counts"] for r in training["reductions"]] == [[2, 2, 0], [2, 2, 0]]
