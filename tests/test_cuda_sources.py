"""Every CUDA source in ttfm_np/kernels/ compiles for the GPU, for float and double, as CuPy compiles it.

No GPU is needed: `nvcc --ptx` only compiles. CuPy compiles a RawModule with
NVRTC, passing our options (-DSCALAR=...) plus the ones it appends itself:
-ftz=true (float32 subnormals flushed to zero) and -arch=compute_XX; NVRTC's
defaults are -fmad=true (a*b+c contracted into FMA) and C++17. NVRTC itself is
not installed here (it comes with CuPy's [ctk] libraries), so nvcc is given the
same flags; unlike NVRTC, nvcc could still find host headers, so a separate
check makes sure no kernel #includes anything. Warnings are errors.
PTX is cached by a hash of source, flags and nvcc version (in the emulator's
build folder), so only changed kernels are compiled again.

The test globs all kernels/*.cu files, so a kernel added later is checked
without touching this file. It also checks the conventions cuda.get_kernel
relies on: a `#ifndef SCALAR` default, `extern "C"` kernels (unmangled names,
found by name in the compiled module).
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess

import pytest

from ttfm_np import cuda

SOURCES = sorted(glob.glob(os.path.join(cuda.KERNEL_DIR, "*.cu")))
_KERNEL_DECL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
# what CuPy 13/14 hands NVRTC for cuda.get_kernel's RawModule (besides -DSCALAR): the project's stated
# flags (cuda.NVRTC_OPTIONS) plus CuPy's own -ftz=true and -arch
CUPY_NVRTC_FLAGS = ["-arch=compute_90", "-ftz=true", *cuda.NVRTC_OPTIONS]
# compile-time constants a kernel gets from its Python side (groupnorm.py passes BLOCK)
KERNEL_DEFINES = {"groupnorm.cu": ["-DBLOCK=256"]}
# kernels whose arithmetic must round like NumPy: no fused multiply-add may appear in their PTX
NO_FMA = ("adam.cu", "ema.cu")


def _kernel_names(source):
    with open(source) as f:
        return _KERNEL_DECL.findall(f.read())


def test_kernel_folder_is_not_empty():
    assert SOURCES, f"no .cu files in {cuda.KERNEL_DIR}"


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_source_follows_the_kernel_conventions(source):
    with open(source) as f:
        text = f.read()
    assert re.search(r"#ifndef\s+SCALAR\s*\n\s*#define\s+SCALAR\s+float", text), \
        f"{os.path.basename(source)}: give SCALAR a default (#ifndef SCALAR / #define SCALAR float / #endif)"
    assert _kernel_names(source), f'{os.path.basename(source)}: no extern "C" __global__ kernel found'
    assert not re.search(r"^\s*#\s*include", text, re.M), \
        f"{os.path.basename(source)}: NVRTC compiles without the host's headers; use CUDA's built-in functions only"


def _ptx(nvcc, source, scalar):
    """PTX of source compiled with CuPy's NVRTC flags (cached)."""
    with open(source, "rb") as f:
        text = f.read()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    flags = ["--ptx", *CUPY_NVRTC_FLAGS, "--Werror", "all-warnings", f"-DSCALAR={scalar}",
             *KERNEL_DEFINES.get(os.path.basename(source), [])]
    key = hashlib.sha256(text + " ".join(flags).encode() + version.encode()).hexdigest()[:24]
    import gpu_emulator
    out = os.path.join(gpu_emulator.build_dir(), f"{os.path.basename(source)}.{scalar}.{key}.ptx")
    if not os.path.exists(out):
        tmp = out + f".{os.getpid()}.tmp"
        result = subprocess.run([nvcc, *flags, source, "-o", tmp], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"nvcc {' '.join(flags)} failed on {source}:\n{result.stderr}"
        os.replace(tmp, out)
    with open(out) as f:
        return f.read()


@pytest.mark.parametrize("scalar", ["float", "double"])
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_source_compiles_with_cupys_flags(source, scalar):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: install the CUDA toolkit to compile-check the kernels")
    text = _ptx(nvcc, source, scalar)
    for name in _kernel_names(source):                  # extern "C": the PTX entry has the plain name
        assert re.search(rf"\.entry\s+{name}\s*\(", text), f"kernel {name} missing from the PTX of {source}"
    if os.path.basename(source) in NO_FMA:
        # explicit __fmul_rn/__fadd_rn rounding: even with -fmad=true nothing is contracted (NumPy parity)
        assert "fma." not in text, f"{source} (-DSCALAR={scalar}) contains fused multiply-adds"
