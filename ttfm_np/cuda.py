"""Compile and launch the project's CUDA kernels (plain CUDA C in kernels/*.cu).

Each .cu file is written against a SCALAR macro and compiled once per dtype
with cupy.RawModule (NVRTC): `-DSCALAR=float` or `-DSCALAR=double`. Kernels
are `extern "C"`, so their names are the plain function names. The same
sources are compiled with `nvcc --ptx` by tests/test_cuda_sources.py, which
runs without a GPU.
"""
from __future__ import annotations

import functools
import os

import numpy as np

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
SCALAR_OF = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def kernel_source(file_stem: str) -> str:
    with open(os.path.join(KERNEL_DIR, file_stem + ".cu")) as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def _module(file_stem: str, scalar: str):
    import cupy
    return cupy.RawModule(code=kernel_source(file_stem), options=(f"-DSCALAR={scalar}",))


def get_kernel(file_stem: str, kernel_name: str, dtype):
    """The compiled kernel `kernel_name` of kernels/<file_stem>.cu for dtype (float32/float64)."""
    dtype = np.dtype(dtype)
    if dtype not in SCALAR_OF:
        raise TypeError(f"CUDA kernels exist for float32 and float64, not {dtype}")
    return _module(file_stem, SCALAR_OF[dtype]).get_function(kernel_name)


def launch_1d(kernel, n: int, args, block: int = 256):
    """Launch a grid-stride kernel over n elements (grid capped; the kernel loops)."""
    grid = max(1, min((int(n) + block - 1) // block, 65535))
    kernel((grid,), (block,), args)
