"""CUDA kernels of the layers against their NumPy references.

Marked `gpu`: they run on real CuPy where a GPU is present, otherwise on the
CuPy stand-in, whose kernels are the same .cu files run by the CUDA emulator
(tests/conftest.py chooses). float32 agrees to < 1e-5 relative (the GEMMs sum
in another order), float64 to < 1e-12. The nvcc compile check of every .cu
file is in test_cuda_sources.py; Adam/EMA parity is in test_optim.py.
"""
import glob
import os

import numpy as np
import pytest

from ttfm_np import backend, conv, cuda, groupnorm, pool

SOURCES = sorted(glob.glob(os.path.join(cuda.KERNEL_DIR, "*.cu")))
TOL = {np.float32: 1e-5, np.float64: 1e-12}

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.gpu_available(), reason=f"no usable GPU: {backend.gpu_problem()}")]


def test_kernel_sources_exist():
    names = {os.path.basename(s) for s in SOURCES}
    assert {"im2col.cu", "groupnorm.cu", "adam.cu", "ema.cu", "pool.cu"} <= names


def _rel(a, b):
    a, b = backend.to_numpy(a).astype(np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _assert_close(got, want, tol, what=""):
    """Arrays, or dicts of arrays (grads), on any device; relative to the largest entry."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), what
        for k in want:
            _assert_close(got[k], want[k], tol, f"{what}[{k}]")
        return
    assert tuple(got.shape) == tuple(want.shape), what
    assert _rel(got, want) < tol, f"{what}: relative error {_rel(got, want):.3g} >= {tol}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (5, 2, 2), ((1, 7), 1, (0, 3))])
def test_conv_cupy_matches_numpy(rng, k, stride, pad, dtype):
    import cupy as cp
    kh, kw = k if isinstance(k, tuple) else (k, k)
    x = rng.standard_normal((3, 5, 9, 8)).astype(dtype)
    W = rng.standard_normal((4, 5, kh, kw)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    y, c = conv.conv2d_forward(x, W, b, stride, pad)
    yg, cg = conv.conv2d_forward(cp.asarray(x), cp.asarray(W), cp.asarray(b), stride, pad)
    _assert_close(yg, y, TOL[dtype], "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, grads = conv.conv2d_backward(dy, c)
    dxg, gradsg = conv.conv2d_backward(cp.asarray(dy), cg)
    _assert_close(dxg, dx, TOL[dtype], "dx")
    _assert_close(gradsg, grads, TOL[dtype], "grads")
    _assert_close(conv.im2col_cupy(cp.asarray(x), kh, kw, stride, pad), conv.im2col_numpy(x, kh, kw, stride, pad), 1e-15)


def test_col2im_kernel_is_the_adjoint_of_im2col(rng):
    # <im2col(x), c> = <x, col2im(c)> for any x, c: col2im gathers exactly what im2col copied
    import cupy as cp
    x = rng.standard_normal((2, 3, 7, 6))
    for kh, kw, stride, pad in [(3, 3, 2, 1), (2, 3, 1, (1, 0))]:
        cols = conv.im2col_cupy(cp.asarray(x), kh, kw, stride, pad)
        c = rng.standard_normal(cols.shape)
        back = conv.col2im_cupy(cp.asarray(c), x.shape, kh, kw, stride, pad)
        lhs, rhs = float((cols * cp.asarray(c)).sum()), float((cp.asarray(x) * back).sum())
        assert abs(lhs - rhs) < 1e-10 * abs(lhs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("silu", [False, True])
def test_groupnorm_cupy_matches_numpy(rng, silu, dtype):
    import cupy as cp
    x = (rng.standard_normal((2, 8, 5, 5)) * 3 + 1).astype(dtype)
    g = (1 + 0.2 * rng.standard_normal(8)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    y, c = groupnorm.groupnorm_forward(x, g, b, 4, silu=silu)
    yg, cg = groupnorm.groupnorm_forward(cp.asarray(x), cp.asarray(g), cp.asarray(b), 4, silu=silu)
    _assert_close(yg, y, TOL[dtype], "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    (dx, grads), (dxg, gradsg) = groupnorm.groupnorm_backward(dy, c), groupnorm.groupnorm_backward(cp.asarray(dy), cg)
    _assert_close(dxg, dx, TOL[dtype], "dx")
    _assert_close(gradsg, grads, TOL[dtype], "grads")


def test_groupnorm_kernels_get_contiguous_inputs_of_x_dtype(rng):
    """A raw kernel reads bytes: a strided x (cached as the caller passed it) or a float64 gamma
    for a float32 x must be converted before the call, never reinterpreted."""
    import cupy as cp
    base = (rng.standard_normal((2, 5, 5, 8)) * 2 + 1).astype(np.float32)
    x = base.transpose(0, 3, 1, 2)                                   # (2, 8, 5, 5), not contiguous
    g64 = 1 + 0.2 * rng.standard_normal(8)                           # float64 parameters
    b64 = rng.standard_normal(8)
    y, c = groupnorm.groupnorm_forward(np.ascontiguousarray(x), g64.astype(np.float32), b64.astype(np.float32), 4, silu=True)
    xg = cp.asarray(base).transpose(0, 3, 1, 2)
    assert not xg.flags.c_contiguous
    yg, cg = groupnorm.groupnorm_forward(xg, cp.asarray(g64), cp.asarray(b64), 4, silu=True)
    assert yg.dtype == np.float32
    _assert_close(yg, y, 1e-5, "y")
    dy = rng.standard_normal(y.shape)                                # float64 dy, strided below
    dx, grads = groupnorm.groupnorm_backward(dy.astype(np.float32), c)
    dyg = cp.asarray(np.ascontiguousarray(dy.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    dxg, gradsg = groupnorm.groupnorm_backward(dyg, cg)
    assert dxg.dtype == np.float32
    _assert_close(dxg, dx, 1e-5, "dx")
    _assert_close(gradsg, grads, 1e-5, "grads")
    with pytest.raises(TypeError, match="move it"):                  # a host gamma is named, not misread
        groupnorm.groupnorm_forward(xg, g64, cp.asarray(b64), 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,stride,pad", [(3, 2, 0), (3, 1, 1), (2, 2, 0)])
def test_pool_cupy_matches_numpy_and_propagates_nan(rng, k, stride, pad, dtype):
    import cupy as cp
    x = rng.standard_normal((2, 3, 9, 8)).astype(dtype)
    x[0, 1, 4, 4] = np.nan                                           # NumPy's max (and torch's) propagate NaN
    x[1, 2, 0, 0] = -np.inf
    for f in (pool.max_pool2d, pool.avg_pool2d):
        want, got = f(x, k, stride, pad), f(cp.asarray(x), k, stride, pad)
        np.testing.assert_array_equal(np.isnan(backend.to_numpy(got)), np.isnan(want), err_msg=f.__name__)
        assert np.isnan(want).any()
        ok = np.isfinite(want)
        # the average sums in another order than NumPy: compare relative to the largest value
        np.testing.assert_allclose(backend.to_numpy(got)[ok], want[ok], rtol=0,
                                   atol=TOL[dtype] * np.abs(want[ok]).max(), err_msg=f.__name__)


def test_kernels_give_the_same_bits_in_any_thread_order(rng):
    """The emulator runs a block's threads forward, reversed or shuffled: a kernel whose result
    changes with the order has a race (e.g. a missing __syncthreads in the block reduction)."""
    gpu_emulator = pytest.importorskip("gpu_emulator")
    import conftest
    if not conftest.USING_CUPY_STANDIN:
        pytest.skip("thread orders are a feature of the CUDA emulator (CuPy stand-in)")
    import cupy as cp
    x = cp.asarray((rng.standard_normal((2, 16, 6, 6)) * 2 + 1).astype(np.float32))
    g, b = cp.asarray(rng.standard_normal(16).astype(np.float32)), cp.asarray(rng.standard_normal(16).astype(np.float32))
    dy = cp.asarray(rng.standard_normal((2, 16, 6, 6)).astype(np.float32))
    results = []
    for order, seed in (("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)):
        with gpu_emulator.thread_order(order, seed):
            y, c = groupnorm.groupnorm_forward(x, g, b, 4, silu=True)
            dx, grads = groupnorm.groupnorm_backward(dy, c)
            cols = conv.im2col_cupy(x, 3, 3, 2, 1)
            results.append([a.get() for a in (y, dx, grads["gamma"], cols, pool.max_pool2d(x, 3, 2, 1))])
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            np.testing.assert_array_equal(a, b_)
