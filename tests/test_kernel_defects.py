"""The GPU-path defects an outside audit found (issue 18), each checked where a test can see it.

* im2col.cu: no 64-bit integer division left (32-bit index math on a 2-D launch), read off the PTX;
* NVRTC flags are stated by cuda.py, not left to defaults; fast math is off (IEEE div/sqrt in the
  PTX of adam.cu), and the flags reach cupy.RawModule;
* groupnorm.cu: its block size is one constant, given by groupnorm.py at compile time;
* pool.cu: the max starts at a real pixel, not at -(SCALAR)1e300 (undefined for float, wrong for
  double inputs below -1e300);
* host syncs per training step, counted on the CuPy stand-in, per objective.

PTX checks need nvcc (CUDA toolkit) and skip without it; the rest run on the CuPy stand-in.
"""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from ttfm_np import backend, cuda

ARCH = "-arch=compute_90"


def _ptx(tmp_path, stem, scalar, flags):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: install the CUDA toolkit to read the kernels' PTX")
    out = tmp_path / f"{stem}.{scalar}.ptx"
    cmd = [nvcc, "--ptx", ARCH, "-ftz=true", *flags, f"-DSCALAR={scalar}", cuda.kernel_path(stem), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    return out.read_text()


@pytest.mark.parametrize("scalar", ["float", "double"])
def test_im2col_has_no_64bit_integer_division(tmp_path, scalar):
    ptx = _ptx(tmp_path, "im2col", scalar, cuda.NVRTC_OPTIONS)
    wide = re.findall(r"\b(?:div|rem)\.[su]64\b", ptx)
    assert not wide, f"im2col.cu: {len(wide)} 64-bit divisions/remainders in the PTX (the old kernel had 19)"
    assert re.search(r"\b(?:div|rem)\.[su]32\b", ptx)              # the index math is there, in 32 bits


def test_nvrtc_flags_are_stated_and_fast_math_is_off(tmp_path):
    opts = cuda.compile_options("float")
    for flag in ("--prec-div=true", "--prec-sqrt=true", "--fmad=true", "--std=c++17", "-DSCALAR=float"):
        assert flag in opts, (flag, opts)
    assert not any("fast_math" in o or "fast-math" in o for o in opts)
    exact = _ptx(tmp_path, "adam", "float", cuda.NVRTC_OPTIONS)
    assert re.search(r"\bsqrt\.rn\.", exact) and re.search(r"\bdiv\.rn\.", exact)
    assert ".approx" not in exact and "fma." not in exact
    # the check can fail: with fast math the same source gets approximate division and sqrt
    fast = _ptx(tmp_path, "adam", "float", ("--std=c++17", "--use_fast_math"))
    assert "sqrt.approx" in fast and "div.approx" in fast


@pytest.mark.gpu
def test_the_stated_flags_reach_cupy_rawmodule(monkeypatch):
    import cupy
    seen = []
    real = cupy.RawModule

    def spy(code=None, options=(), **kw):
        seen.append(tuple(options))
        return real(code=code, options=options, **kw)
    monkeypatch.setattr(cupy, "RawModule", spy)
    cuda._module.cache_clear()
    cuda._function.cache_clear()
    try:
        cuda.get_kernel("adam", "adam_update", np.float32)
        cuda.get_kernel("groupnorm", "groupnorm_fwd", np.float64, defines=(("BLOCK", 128),))
    finally:
        cuda._module.cache_clear()
        cuda._function.cache_clear()
    assert seen == [cuda.NVRTC_OPTIONS + ("-DSCALAR=float",),
                    cuda.NVRTC_OPTIONS + ("-DSCALAR=double", "-DBLOCK=128")]


@pytest.mark.gpu
def test_groupnorm_block_size_is_one_constant(monkeypatch, rng):
    """Launching with another block size changes the kernel's BLOCK with it: still the NumPy result."""
    import cupy
    from ttfm_np import groupnorm
    x = rng.standard_normal((2, 8, 5, 7))
    gamma, beta = rng.standard_normal(8), rng.standard_normal(8)
    dy = rng.standard_normal(x.shape)
    want_y, (mu, rs) = groupnorm.groupnorm_forward_numpy(x, gamma, beta, 4, silu=True)
    want_dx = groupnorm.groupnorm_backward_numpy(dy, x, gamma, beta, mu, rs, 4, True)[0]
    for block in (64, 512):
        monkeypatch.setattr(groupnorm, "_BLOCK", block)
        monkeypatch.setattr(groupnorm, "_DEFINES", (("BLOCK", block),))
        d = [cupy.asarray(a) for a in (x, gamma, beta, dy)]
        y, (m, r) = groupnorm.groupnorm_forward_cupy(d[0], d[1], d[2], 4, silu=True)
        dx = groupnorm.groupnorm_backward_cupy(d[3], d[0], d[1], d[2], m, r, 4, True)[0]
        # float64, sums in another order than NumPy's: agreement to a few ulp of the values' scale
        np.testing.assert_allclose(y.get(), want_y, rtol=0, atol=1e-13)
        np.testing.assert_allclose(dx.get(), want_dx, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="BLOCK"):             # no silent default inside the .cu
        cuda.get_kernel("groupnorm", "groupnorm_fwd", np.float32)


@pytest.mark.gpu
def test_max_pool_of_very_negative_values(rng):
    """double inputs below -1e300 (the old start value) and -inf in float32 come out exactly."""
    import cupy
    from ttfm_np import pool
    x64 = -1e305 * (1 + rng.random((2, 3, 6, 6)))
    y = pool.max_pool2d(cupy.asarray(x64), 3, 2, 1)
    np.testing.assert_array_equal(y.get(), pool.max_pool2d(x64, 3, 2, 1))
    assert y.get().max() < -1e305
    x32 = np.full((1, 1, 4, 4), -np.inf, np.float32)
    x32[0, 0, 0, 0] = -3e38
    y32 = pool.max_pool2d(cupy.asarray(x32), 2, 2, 0).get()
    np.testing.assert_array_equal(y32, pool.max_pool2d(x32, 2, 2, 0))
    assert y32[0, 0, 0, 0] == np.float32(-3e38) and np.all(np.isneginf(y32.ravel()[1:]))


# ---------------------------------------------------------------------------------- host syncs

# Host syncs (device -> host reads) of one training step (loss, clip, Adam, EMA), by objective:
# each loss term's float(mean) and the gradient norm. ITVM with both terms has two loss terms.
# docs/performance.md quotes this table; a change in the count must change both.
SYNCS_PER_STEP = {"teacher": 2, "itvm": 3, "lfmd": 2, "ecd": 2}


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(SYNCS_PER_STEP))
def test_host_syncs_per_training_step(tmp_path, gpu_counters, kind):
    import cupy as cp
    from ttfm_np import data, losses, model, objectives, ttfm, train
    from ttfm_np import params as P
    backend.gpu_available()                                       # the one-off device probe syncs too
    tcfg_m = model.make_config("mlp-tiny", (2,))
    teacher = model.init_model(tcfg_m, 0)
    points = np.random.default_rng(5).standard_normal((256, 2)).astype(np.float32)
    counts = []
    for steps in (2, 5):
        if kind == "teacher":
            objective, cfg, init = objectives.FlowMatchingObjective(tcfg_m), tcfg_m, teacher
        else:
            init, cfg = ttfm.student_from_teacher(teacher, tcfg_m)
            objective = objectives.DistillObjective(cfg, (P.to_device(teacher, cp), tcfg_m),
                                                    losses.DistillLossConfig(loss=kind))
        objective.save_samples = lambda params, path: None
        tcfg = train.TrainConfig(steps=steps, batch_size=16, lr=1e-3, warmup=0, log_every=1000, ckpt_every=0, seed=3)
        gpu_counters["syncs"] = 0
        train.train_loop(str(tmp_path / f"{kind}{steps}"), model_cfg=cfg, init_params=init, objective=objective,
                         data_iter=data.BatchIterator(points, 16, seed=3), tcfg=tcfg, run_config={"data": "t"},
                         progress=False, xp=cp)
        counts.append(gpu_counters["syncs"])
    per_step = (counts[1] - counts[0]) / 3                        # start-up and final checkpoint cancel out
    assert per_step == SYNCS_PER_STEP[kind], (kind, counts)


