import os
import sys

import numpy as np
import pytest

# tests import the helper module gradcheck.py from this folder, and cli.py from the project root
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TTFM_DEVICE", "cpu")

# GPU tests (marked `gpu`) run on every test run: on real CuPy where a GPU is present, otherwise
# on the CuPy stand-in (tests/cupy_standin: NumPy-backed device arrays, kernels run by the CUDA
# emulator tests/gpu_emulator). TTFM_CUPY_STANDIN=1 forces the stand-in, =0 forces real CuPy.
STANDIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cupy_standin")


def _use_cupy_standin() -> bool:
    import importlib.util
    choice = os.environ.get("TTFM_CUPY_STANDIN", "")
    if choice in ("0", "1"):
        return choice == "1"
    has_gpu = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
    if has_gpu and importlib.util.find_spec("cupy") is not None:
        return False
    import shutil
    return shutil.which("g++") is not None          # the emulator compiles the kernels with g++; without it
                                                    # the gpu tests skip, naming "CuPy is not importable"


USING_CUPY_STANDIN = _use_cupy_standin()
if USING_CUPY_STANDIN:
    if "cupy" in sys.modules and not getattr(sys.modules["cupy"], "__file__", "").startswith(STANDIN_DIR):
        raise RuntimeError("the real cupy was imported before tests/conftest.py could put the stand-in in place")
    sys.path.insert(0, STANDIN_DIR)                # (a test that starts a subprocess puts it on PYTHONPATH itself)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A `gpu` test on a machine whose GPU is present but broken (a kernel that does not compile,
    no NVRTC, no cuBLAS) FAILS with the cause, before any skipif marker could skip it: only a
    machine without a GPU (or without CuPy) may skip gpu tests (ttfm_np.backend.gpu_broken)."""
    if item.get_closest_marker("gpu") is None:
        return
    from ttfm_np import backend
    broken = backend.gpu_broken()
    if broken:
        pytest.fail(f"a GPU is present but not usable, so this gpu test fails instead of skipping: {broken}",
                    pytrace=False)


def pytest_report_header(config):
    return ("GPU tests: CuPy stand-in + CUDA emulator (no GPU)" if USING_CUPY_STANDIN
            else "GPU tests: real CuPy")


@pytest.fixture
def gpu_counters():
    """The stand-in's counters (launches, copies, syncs, live/peak bytes), zeroed; skips on real CuPy."""
    if not USING_CUPY_STANDIN:
        pytest.skip("counters exist on the CuPy stand-in only")
    import cupy
    cupy._standin.reset_counters()
    return cupy._standin.counters


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
