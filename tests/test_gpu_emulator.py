"""The CUDA emulator (tests/gpu_emulator) catches what it is there to catch.

Small kernels written here, run on NumPy buffers: a barrier really waits, a
missing barrier shows up as an order-dependent result, out-of-bounds indices
and divergent barriers are errors, bad arguments and launch configurations are
refused, FMA contraction and flush-to-zero behave as under NVRTC.
"""
import glob
import os
import shutil

import numpy as np
import pytest

import gpu_emulator as emu
from ttfm_np import cuda

SOURCES = sorted(glob.glob(os.path.join(cuda.KERNEL_DIR, "*.cu")))
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator compiles kernels with g++, "
                                                                    "which is not on PATH")

REDUCE = r"""
#define BLOCK 64
extern "C" __global__ void block_sums(const float* x, float* out, int n)
{
    __shared__ float shm[BLOCK];
    int t = threadIdx.x, i = blockIdx.x * BLOCK + t;
    shm[t] = i < n ? x[i] : 0.0f;
    SYNC
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) shm[t] += shm[t + s];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = shm[0];
}
"""


def _reduce(sync, x, order="forward", seed=0):
    f = emu.EmulatedModule(REDUCE.replace("SYNC", "__syncthreads();" if sync else "")).get_function("block_sums")
    out = np.zeros(-(-x.size // 64), np.float32)
    with emu.thread_order(order, seed):
        f((out.size,), (64,), (x, out, np.int32(x.size)))
    return out


def test_barrier_reduction_is_right_in_every_thread_order(rng):
    x = rng.integers(-50, 50, 200).astype(np.float32)              # integers: sums are exact in any order
    want = np.add.reduceat(x, np.arange(0, 200, 64))
    for order, seed in (("forward", 0), ("reverse", 0), ("shuffle", 3)):
        np.testing.assert_array_equal(_reduce(True, x, order, seed), want)


def test_missing_barrier_is_a_race_that_thread_order_exposes(rng):
    # without the first __syncthreads a thread may read shm[t + s] before its owner wrote it
    x = rng.integers(1, 50, 128).astype(np.float32)
    results = [_reduce(False, x, order, seed) for order, seed in (("forward", 0), ("reverse", 0), ("shuffle", 1))]
    assert any(not np.array_equal(results[0], r) for r in results[1:])


def test_out_of_bounds_index_is_an_error():
    src = 'extern "C" __global__ void k(float* y, long long n) { long long i = blockIdx.x * blockDim.x + threadIdx.x; y[i] = 1.0f; }'
    f = emu.EmulatedModule(src).get_function("k")
    with pytest.raises(emu.EmulatorError, match=r"out-of-bounds.*element 100 of `y`, which holds 100"):
        f((4,), (32,), (np.zeros(100, np.float32), np.int64(100)))


def test_divergent_barrier_is_an_error():
    src = 'extern "C" __global__ void k(float* y) { if (threadIdx.x < 16) __syncthreads(); y[threadIdx.x] = 1.0f; }'
    f = emu.EmulatedModule(src).get_function("k")
    with pytest.raises(emu.EmulatorError, match="divergent __syncthreads"):
        f((1,), (32,), (np.zeros(32, np.float32),))


def test_unwritten_shared_memory_reads_as_nan():
    src = ('extern "C" __global__ void k(float* y) { __shared__ float s[64]; if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;'
           ' __syncthreads(); y[threadIdx.x] = s[63 - threadIdx.x]; }')
    y = np.zeros(64, np.float32)
    emu.EmulatedModule(src).get_function("k")((1,), (64,), (y,))
    assert np.isnan(y[:32]).all() and (y[32:] == 1).all()


def test_arguments_and_launches_are_checked():
    src = 'extern "C" __global__ void k(const double* x, float* y, int n, SCALAR a) { }'
    f = emu.EmulatedModule(src, ("-DSCALAR=float",)).get_function("k")
    x, y = np.zeros(8), np.zeros(8, np.float32)
    f((1,), (8,), (x, y, np.int32(8), np.float32(1)))                       # all right
    bad = [((x.astype(np.float32), y, np.int32(8), np.float32(1)), TypeError, "const double"),
           ((x, y[::2], np.int32(8), np.float32(1)), ValueError, "non-contiguous"),
           ((x, y, 8, np.float32(1)), TypeError, "pass int32"),
           ((x, y, np.int64(8), np.float32(1)), TypeError, "pass int32"),
           ((x, y, np.int32(8), np.float64(1)), TypeError, "pass float32"),
           ((x, y, np.int32(8)), TypeError, "3 arguments for 4"),
           ((x, y.tolist(), np.int32(8), np.float32(1)), TypeError, "needs a device array")]
    for args, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            f((1,), (8,), args)
    with pytest.raises(ValueError, match="threads per block"):
        f((1,), (64, 32), (x, y, np.int32(8), np.float32(1)))
    with pytest.raises(ValueError, match="zero-size launch"):
        f((0,), (8,), (x, y, np.int32(8), np.float32(1)))


def test_shared_memory_limit():
    src = 'extern "C" __global__ void k(float* y) { __shared__ float big[16384]; big[threadIdx.x] = 0; y[0] = big[0]; }'
    f = emu.EmulatedModule(src).get_function("k")
    assert f.module.static_shared == 65536
    with pytest.raises(ValueError, match="shared memory exceeds"):
        f((1,), (1,), (np.zeros(1, np.float32),))


FMA_SRC = r"""
extern "C" __global__ void k(const float* a, const float* b, const float* c, float* fused, float* rounded, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { fused[i] = a[i] * b[i] + c[i]; rounded[i] = __fadd_rn(__fmul_rn(a[i], b[i]), c[i]); }
}
"""


def test_fma_contraction_as_nvrtc_unless_fmad_false(rng):
    if not emu._cpu_has_fma():
        pytest.skip("this CPU has no FMA instruction to emulate nvcc's contraction with")
    n = 4096
    a, b, c = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    numpy_twice_rounded = a * b + c                                  # NumPy rounds the product, then the sum
    exact = (a.astype(np.float64) * b + c).astype(np.float32)       # one rounding, as an FMA
    for opts, contracted in (((), True), (("--fmad=false",), False)):
        fused, rounded = np.empty(n, np.float32), np.empty(n, np.float32)
        emu.EmulatedModule(FMA_SRC, opts).get_function("k")((n // 256,), (256,), (a, b, c, fused, rounded, np.int32(n)))
        np.testing.assert_array_equal(rounded, numpy_twice_rounded)   # explicit _rn: never contracted
        np.testing.assert_array_equal(fused, exact if contracted else numpy_twice_rounded)
    assert not np.array_equal(exact, numpy_twice_rounded)           # the inputs do tell the two apart


def test_flush_to_zero_of_float32_subnormals():
    src = 'extern "C" __global__ void k(const float* a, float* y) { y[threadIdx.x] = a[threadIdx.x] * 1e-20f; }'
    a, y = np.full(4, 1e-20, np.float32), np.empty(4, np.float32)
    emu.EmulatedModule(src).get_function("k")((1,), (4,), (a, y))
    assert (y > 0).all()                                             # 1e-40: a subnormal, kept
    emu.EmulatedModule(src, ("-ftz=true",)).get_function("k")((1,), (4,), (a, y))
    assert (y == 0).all()                                            # CuPy's -ftz=true flushes it


@pytest.mark.parametrize("scalar", ["float", "double"])
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_every_project_kernel_builds_in_the_emulator(source, scalar):
    with open(source) as f:
        code = f.read()
    stem = os.path.basename(source)[:-3]
    defines = (("BLOCK", 256),) if stem == "groupnorm" else ()    # groupnorm.py passes its block size
    mod = emu.EmulatedModule(code, cuda.compile_options(scalar, defines) + ("-ftz=true",))
    assert set(mod.kernels) == set(emu.parse_kernels(code)) and mod.kernels
    for name in mod.kernels:
        mod.get_function(name)
