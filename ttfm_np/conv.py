"""2-D convolution (cross-correlation, as in PyTorch) via im2col + one GEMM.

Shapes (NCHW):
    x   (N, C, H, W)            input
    W   (O, C, kh, kw)          weight, OIHW
    b   (O,)                    bias (or None)
    y   (N, O, Ho, Wo)          Ho = (H + 2 pad - kh) // stride + 1

    y[n, o, i, j] = b[o] + sum_{c, p, q} W[o, c, p, q] * xpad[n, c, i*stride + p, j*stride + q]

im2col turns the sum into a matrix product. cols[n] is a (C*kh*kw, Ho*Wo)
matrix whose column (i, j) is the receptive field of output pixel (i, j):

    cols[n, (c, p, q), (i, j)] = xpad[n, c, i*stride + p, j*stride + q]
    y[n] = Wm @ cols[n]          with Wm = W.reshape(O, C*kh*kw)

On the CPU, cols is built from a strided *view* of xpad (no Python loop over
pixels; one copy). On the GPU a CUDA kernel (kernels/im2col.cu) writes cols and
another (col2im) scatters the gradient back; the GEMM is cuBLAS via cupy.matmul.
"""
from __future__ import annotations

import numpy as np

from . import backend


def conv_output_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


# ----------------------------------------------------------------------------
# im2col / col2im, NumPy (reference) and CuPy (CUDA kernel) paths
# ----------------------------------------------------------------------------

def im2col_numpy(x, kh: int, kw: int, stride: int, pad: int):
    """x (N, C, H, W) -> cols (N, C*kh*kw, Ho*Wo) through a strided view."""
    N, C, H, W = x.shape
    Ho, Wo = conv_output_size(H, kh, stride, pad), conv_output_size(W, kw, stride, pad)
    xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    sN, sC, sH, sW = xpad.strides
    # windows[n, c, p, q, i, j] = xpad[n, c, i*stride + p, j*stride + q]   (a view, no copy)
    windows = np.lib.stride_tricks.as_strided(
        xpad, shape=(N, C, kh, kw, Ho, Wo),
        strides=(sN, sC, sH, sW, sH * stride, sW * stride), writeable=False)
    return windows.reshape(N, C * kh * kw, Ho * Wo)          # the one copy


def col2im_numpy(dcols, x_shape, kh: int, kw: int, stride: int, pad: int):
    """Adjoint of im2col: dcols (N, C*kh*kw, Ho*Wo) -> dx (N, C, H, W).

    Every cols entry was a copy of one xpad entry, so the gradient of xpad is
    the sum of the dcols entries that copied it. Loop over the kh*kw kernel
    offsets (9 for a 3x3 conv), never over pixels.
    """
    N, C, H, W = x_shape
    Ho, Wo = conv_output_size(H, kh, stride, pad), conv_output_size(W, kw, stride, pad)
    dxpad = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=dcols.dtype)
    d6 = dcols.reshape(N, C, kh, kw, Ho, Wo)
    for p in range(kh):
        for q in range(kw):
            # forward: cols[n, c, p, q, i, j] = xpad[n, c, p + i*stride, q + j*stride]
            dxpad[:, :, p:p + stride * Ho:stride, q:q + stride * Wo:stride] += d6[:, :, p, q]
    if pad:
        return dxpad[:, :, pad:pad + H, pad:pad + W]
    return dxpad


def im2col_cupy(x, kh: int, kw: int, stride: int, pad: int):
    """CUDA version of im2col_numpy (kernels/im2col.cu, kernel `im2col`)."""
    from . import cuda
    cp = backend.array_module(x)
    N, C, H, W = x.shape
    Ho, Wo = conv_output_size(H, kh, stride, pad), conv_output_size(W, kw, stride, pad)
    x = cp.ascontiguousarray(x)
    cols = cp.empty((N, C * kh * kw, Ho * Wo), dtype=x.dtype)
    kernel = cuda.get_kernel("im2col", "im2col", x.dtype)
    total = cols.size
    cuda.launch_1d(kernel, total, (x, cols, np.int64(total), np.int32(C), np.int32(H), np.int32(W),
                                   np.int32(kh), np.int32(kw), np.int32(stride), np.int32(pad),
                                   np.int32(Ho), np.int32(Wo)))
    return cols


