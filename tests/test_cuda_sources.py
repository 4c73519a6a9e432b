"""Every CUDA source in ttfm_np/kernels/ compiles with nvcc, for float and double.

No GPU is needed: `nvcc --ptx` only compiles. The test globs all kernels/*.cu
files, so a kernel added later is checked without touching this file. It also
checks the conventions cuda.get_kernel relies on: a `#ifndef SCALAR` default,
`extern "C"` kernels (unmangled names, found by name in the compiled module).
"""
import glob
import os
import re
import shutil
import subprocess

import pytest

from ttfm_np import cuda

SOURCES = sorted(glob.glob(os.path.join(cuda.KERNEL_DIR, "*.cu")))
_KERNEL_DECL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


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


@pytest.mark.parametrize("scalar", ["float", "double"])
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_source_compiles_with_nvcc(source, scalar, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: install the CUDA toolkit to compile-check the kernels")
    ptx = tmp_path / (os.path.basename(source) + f".{scalar}.ptx")
    result = subprocess.run([nvcc, "--ptx", "-arch=sm_90", f"-DSCALAR={scalar}", source, "-o", str(ptx)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed on {source} (-DSCALAR={scalar}):\n{result.stderr}"
    text = ptx.read_text()
    for name in _kernel_names(source):                  # extern "C": the PTX entry has the plain name
        assert re.search(rf"\.entry\s+{name}\s*\(", text), f"kernel {name} missing from the PTX of {source}"
