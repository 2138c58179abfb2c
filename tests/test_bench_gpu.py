"""The GPU benchmark script's whole flow, run on Triton's CPU interpreter at tiny sizes (its timings mean nothing
there; what is checked is that the correctness stage, every timing stage and the JSON report work end to end)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # Triton interpreter in a subprocess
def test_bench_gpu_runs_end_to_end_on_the_interpreter(tmp_path):
    command = [
        sys.executable, "samples/bench_gpu.py", "--device", "cpu", "--layout", "video:2x8x16", "--heads", "2",
        "--head-dim", "16", "--block-size", "64", "--check-layout", "text:8+video:2x4x8", "--reps", "1",
        "--warmup", "0", "--no-tests", "--no-flex",
    ]
    env = {"OUT": str(tmp_path), "TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert report["variants"] == ["triton", "tma"] and report["variant_errors"] == {}  # the interpreter runs both
    assert [row["ok"] for row in report["correctness"]] == [True] * 4
    assert all(row["tma"] <= 2e-2 for row in report["correctness"])
    patterns = [row["pattern"] for row in report["results"]]
    assert len(patterns) == 11 and patterns[0] == "diagonal_w2"  # every case; the every-block row first
    assert report["results"][0]["density"] == 1.0
    assert all(row["tma_ms"] > 0 and row["triton_ms"] > 0 for row in report["results"])
    assert 0 < report["mixed"]["density"] < 1 and report["mixed"]["triton_runtime_ms"] > 0
    assert report["skipped_by_deadline"] == []
    assert "speedup = dense ms / sparse ms" in done.stdout


def test_bench_gpu_dry_run_lists_the_cases():
    done = subprocess.run([sys.executable, "samples/bench_gpu.py", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "diagonal_w1.072 (target density 0.25)" in done.stdout and "topk_blocks_k0.25" in done.stdout