def col2im_cupy(dcols, x_shape, kh: int, kw: int, stride: int, pad: int):
    """CUDA version of col2im_numpy: one thread per input pixel gathers its terms (no atomics)."""
    from . import cuda
    cp = backend.array_module(dcols)
    N, C, H, W = x_shape
    Ho, Wo = conv_output_size(H, kh, stride, pad), conv_output_size(W, kw, stride, pad)
    dcols = cp.ascontiguousarray(dcols)
    dx = cp.empty((N, C, H, W), dtype=dcols.dtype)
    kernel = cuda.get_kernel("im2col", "col2im", dcols.dtype)
    total = dx.size
    cuda.launch_1d(kernel, total, (dcols, dx, np.int64(total), np.int32(C), np.int32(H), np.int32(W),
                                   np.int32(kh), np.int32(kw), np.int32(stride), np.int32(pad),
                                   np.int32(Ho), np.int32(Wo)))
    return dx


def im2col(x, kh, kw, stride, pad):
    if backend.is_cupy(backend.array_module(x)):
        return im2col_cupy(x, kh, kw, stride, pad)
    return im2col_numpy(x, kh, kw, stride, pad)


def col2im(dcols, x_shape, kh, kw, stride, pad):
    if backend.is_cupy(backend.array_module(dcols)):
        return col2im_cupy(dcols, x_shape, kh, kw, stride, pad)
    return col2im_numpy(dcols, x_shape, kh, kw, stride, pad)


# ----------------------------------------------------------------------------
# conv2d forward / backward
# ----------------------------------------------------------------------------

def conv2d_forward(x, W, b=None, stride: int = 1, padding: int = 0):
    """x (N, C, H, W), W (O, C, kh, kw), b (O,) -> y (N, O, Ho, Wo), cache."""
    xp = backend.array_module(x)
    N, C, H, Wd = x.shape
    O, Cw, kh, kw = W.shape
    if Cw != C:
        raise ValueError(f"conv2d: input has {C} channels but the weight expects {Cw} (weight shape {W.shape})")
    Ho, Wo = conv_output_size(H, kh, stride, padding), conv_output_size(Wd, kw, stride, padding)
    if kh == 1 and kw == 1 and stride == 1 and padding == 0:
        cols = x.reshape(N, C, H * Wd)                # a 1x1 conv needs no im2col
    else:
        cols = im2col(x, kh, kw, stride, padding)     # (N, C*kh*kw, Ho*Wo)
    Wm = W.reshape(O, C * kh * kw)
    y = xp.matmul(Wm, cols)                           # (N, O, Ho*Wo): one batched GEMM
    if b is not None:
        y += b.reshape(1, O, 1)
    cache = (cols, W, x.shape, stride, padding, b is not None)
    return y.reshape(N, O, Ho, Wo), cache


def conv2d_backward(dy, cache):
    """dy (N, O, Ho, Wo) -> dx (N, C, H, W), dW (O, C, kh, kw), db (O,) or None."""
    cols, W, x_shape, stride, padding, has_bias = cache
    xp = backend.array_module(dy)
    N, O, Ho, Wo = dy.shape
    _, C, kh, kw = W.shape
    dy3 = dy.reshape(N, O, Ho * Wo)
    # y[n] = Wm @ cols[n]  =>  dWm = sum_n dy[n] @ cols[n]^T   (one GEMM over (n, pixel))
    dWm = xp.tensordot(dy3, cols, axes=((0, 2), (0, 2)))     # (O, C*kh*kw)
    # y += b               =>  db = sum of dy over n and pixels
    db = dy3.sum(axis=(0, 2)) if has_bias else None
    # y[n] = Wm @ cols[n]  =>  dcols[n] = Wm^T @ dy[n]
    dcols = xp.matmul(W.reshape(O, C * kh * kw).T, dy3)      # (N, C*kh*kw, Ho*Wo)
    if kh == 1 and kw == 1 and stride == 1 and padding == 0:
        dx = dcols.reshape(x_shape)
    else:
        dx = col2im(dcols, x_shape, kh, kw, stride, padding)
    return dx, dWm.reshape(W.shape), db
