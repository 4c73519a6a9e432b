"""Max and average pooling (forward only; Inception-v3 for FID needs no backward).

    x (N, C, H, W) -> y (N, C, Ho, Wo),  Ho = (H + 2 pad - k) // stride + 1

max_pool2d: padded positions are -inf (never chosen).
avg_pool2d: count_include_pad=False, i.e. y = sum of the real pixels / how many
            real pixels the window covers (pytorch-fid's A/C/E pool branches).

NumPy: a strided window view and one reduction (no loop over pixels).
CuPy: one thread per output (kernels/pool.cu, `max_pool2d`, `avg_pool2d`).
"""
from __future__ import annotations

import numpy as np

from . import backend
from .conv import conv_output_size


def _windows(xpad, k, stride, Ho, Wo):
    """(N, C, Ho, Wo, k, k) view: windows[n, c, i, j, p, q] = xpad[n, c, i*stride + p, j*stride + q]."""
    sN, sC, sH, sW = xpad.strides
    N, C = xpad.shape[:2]
    return np.lib.stride_tricks.as_strided(xpad, (N, C, Ho, Wo, k, k),
                                           (sN, sC, sH * stride, sW * stride, sH, sW), writeable=False)


def _pool_cupy(x, k, stride, pad, kernel_name):
    from . import cuda
    cp = backend.array_module(x)
    N, C, H, W = x.shape
    Ho, Wo = conv_output_size(H, k, stride, pad), conv_output_size(W, k, stride, pad)
    x = cp.ascontiguousarray(x)
    y = cp.empty((N, C, Ho, Wo), dtype=x.dtype)
    kernel = cuda.get_kernel("pool", kernel_name, x.dtype)
    cuda.launch_1d(kernel, y.size, (x, y, np.int64(y.size), np.int32(H), np.int32(W), np.int32(k),
                                    np.int32(stride), np.int32(pad), np.int32(Ho), np.int32(Wo)))
    return y


def max_pool2d(x, k: int, stride: int, pad: int = 0):
    if backend.is_cupy(backend.array_module(x)):
        return _pool_cupy(x, k, stride, pad, "max_pool2d")
    N, C, H, W = x.shape
    Ho, Wo = conv_output_size(H, k, stride, pad), conv_output_size(W, k, stride, pad)
    xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf) if pad else x
    return _windows(xpad, k, stride, Ho, Wo).max(axis=(4, 5))


def avg_pool2d(x, k: int, stride: int, pad: int = 0):
    """Average over the real (unpadded) pixels of each window: count_include_pad=False."""
    if backend.is_cupy(backend.array_module(x)):
        return _pool_cupy(x, k, stride, pad, "avg_pool2d")
    N, C, H, W = x.shape
    Ho, Wo = conv_output_size(H, k, stride, pad), conv_output_size(W, k, stride, pad)
    xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    sums = _windows(xpad, k, stride, Ho, Wo).sum(axis=(4, 5))
    ones = np.pad(np.ones((1, 1, H, W), x.dtype), ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad \
        else np.ones((1, 1, H, W), x.dtype)
    counts = _windows(ones, k, stride, Ho, Wo).sum(axis=(4, 5))     # real pixels per window
    return sums / counts
