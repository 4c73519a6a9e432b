"""Book-keeping of the CuPy stand-in: counters, simulated missing CUDA libraries, emulated modules."""
from __future__ import annotations

import contextlib
import os
import sys

counters = {}
live = {}                 # id(root numpy buffer) -> bytes, for every buffer a device array owns
_missing = set()          # simulated missing components: "driver", "nvrtc", "cublas"
_modules = {}             # (code, options) -> EmulatedModule
# False: allocations-only mode for memory measurements - GEMM results and kernel outputs are
# allocated exactly as usual but not computed (kernel arguments are still checked), so values
# are meaningless and a large network's step takes seconds instead of minutes on the CPU.
compute = True


@contextlib.contextmanager
def allocations_only():
    """Run the enclosed device code for its allocations only (see `compute`)."""
    global compute
    saved, compute = compute, False
    try:
        yield
    finally:
        compute = saved


def reset_counters():
    """Zero the event counters; live bytes stay (they are the state of the device), the peak restarts from them."""
    live_bytes = counters.get("live_bytes", 0)
    counters.clear()
    counters.update(launches=0, launches_by_kernel={}, h2d=0, h2d_bytes=0, d2h=0, d2h_bytes=0, syncs=0,
                    allocations=0, live_bytes=live_bytes, peak_bytes=live_bytes, pool_peak_bytes=0)


reset_counters()


def reset_peak():
    counters["peak_bytes"] = counters["live_bytes"]


def to_host(nbytes):
    """A device -> host copy: the host waits for the device (one sync)."""
    counters["d2h"] += 1
    counters["d2h_bytes"] += int(nbytes)
    counters["syncs"] += 1


def to_device(nbytes):
    counters["h2d"] += 1
    counters["h2d_bytes"] += int(nbytes)


def synchronize():
    counters["syncs"] += 1


@contextlib.contextmanager
def simulate_missing(*components):
    """Make CuPy behave as if the CUDA driver/GPU ("driver"), NVRTC ("nvrtc") or cuBLAS ("cublas") were missing."""
    unknown = set(components) - {"driver", "nvrtc", "cublas"}
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}")
    saved = set(_missing)
    _missing.update(components)
    try:
        yield
    finally:
        _missing.clear()
        _missing.update(saved)


def check_available(component):
    """Raise the error real CuPy raises when `component` cannot be loaded (errors as CuPy 13/14 words them)."""
    if not _missing:
        return
    if "driver" in _missing:
        from .cuda.runtime import CUDARuntimeError
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    if component in _missing and component == "nvrtc":
        raise RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open shared "
                           "object file: No such file or directory")
    if component in _missing and component == "cublas":
        raise ImportError("libcublas.so.12: cannot open shared object file: No such file or directory")


def emulated_module(code, options):
    key = (code, options)
    if key not in _modules:
        tests_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if tests_dir not in sys.path:
            sys.path.insert(0, tests_dir)
        from gpu_emulator import EmulatedModule
        _modules[key] = EmulatedModule(code, options)
    return _modules[key]
