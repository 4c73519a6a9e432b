"""CUDA kernels of the layers: on a GPU every kernel matches its NumPy reference
(float32, relative error < 1e-5). The nvcc compile check of every .cu file is in
test_cuda_sources.py; Adam/EMA parity is in test_optim.py."""
import glob
import os

import numpy as np
import pytest

from ttfm_np import backend, conv, cuda, groupnorm

SOURCES = sorted(glob.glob(os.path.join(cuda.KERNEL_DIR, "*.cu")))


def test_kernel_sources_exist():
    names = {os.path.basename(s) for s in SOURCES}
    assert {"im2col.cu", "groupnorm.cu", "adam.cu", "ema.cu"} <= names


needs_gpu = pytest.mark.skipif(not backend.gpu_available(), reason=f"no usable GPU: {backend.gpu_problem()}")


def _rel(a, b):
    a, b = backend.to_numpy(a).astype(np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (5, 2, 2), ((1, 7), 1, (0, 3))])
def test_conv_cupy_matches_numpy(rng, k, stride, pad):
    import cupy as cp
    kh, kw = k if isinstance(k, tuple) else (k, k)
    x = rng.standard_normal((3, 5, 9, 8)).astype(np.float32)
    W = rng.standard_normal((4, 5, kh, kw)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    y, c = conv.conv2d_forward(x, W, b, stride, pad)
    yg, cg = conv.conv2d_forward(cp.asarray(x), cp.asarray(W), cp.asarray(b), stride, pad)
    assert _rel(yg, y) < 1e-5
    dy = rng.standard_normal(y.shape).astype(np.float32)
    (dx, grads), (dx_gpu, grads_gpu) = conv.conv2d_backward(dy, c), conv.conv2d_backward(cp.asarray(dy), cg)
    assert _rel(dx_gpu, dx) < 1e-5 and set(grads_gpu) == set(grads) == {"weight", "bias"}
    for k in grads:
        assert _rel(grads_gpu[k], grads[k]) < 1e-5, k
    assert _rel(conv.im2col_cupy(cp.asarray(x), kh, kw, stride, pad), conv.im2col_numpy(x, kh, kw, stride, pad)) < 1e-6


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("silu", [False, True])
def test_groupnorm_cupy_matches_numpy(rng, silu):
    import cupy as cp
    x = (rng.standard_normal((2, 8, 5, 5)) * 3 + 1).astype(np.float32)
    g = (1 + 0.2 * rng.standard_normal(8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    y, c = groupnorm.groupnorm_forward(x, g, b, 4, silu=silu)
    yg, cg = groupnorm.groupnorm_forward(cp.asarray(x), cp.asarray(g), cp.asarray(b), 4, silu=silu)
    assert _rel(yg, y) < 1e-5
    dy = rng.standard_normal(y.shape).astype(np.float32)
    (dx, grads), (dx_gpu, grads_gpu) = groupnorm.groupnorm_backward(dy, c), groupnorm.groupnorm_backward(cp.asarray(dy), cg)
    assert _rel(dx_gpu, dx) < 1e-5 and set(grads_gpu) == set(grads) == {"gamma", "beta"}
    for k in grads:
        assert _rel(grads_gpu[k], grads[k]) < 1e-5, k
