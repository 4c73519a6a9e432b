"""The numerics-sensitive tests, re-run under other BLAS kernels and thread counts.

Float32 results change in their last bits with the GEMM kernel (OpenBLAS picks AVX2
`Haswell` kernels on one CPU and AVX-512 `SkylakeX` ones on another) and with the
number of BLAS threads; an equality claim that holds on the developer's CPU can fail
on the next machine. NumPy's bundled OpenBLAS takes its kernel set from the
environment variable OPENBLAS_CORETYPE when it loads, so one machine can run the
kernels of several CPUs: this file re-runs every test marked `numerics` in a fresh
interpreter under

    OPENBLAS_CORETYPE = Haswell (AVX2), Sandybridge (AVX), and SkylakeX (AVX-512)
                        where the CPU has AVX-512 (the kernels would crash without it)
    OPENBLAS_NUM_THREADS = 1 and 2

and checks in each that the kernel set asked for is the one running.
Mark a test `@pytest.mark.numerics` when its equality or tolerance depends on the order
of floating-point additions (GEMM shapes, kernels, threads, a split over ranks).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


# each kernel set with the instructions it needs (a kernel set the CPU lacks would crash the process)
_NEEDS = {"Haswell": "avx2", "Sandybridge": "avx", "SkylakeX": "avx512f"}
CORETYPES = [name for name, flag in _NEEDS.items() if flag in _cpu_flags()]


def numerics_files() -> list:
    """The test files that hold tests marked `numerics` (read from the source: no import)."""
    return sorted(os.path.join(HERE, f) for f in os.listdir(HERE)
                  if f.startswith("test_") and f.endswith(".py")
                  and re.search(r"^\s*@pytest\.mark\.numerics|^pytestmark = .*numerics",
                                open(os.path.join(HERE, f), encoding="utf-8").read(), re.M))


def _env(coretype, threads):
    env = dict(os.environ, OPENBLAS_CORETYPE=coretype, OPENBLAS_NUM_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads))
    env.pop("PYTEST_ADDOPTS", None)
    return env


def test_numerics_tests_exist():
    files = numerics_files()
    assert os.path.join(HERE, "test_pipeline.py") in files and os.path.basename(__file__) not in map(
        os.path.basename, files)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("coretype", CORETYPES)
def test_numerics_tests_pass_under_other_kernels_and_thread_counts(coretype, threads):
    env = _env(coretype, threads)
    probe = subprocess.run([sys.executable, "-c", "import numpy; from ttfm_np import blas; "
                            "print(blas.kernel_set(), blas.get_threads())"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    kernel, n_threads = probe.stdout.split()
    if kernel == "unknown":
        pytest.skip("NumPy's BLAS is not a bundled OpenBLAS: OPENBLAS_CORETYPE cannot choose its kernels")
    expected = (coretype, str(min(threads, os.cpu_count() or 1)))          # OpenBLAS uses at most one per core
    assert (kernel, n_threads) == expected, f"asked for {coretype} x {threads} threads, runs {probe.stdout}"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "numerics",
                          *numerics_files()], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, (f"`pytest -m numerics` under OPENBLAS_CORETYPE={coretype} "
                                 f"OPENBLAS_NUM_THREADS={threads} failed:\n{out.stdout[-6000:]}\n{out.stderr[-2000:]}")
    assert re.search(r"\b[1-9]\d* passed", summary), summary      # something ran
