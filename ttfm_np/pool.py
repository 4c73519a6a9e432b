"""Max and average pooling (forward only; Inception-v3 for FID needs no backward).

    x (N, C, H, W) -> y (N, C, Ho, Wo),  Ho = (H + 2 pad - k) // stride + 1
    window (i, j): rows i*stride - pad .. i*stride - pad + k - 1, columns likewise

max_pool2d: padded positions are -inf (never chosen).
avg_pool2d: count_include_pad=False, i.e. y = sum of the real pixels / how many
            real pixels the window covers (pytorch-fid's A/C/E pool branches).

NumPy: a k x k window is separable, so both pools are done as k strided slab
operations down the rows, then k across the columns (max(max) and sum(sum));
a loop over the k kernel offsets, never over pixels. This is ~5x faster than
reducing a (N, C, Ho, Wo, k, k) strided window view, whose tiny trailing axes
NumPy reduces slowly.
CuPy: one thread per output (kernels/pool.cu, `max_pool2d`, `avg_pool2d`).
"""
from __future__ import annotations

import numpy as np

from . import backend
from .conv import conv_output_size


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


def _check(x, k, stride, pad):
    if x.ndim != 4:
        raise ValueError(f"pooling takes (N, C, H, W) arrays, got shape {x.shape}")
    if not (k >= 1 and stride >= 1 and 0 <= pad <= k // 2):
        raise ValueError(f"pooling needs k >= 1, stride >= 1 and 0 <= pad <= k // 2, got k={k}, stride={stride}, pad={pad}")
    if x.shape[2] + 2 * pad < k or x.shape[3] + 2 * pad < k:
        raise ValueError(f"a {k}x{k} pooling window does not fit a {x.shape[2]}x{x.shape[3]} input with padding {pad}")


def _separable(xpad, k, stride, Ho, Wo, combine):
    """out[n, c, i, j] = combine over p, q of xpad[n, c, i*stride + p, j*stride + q], rows first, then columns."""
    rows = slice(0, stride * (Ho - 1) + 1, stride)
    r = xpad[:, :, rows].copy()                                        # (N, C, Ho, Wp), offset p = 0
    for p in range(1, k):
        combine(r, xpad[:, :, p:p + stride * (Ho - 1) + 1:stride], out=r)
    out = r[..., 0:stride * (Wo - 1) + 1:stride].copy()                # (N, C, Ho, Wo), offset q = 0
    for q in range(1, k):
        combine(out, r[..., q:q + stride * (Wo - 1) + 1:stride], out=out)
    return out


def max_pool2d(x, k: int, stride: int, pad: int = 0):
    """x (N, C, H, W) -> (N, C, Ho, Wo): the largest real pixel of each k x k window."""
    _check(x, k, stride, pad)
    if backend.is_cupy(backend.array_module(x)):
        return _pool_cupy(x, k, stride, pad, "max_pool2d")
    N, C, H, W = x.shape
    Ho, Wo = conv_output_size(H, k, stride, pad), conv_output_size(W, k, stride, pad)
    xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf) if pad else x
    return _separable(xpad, k, stride, Ho, Wo, np.maximum)


def _real_count(size, k, stride, pad, n_out):
    """How many real (unpadded) positions window i covers along one axis: (n_out,)."""
    start = np.arange(n_out) * stride - pad
    return np.minimum(start + k, size) - np.maximum(start, 0)


def avg_pool2d(x, k: int, stride: int, pad: int = 0):
    """x (N, C, H, W) -> (N, C, Ho, Wo): mean over the real (unpadded) pixels of each window (count_include_pad=False)."""
    _check(x, k, stride, pad)
    if backend.is_cupy(backend.array_module(x)):
        return _pool_cupy(x, k, stride, pad, "avg_pool2d")
    N, C, H, W = x.shape
    Ho, Wo = conv_output_size(H, k, stride, pad), conv_output_size(W, k, stride, pad)
    xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    sums = _separable(xpad, k, stride, Ho, Wo, np.add)                  # zeros add nothing
    # the window is a product of a row range and a column range: count = count_rows[i] * count_cols[j]
    counts = np.outer(_real_count(H, k, stride, pad, Ho), _real_count(W, k, stride, pad, Wo)).astype(x.dtype)
    sums /= counts
    return sums