def test_docs_quote_the_sync_counts():
    path = os.path.join(os.path.dirname(cuda.KERNEL_DIR), "..", "docs", "performance.md")
    with open(path) as f:
        text = f.read()
    for kind, n in SYNCS_PER_STEP.items():
        assert re.search(rf"\|\s*{kind}\s*\|\s*{n}\s*\|", text, re.I), f"docs/performance.md: no '| {kind} | {n} |' row"


# ---------------------------------------------------------------------------------- GPU present but broken

def _run_gpu_tests(tmp_path, plugin_code):
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "kernel_dir_plugin.py").write_text(plugin_code)
    env = dict(os.environ, TTFM_CUPY_STANDIN="1",          # the stand-in reports a device, as a real GPU would
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "kernel_dir_plugin", "-m", "gpu",
           "tests/test_optim.py", "-k", "fused_adam_and_ema"]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_a_broken_kernel_on_a_present_gpu_fails_the_gpu_tests_instead_of_skipping(tmp_path):
    """kernels/ema.cu with a line of garbage (a copy of the folder): the backend's probe fails at the
    project-kernel step while a device is present, so `pytest -m gpu` fails; the intact copy passes."""
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulator needs g++")
    for broken in (True, False):
        kernels = tmp_path / f"kernels_{broken}"
        shutil.copytree(cuda.KERNEL_DIR, kernels)
        if broken:
            with open(kernels / "ema.cu", "a") as f:
                f.write("this line is not CUDA\n")
        res = _run_gpu_tests(tmp_path, f"import ttfm_np.cuda as c\nc.KERNEL_DIR = {str(kernels)!r}\n")
        out = res.stdout + res.stderr
        summary = out.strip().splitlines()[-1]
        if broken:
            assert res.returncode != 0 and "a GPU is present but not usable" in out and "ema.cu" in out, out[-3000:]
            assert "skipped" not in summary and ("failed" in summary or "error" in summary), summary
        else:
            assert res.returncode == 0 and "passed" in summary and "skipped" not in summary, out[-3000:]


def test_no_cupy_is_not_broken(monkeypatch):
    """Without CuPy (or without a device) nothing is broken: gpu tests may skip there."""
    monkeypatch.setattr(backend, "_cupy_module", None)
    monkeypatch.setattr(backend, "_cupy_problem", "CuPy is not importable (ImportError: none)")
    monkeypatch.setattr(backend, "_gpu_present", False)
    assert backend.gpu_broken() is None and not backend.gpu_available()
    monkeypatch.setattr(backend, "_gpu_present", True)
    assert "not importable" in backend.gpu_broken()
