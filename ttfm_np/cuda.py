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

Compiler flags are stated, not left to NVRTC's defaults (NVRTC_OPTIONS): IEEE
division and square root (--prec-div=true, --prec-sqrt=true: no fast math),
multiply-add contraction allowed (--fmad=true; adam.cu and ema.cu round every
operation with __fmul_rn/__fadd_rn so nothing is contracted there), C++17.
CuPy appends -ftz=true itself (float32 subnormals flushed to zero) and the
-arch of the device. A kernel that needs a compile-time constant gets it with
`defines` (groupnorm.cu's BLOCK, the one constant groupnorm.py also launches with).
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

# NVRTC flags for every project kernel (see the module docstring). Never --use_fast_math: it
# turns on -ftz, approximate division/sqrt (div.approx, sqrt.approx) and so changes adam.cu's
# bits; tests/test_kernel_defects.py compiles with these flags and checks the PTX.
NVRTC_OPTIONS = ("--std=c++17", "--fmad=true", "--prec-div=true", "--prec-sqrt=true")


def kernel_path(file_stem: str) -> str:
    return os.path.join(KERNEL_DIR, file_stem + ".cu")


def kernel_source(file_stem: str) -> str:
    path = kernel_path(file_stem)
    if not os.path.exists(path):
        known = sorted(f[:-3] for f in os.listdir(KERNEL_DIR) if f.endswith(".cu"))
        raise FileNotFoundError(f"no CUDA source {path}; kernels/ holds {', '.join(known) or 'nothing'}")
    with open(path) as f:
        return f.read()


def compile_options(scalar: str, defines=()) -> tuple:
    """The options cupy.RawModule gets: NVRTC_OPTIONS, -DSCALAR=<scalar>, then -DNAME=VALUE per define."""
    return NVRTC_OPTIONS + (f"-DSCALAR={scalar}",) + tuple(f"-D{name}={value}" for name, value in defines)


@functools.lru_cache(maxsize=None)
def _module(file_stem: str, scalar: str, defines=()):
    """kernels/<file_stem>.cu compiled with compile_options(scalar, defines) (once per process)."""
    import cupy
    return cupy.RawModule(code=kernel_source(file_stem), options=compile_options(scalar, defines))


@functools.lru_cache(maxsize=None)
def _function(file_stem: str, kernel_name: str, scalar: str, defines=()):
    try:
        return _module(file_stem, scalar, defines).get_function(kernel_name)
    except Exception as exc:       # cupy's CompileException / CUDADriverError carry the compiler log
        raise RuntimeError(f"CUDA kernel {kernel_name!r} of {kernel_path(file_stem)} "
                           f"({' '.join(compile_options(scalar, defines))}) failed to compile or load: {exc}") from exc


def get_kernel(file_stem: str, kernel_name: str, dtype, defines=()):
    """The compiled kernel `kernel_name` of kernels/<file_stem>.cu for dtype (float32 or float64).

    defines: ((NAME, int value), ...) compile-time constants of that source (-DNAME=value)."""
    dtype = np.dtype(dtype)
    if dtype not in SCALAR_OF:
        raise TypeError(f"CUDA kernels exist for float32 and float64, not {dtype}")
    return _function(file_stem, kernel_name, SCALAR_OF[dtype], tuple((str(k), int(v)) for k, v in defines))


def launch_2d(kernel, rows: int, cols: int, args, block: int = 256):
    """Launch a kernel that loops rows over blockIdx.y (stride gridDim.y) and cols over
    blockIdx.x * blockDim.x + threadIdx.x (stride blockDim.x * gridDim.x): both grid sides capped
    at MAX_GRID_1D, so any size is covered and each thread needs only 32-bit index math."""
    if rows <= 0 or cols <= 0:
        return
    grid_x = min((int(cols) + block - 1) // block, MAX_GRID_1D)
    kernel((grid_x, min(int(rows), MAX_GRID_1D)), (block,), args)


def launch_1d(kernel, n: int, args, block: int = 256):
    """Launch a grid-stride kernel over n elements: ceil(n / block) blocks, at most MAX_GRID_1D."""
    if n <= 0:
        return                     # nothing to do (a zero-size grid is a launch error)
    grid = min((int(n) + block - 1) // block, MAX_GRID_1D)
    kernel((grid,), (block,), args)
