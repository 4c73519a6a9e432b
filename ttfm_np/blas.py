"""Which OpenBLAS kernels NumPy's matrix products run on the CPU.

Almost all of a U-Net step on the CPU is SGEMM (conv2d.py folds every
convolution into one matrix product). NumPy's wheels bundle OpenBLAS built
with DYNAMIC_ARCH: when NumPy loads it, OpenBLAS picks a kernel set from the
CPU, and on any AVX-512 CPU that is `SkylakeX`. On the AMD EPYC (Zen 4) CPUs
this project is developed and tested on, the SkylakeX SGEMM kernels are much
slower than the AVX2 `Haswell` ones for the skinny products convolutions make
(64 output channels x 576 x 32768 pixels: 120 vs 173 GFLOP/s), although a
square 2048^3 product runs about as fast with either; the whole `small` U-Net
step drops from 3.2 s to 2.65 s (docs/performance.md has the commands).

OpenBLAS reads its choice from the environment variable OPENBLAS_CORETYPE
once, when the library is loaded, i.e. when numpy is first imported. So
`ttfm_np/__init__.py` calls `prefer_measured_kernels()` before anything
imports numpy. Rules, in order:

* OPENBLAS_CORETYPE already set (by you): left alone. Set it to SkylakeX to
  get OpenBLAS's own choice back.
* numpy already imported: too late, nothing is changed (`kernel_set()` tells
  which kernels are in use; import ttfm_np first to get the tuned choice).
* an AMD CPU with AVX-512: OPENBLAS_CORETYPE=Haswell. Every other CPU keeps
  OpenBLAS's own choice (not measured here, so not changed).

The same moment sets OPENBLAS_THREAD_TIMEOUT (unless you did): how long an idle
OpenBLAS thread spins before it sleeps, 2^n cycles. OpenBLAS's default n = 28 is
about 0.1 s, so after every threaded product the helper thread keeps a core busy
while NumPy's single-threaded passes and ttfm_np's own worker threads
(parallel.py) run, and they share the core with it. n = 4 lets it sleep at once.
Measured on the `small` U-Net step with 2 BLAS threads and 2 split workers
(AMD EPYC Zen 4, 2 cores, quiet): 3.5 s with the default, 2.1 s with n = 4
(docs/benchmarks.md).
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys

CORETYPE_ENV = "OPENBLAS_CORETYPE"
THREAD_TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
THREAD_TIMEOUT = "4"             # 2^4 cycles of spinning, OpenBLAS's minimum (module doc)


def _cpu_info() -> tuple[str, set]:
    """(vendor id, set of flags) from /proc/cpuinfo; ('', set()) where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 16)
    except OSError:
        return "", set()
    vendor, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if vendor and flags:
            break
    return vendor, flags


def preferred_coretype(vendor: str, flags: set) -> str | None:
    """The OpenBLAS kernel set to ask for on this CPU, or None for OpenBLAS's own choice."""
    if vendor == "AuthenticAMD" and "avx512f" in flags and "avx2" in flags:
        return "Haswell"
    return None


def prefer_measured_kernels() -> str | None:
    """Set OPENBLAS_CORETYPE and OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS (see the module
    doc), each only where you did not. Returns the kernel set asked for (None: OpenBLAS's own)."""
    if "numpy" in sys.modules:
        return None
    os.environ.setdefault(THREAD_TIMEOUT_ENV, THREAD_TIMEOUT)
    if CORETYPE_ENV in os.environ:
        return None
    choice = preferred_coretype(*_cpu_info())
    if choice is not None:
        os.environ[CORETYPE_ENV] = choice
    return choice


def kernel_set() -> str:
    """The kernel set NumPy's bundled OpenBLAS is running (e.g. 'Haswell'), or 'unknown'."""
    fn = _openblas_function("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                            "openblas_get_corename")
    if fn is None:
        return "unknown"
    fn.restype = ctypes.c_char_p
    return fn().decode()


# ----------------------------------------------------------------------------- threads

THREAD_ENVS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


@functools.lru_cache(maxsize=None)
def _openblas_function(*names):
    """A function of NumPy's bundled OpenBLAS by the first name that exists, or None (looked up
    once: parallel.run_split asks for the thread count around every split)."""
    import numpy as np
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                return fn
    return None


def get_threads() -> int | None:
    """OpenBLAS's thread count now, or None where NumPy bundles no OpenBLAS."""
    fn = _openblas_function("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                            "openblas_get_num_threads64_", "openblas_get_num_threads")
    return None if fn is None else int(fn())


def set_threads(n: int) -> bool:
    """Ask OpenBLAS for n threads; False where that is not possible (no bundled OpenBLAS)."""
    fn = _openblas_function("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                            "openblas_set_num_threads64_", "openblas_set_num_threads")
    if fn is None:
        return False
    fn(ctypes.c_int(int(n)))
    return True


class single_threaded_small_gemms:
    """Run a block with one OpenBLAS thread, unless the user chose a thread count.

    Why: the 2-D toy models (the MLP, at most 256 wide) multiply matrices so small
    that waking and synchronising BLAS threads costs more than the product. Measured
    on 2 cores (benchmarks and numbers in docs/performance.md): one ITVM step of
    `mlp-small` at batch 256 takes 6.8 ms with one thread and 31 ms with two on a busy
    machine (the threads spin while waiting for a core). A thread count set through
    OPENBLAS_NUM_THREADS / OMP_NUM_THREADS wins; the previous count is restored on exit.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and not any(os.environ.get(v) for v in THREAD_ENVS)
        self.previous = None

    def __enter__(self):
        if self.enabled:
            self.previous = get_threads()
            if self.previous is not None and self.previous > 1:
                set_threads(1)
            else:
                self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            set_threads(self.previous)
        return False
