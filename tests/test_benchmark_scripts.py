"""The step benchmarks that docs/benchmarks.md quotes run end to end on a tiny case (seconds), so
their commands cannot rot: benchmarks/unet_step.py (ours alone, and against PyTorch with alternating
rounds) and benchmarks/torch_distill_step.py (always against PyTorch)."""
import json
import os
import subprocess
import sys

import numpy as np
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


@pytest.mark.torch
def test_torch_itvm_update_is_the_same_loss_and_gradient_as_ours(rng):
    """benchmarks/torch_distill_step.py times 'the same update written in PyTorch': same weights, same
    x_s, s, t -> the same ITVM loss and student gradient as losses.itvm_loss, in float64 (the two
    sides differ only in the order of float operations)."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed: nothing to compare against")
    sys.path.insert(0, BENCH)
    try:
        import torch_distill_step as tds
        import torch_reference as tr
    finally:
        sys.path.remove(BENCH)
    from ttfm_np import losses, model, params as P, ttfm
    tcfg = model.make_config("mlp-tiny", (2,))
    host = P.randomize(P.astype(model.init_model(tcfg, 0), np.float64), seed=3, std=0.3)
    shost, scfg = ttfm.student_from_teacher(host, tcfg)
    shost = P.randomize(shost, seed=4, std=0.3)                    # a trained-looking student, W_d != 0
    ema_host = P.randomize(shost, seed=5, std=0.3)
    n = 9
    x_s = rng.standard_normal((n, 2))
    a, b = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    s, t = np.minimum(a, b), np.maximum(a, b)
    t[0] = s[0]                                                     # one pair with t = s (masked term)
    opts = losses.DistillLossConfig(loss="itvm").validate()
    assert opts.delta_mode == "relative" and opts.target_solver == "heun"   # what the torch side implements
    ours, grads, _ = losses.itvm_loss((shost, scfg), (ema_host, scfg), (host, tcfg), x_s, s, t, opts)
    to_torch = lambda cfg, p: tr.load_params(tr.build_torch_model(cfg).double(), p)   # noqa: E731
    net, ema, teacher = to_torch(scfg, shost), to_torch(scfg, ema_host), to_torch(tcfg, host)
    T = lambda a: torch.from_numpy(np.asarray(a, np.float64))       # noqa: E731
    theirs = tds.torch_itvm_loss(net, ema, teacher, T(x_s), T(s), T(t), opts.kappa)
    theirs.backward()
    assert float(theirs.detach()) == pytest.approx(ours, rel=1e-12)
    torch_grads = {name: prm.grad.numpy() for name, prm in net.named_parameters()}
    for k, g in grads.items():
        want = torch_grads[tr.torch_name(k, scfg)].reshape(g.shape)
        np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-13 * np.abs(want).max(), err_msg=k)
