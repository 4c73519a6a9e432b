"""Compile and launch the project's CUDA kernels (plain CUDA C in kernels/*.cu).

Each .cu file is written against a SCALAR macro and compiled once per dtype
with cupy.RawModule (NVRTC): `-DSCALAR=float` or `-DSCALAR=double`. Kernels
are `extern "C"`, so their names are the plain function names. The same
sources are compiled with `nvcc --ptx` by tests/test_cuda_sources.py, which
runs without a GPU.

    kernel = get_kernel("adam", "adam_update", p.dtype)     # compiled on first use, then cached
    launch_1d(kernel, p.size, (p, g, ..., np.int64(p.size), ...))

Scalar arguments must have the kernel's C types: np.int64 for `long long`,
np.int32 for `int`, and `x.dtype.type(value)` for SCALAR.
"""
from __future__ import annotations

import functools
import os

import numpy as np

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
SCALAR_OF = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# launch_1d's grid cap: kernels launched with it are grid-stride loops, so a
# capped grid still covers every element (and a few waves of blocks per SM is
# all the GPU needs to stay busy).
MAX_GRID_1D = 65535


def kernel_path(file_stem: str) -> str:
    return os.path.join(KERNEL_DIR, file_stem + ".cu")


def kernel_source(file_stem: str) -> str:
    path = kernel_path(file_stem)
    if not os.path.exists(path):
        known = sorted(f[:-3] for f in os.listdir(KERNEL_DIR) if f.endswith(".cu"))
        raise FileNotFoundError(f"no CUDA source {path}; kernels/ holds {', '.join(known) or 'nothing'}")
    with open(path) as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def _module(file_stem: str, scalar: str):
    """kernels/<file_stem>.cu compiled with -DSCALAR=<scalar> (once per process)."""
    import cupy
    return cupy.RawModule(code=kernel_source(file_stem), options=(f"-DSCALAR={scalar}",))


@functools.lru_cache(maxsize=None)
def _function(file_stem: str, kernel_name: str, scalar: str):
    try:
        return _module(file_stem, scalar).get_function(kernel_name)
    except Exception as exc:       # cupy's CompileException / CUDADriverError carry the compiler log
        raise RuntimeError(f"CUDA kernel {kernel_name!r} of {kernel_path(file_stem)} "
                           f"(-DSCALAR={scalar}) failed to compile or load: {exc}") from exc


def get_kernel(file_stem: str, kernel_name: str, dtype):
    """The compiled kernel `kernel_name` of kernels/<file_stem>.cu for dtype (float32 or float64)."""
    dtype = np.dtype(dtype)
    if dtype not in SCALAR_OF:
        raise TypeError(f"CUDA kernels exist for float32 and float64, not {dtype}")
    return _function(file_stem, kernel_name, SCALAR_OF[dtype])


def launch_1d(kernel, n: int, args, block: int = 256):
    """Launch a grid-stride kernel over n elements: ceil(n / block) blocks, at most MAX_GRID_1D."""
    if n <= 0:
        return                     # nothing to do (a zero-size grid is a launch error)
    grid = min((int(n) + block - 1) // block, MAX_GRID_1D)
    kernel((grid,), (block,), args)
