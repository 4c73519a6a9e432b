"""The step benchmarks that docs/benchmarks.md quotes run end to end on a tiny case (seconds), so
their commands cannot rot: benchmarks/unet_step.py (ours alone, and against PyTorch with alternating
rounds) and benchmarks/torch_distill_step.py (always against PyTorch)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(script, *args):
    r = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_unet_step_runs_ours_alone(tmp_path):
    out = tmp_path / "r.jsonl"
    text = _run("unet_step.py", "--model", "tiny", "--batch", "2", "--resolution", "8", "--warmup", "0",
                "--iters", "1", "--threads", "1", "--json", str(out))
    assert "ttfm_np:" in text and "s/step" in text
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["model"] == "tiny" and rec["batch"] == 2 and rec["blas_threads"] == 1 and rec["ours_s"] > 0
    assert "torch_s" not in rec


@pytest.mark.torch
def test_unet_step_runs_against_torch_in_rounds(tmp_path):
    pytest.importorskip("torch", reason="PyTorch not installed: the comparison benchmark needs it")
    out = tmp_path / "r.jsonl"
    text = _run("unet_step.py", "--model", "tiny", "--batch", "2", "--resolution", "8", "--warmup", "0",
                "--iters", "1", "--threads", "1", "--rounds", "2", "--against", "torch", "--json", str(out))
    assert "2 alternating rounds" in text
    rec = json.loads(out.read_text().splitlines()[-1])
    assert len(rec["rounds_ratio"]) == 2 and rec["torch_threads"] == 1 and rec["ratio_ours_over_torch"] > 0


@pytest.mark.torch
@pytest.mark.parametrize("objective", ["itvm", "teacher"])
def test_torch_distill_step_runs(objective):
    pytest.importorskip("torch", reason="PyTorch not installed: the benchmark times the PyTorch side too")
    text = _run("torch_distill_step.py", "--objective", objective, "--batch", "8", "--warmup", "0", "--iters", "1",
                "--rounds", "1", "--threads", "1")
    assert "torch" in text.lower() and "ratio" in text.lower()
