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


def test_simd_levels_runs_the_command_at_each_level():
    """benchmarks/simd_levels.sh: the native run, then (on an AVX-512 CPU) the AVX2 run with NumPy's
    AVX-512 loops really disabled (np.show_runtime's view: X86_V4 not found)."""
    probe = ("import numpy as np; from numpy._core._multiarray_umath import __cpu_features__ as f; "
             "print('X86_V4', f.get('X86_V4', False))")
    r = subprocess.run(["bash", os.path.join(BENCH, "simd_levels.sh"), sys.executable, "-c", probe], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("== level: native")
    with open("/proc/cpuinfo") as f:
        avx512 = "avx512f" in f.read()
    if avx512:
        at = lines.index(next(l for l in lines if l.startswith("== level: AVX2 (emulated)")))
        assert lines[at + 1] == "X86_V4 False"
    else:
        assert "nothing to emulate" in r.stdout


def test_simd_levels_without_a_command_is_a_usage_error():
    r = subprocess.run(["bash", os.path.join(BENCH, "simd_levels.sh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage:" in r.stderr
