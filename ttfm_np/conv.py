"""2-D convolution (cross-correlation, as in PyTorch) via im2col + one GEMM (or Winograd for 3x3).

Shapes (NCHW):
    x   (N, C, H, W)            input
    W   (O, C, kh, kw)          weight, OIHW
    b   (O,)                    bias (or None)
    y   (N, O, Ho, Wo)          Ho = (H + 2 ph - kh) // stride + 1, Wo likewise with pw
    padding (ph, pw) may differ per axis (Inception's 1x7 / 7x1 convolutions).

    y[n, o, i, j] = b[o] + sum_{c, p, q} W[o, c, p, q] * xpad[n, c, i*stride + p, j*stride + q]

im2col turns the sum into ONE matrix product with the batch folded in. cols is
a (C*kh*kw, N*Ho*Wo) matrix whose column (n, i, j) is the receptive field of
output pixel (i, j) of sample n:

    cols[(c, p, q), (n, i, j)] = xpad[n, c, i*stride + p, j*stride + q]
    Y = Wm @ cols               Wm = W.reshape(O, C*kh*kw),  Y (O, N*Ho*Wo)
    y = Y.reshape(O, N, Ho, Wo).transpose(1, 0, 2, 3)

One large GEMM (M = O, K = C*kh*kw, N = batch*pixels) keeps BLAS near its
peak. On the CPU, cols is filled by kh*kw slab copies of a strided view of
xpad (no Python loop over pixels); on the GPU a CUDA kernel (kernels/im2col.cu)
writes cols and another (col2im) gathers the gradient back; the GEMM is cuBLAS.
(dev/conv2d.py keeps the versions measured on the way here.)

On the CPU, the 3x3 / stride 1 / padding 1 convolutions (most of a U-Net's) go through Winograd
F(2x2, 3x3) instead (winograd.py, switch CONV3X3 below): 2.25x fewer GEMM FLOPs.
"""
from __future__ import annotations

import numpy as np

from . import backend
from . import parallel, precision, winograd
from .precision import matmul as gemm   # fp32, or TF32 inputs with --precision tf32 (precision.py)


def conv_output_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def as_pair(padding):
    """padding p or (ph, pw) -> (ph, pw)."""
    if isinstance(padding, (tuple, list)):
        return int(padding[0]), int(padding[1])
    return int(padding), int(padding)


# ----------------------------------------------------------------------------
# im2col / col2im, NumPy (reference) and CuPy (CUDA kernel) paths
# ----------------------------------------------------------------------------

def _valid_range(out_size: int, in_size: int, offset: int, stride: int, pad: int):
    """Output indices i in [lo, hi) whose input index i*stride + offset - pad lies inside [0, in_size)."""
    lo = max(0, -(-(pad - offset) // stride))                    # ceil((pad - offset) / stride)
    hi = min(out_size, (in_size - 1 + pad - offset) // stride + 1)
    return lo, max(lo, hi)


def im2col_cnhw_numpy(xt, kh: int, kw: int, stride: int, pad):
    """xt (C, N, H, W), channel-major (a transposed view is fine) -> cols (C*kh*kw, N*Ho*Wo).

    kh*kw slab copies straight from xt; the zero padding is written into the
    border strips of cols instead of padding a copy of the input first.
    """
    C, N, H, W = xt.shape
    ph, pw = as_pair(pad)
    Ho, Wo = conv_output_size(H, kh, stride, ph), conv_output_size(W, kw, stride, pw)
    cols = np.empty((C, kh, kw, N, Ho, Wo), dtype=xt.dtype)
    for p in range(kh):
        i0, i1 = _valid_range(Ho, H, p, stride, ph)
        for q in range(kw):
            j0, j1 = _valid_range(Wo, W, q, stride, pw)
            dst = cols[:, p, q]                                  # (C, N, Ho, Wo)
            dst[:, :, :i0] = 0
            dst[:, :, i1:] = 0
            dst[:, :, i0:i1, :j0] = 0
            dst[:, :, i0:i1, j1:] = 0
            if i1 > i0 and j1 > j0:
                # cols[c, p, q, n, i, j] = x[n, c, i*stride + p - ph, j*stride + q - pw]
                r0, c0 = i0 * stride + p - ph, j0 * stride + q - pw
                dst[:, :, i0:i1, j0:j1] = xt[:, :, r0:r0 + stride * (i1 - i0 - 1) + 1:stride,
                                             c0:c0 + stride * (j1 - j0 - 1) + 1:stride]
    return cols.reshape(C * kh * kw, N * Ho * Wo)


def im2col_numpy(x, kh: int, kw: int, stride: int, pad):
    """x (N, C, H, W) -> cols (C*kh*kw, N*Ho*Wo), filled by kh*kw slab copies."""
    return im2col_cnhw_numpy(x.transpose(1, 0, 2, 3), kh, kw, stride, pad)


def col2im_numpy(dcols, x_shape, kh: int, kw: int, stride: int, pad):
    """Adjoint of im2col: dcols (C*kh*kw, N*Ho*Wo) -> dx (N, C, H, W).

    Every cols entry was a copy of one xpad entry, so the gradient of xpad is
    the sum of the dcols entries that copied it. Loop over the kh*kw kernel
    offsets (9 for a 3x3 conv), never over pixels. (conv2d_backward uses this
    only for strided convolutions; stride 1 goes through the transposed
    convolution, which is faster on the CPU.)
    """
    N, C, H, W = x_shape
    ph, pw = as_pair(pad)
    Ho, Wo = conv_output_size(H, kh, stride, ph), conv_output_size(W, kw, stride, pw)
    dxt = np.zeros((C, N, H + 2 * ph, W + 2 * pw), dtype=dcols.dtype)
    d6 = dcols.reshape(C, kh, kw, N, Ho, Wo)
    for p in range(kh):
        for q in range(kw):
            # forward: cols[c, p, q, n, i, j] = xpad[n, c, p + i*stride, q + j*stride]
            dxt[:, :, p:p + stride * (Ho - 1) + 1:stride, q:q + stride * (Wo - 1) + 1:stride] += d6[:, p, q]
    return np.ascontiguousarray(dxt[:, :, ph:ph + H, pw:pw + W].transpose(1, 0, 2, 3))


def im2col_cupy(x, kh: int, kw: int, stride: int, pad):
    """CUDA version of im2col_numpy (kernels/im2col.cu, kernel `im2col`)."""
    from . import cuda
    cp = backend.array_module(x)
    N, C, H, W = x.shape
    ph, pw = as_pair(pad)
    Ho, Wo = conv_output_size(H, kh, stride, ph), conv_output_size(W, kw, stride, pw)
    _check_int32_indices(N * C * H * W, N * Ho * Wo, C * kh * kw)
    x = cp.ascontiguousarray(x)
    cols = cp.empty((C * kh * kw, N * Ho * Wo), dtype=x.dtype)
    kernel = cuda.get_kernel("im2col", "im2col", x.dtype)
    # rows (c, p, q) over the grid's y, columns (n, i, j) over x: 32-bit index math in the kernel
    cuda.launch_2d(kernel, C * kh * kw, N * Ho * Wo, (x, cols, np.int32(N), np.int32(C), np.int32(H), np.int32(W),
                                                      np.int32(kh), np.int32(kw), np.int32(stride), np.int32(ph),
                                                      np.int32(pw), np.int32(Ho), np.int32(Wo)))
    return cols


def _check_int32_indices(*sizes):
    """im2col.cu indexes with 32-bit ints (plus a grid-stride step of at most 65535 * 256)."""
    if max(sizes) > 2**31 - 1 - 65535 * 256:
        raise ValueError(f"conv2d on the GPU: {max(sizes)} elements in one index range is beyond the "
                         "im2col kernel's 32-bit index math; use a smaller batch")


def col2im_cupy(dcols, x_shape, kh: int, kw: int, stride: int, pad):
    """CUDA version of col2im_numpy: one thread per input pixel gathers its terms (no atomics)."""
    from . import cuda
    cp = backend.array_module(dcols)
    N, C, H, W = x_shape
    ph, pw = as_pair(pad)
    Ho, Wo = conv_output_size(H, kh, stride, ph), conv_output_size(W, kw, stride, pw)
    _check_int32_indices(N * C * H * W, N * Ho * Wo, C * kh * kw)
    dcols = cp.ascontiguousarray(dcols)
    dx = cp.empty((N, C, H, W), dtype=dcols.dtype)
    kernel = cuda.get_kernel("im2col", "col2im", dcols.dtype)
    # rows (n, c) over the grid's y, pixels (h, w) over x
    cuda.launch_2d(kernel, N * C, H * W, (dcols, dx, np.int32(N), np.int32(C), np.int32(H), np.int32(W),
                                          np.int32(kh), np.int32(kw), np.int32(stride), np.int32(ph), np.int32(pw),
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

def _is_pointwise(kh, kw, stride, padding):
    return kh == 1 and kw == 1 and stride == 1 and as_pair(padding) == (0, 0)


def _uses_transposed_backward(xp, kh, kw, stride, padding):
    """NumPy, stride 1, padding < kernel: backward through the transposed convolution (conv2d_backward)."""
    ph, pw = as_pair(padding)
    return (not backend.is_cupy(xp) and not _is_pointwise(kh, kw, stride, padding)
            and stride == 1 and ph <= kh - 1 and pw <= kw - 1)


# The NumPy transposed-backward path unfolds and multiplies a few samples at a time, so that each
# im2col buffer is written into and read back from the CPU's cache instead of main memory, and the
# copy back to NCHW (+ bias) reads a cache-resident GEMM result. Target size of one chunk's cols:
# measured on the small U-Net's 3x3 convolutions (32 x 64 x 32 x 32, AMD EPYC, 32 MiB L3, 1 thread):
# the whole batch at once 59.8 ms, 2 / 4 / 8 samples per chunk (4.7 / 9.4 / 19 MiB) 54.1 / 42.9 / 44.7 ms.
_CHUNK_BYTES = 10 * 2**20


def _sample_chunks(N: int, per_sample_bytes: int, chunk_bytes: int | None = None):
    """[(n0, n1), ...] covering range(N), each holding about chunk_bytes (default _CHUNK_BYTES) of
    buffer (at least 1 sample). winograd.py passes its own target (winograd.CHUNK_BYTES)."""
    return parallel.chunk_range(N, per_sample_bytes, chunk_bytes or _CHUNK_BYTES)


# 3x3 / stride 1 / padding 1 convolutions on NumPy arrays in fp32 (or float64) GEMM precision:
#   "winograd": F(2x2, 3x3) minimal filtering (winograd.py): 2.25x fewer GEMM FLOPs than im2col
#   "im2col":   the im2col + GEMM path below (the transposed-convolution backward)
# CuPy keeps im2col + cuBLAS, and --precision tf32 keeps im2col: its CPU emulation rounds the GEMM
# operands x and W as the GPU's im2col GEMM does (Winograd's GEMM operands are U and V instead).
# Set with set_conv3x3_algorithm; the backward follows what the forward did (recorded in the cache).
# Images under WINOGRAD_MIN_PIXELS pixels keep im2col: at 8x8 (4x4 tiles a row, +25% GEMM columns for
# winograd.py's spare tile column, short transform runs) Winograd measured 10-20% slower than im2col
# (32 x 128 -> 128 x 8 x 8, forward + backward, 1 thread, loaded 2-core AMD EPYC: 33 vs 30 ms), while at
# 16x16 and 32x32 it is 15-30% faster (128 ch 16x16: 79 vs 98 ms; 64 ch 32x32: 91 vs 126 ms).
CONV3X3 = "winograd"
CONV3X3_ALGORITHMS = ("winograd", "im2col")
WINOGRAD_MIN_PIXELS = 16 * 16


def set_conv3x3_algorithm(name: str) -> str:
    """Choose the NumPy 3x3 / stride 1 / padding 1 algorithm; returns the previous one."""
    global CONV3X3
    if name not in CONV3X3_ALGORITHMS:
        raise ValueError(f"unknown 3x3 convolution algorithm {name!r}: choose one of {CONV3X3_ALGORITHMS}")
    previous, CONV3X3 = CONV3X3, name
    return previous


def _uses_winograd(xp, x, W, stride, padding):
    """NumPy, 3x3, stride 1, padding (1, 1), fp32 GEMMs (or float64), images of WINOGRAD_MIN_PIXELS
    pixels or more, and the switch set to winograd."""
    return (CONV3X3 == "winograd" and not backend.is_cupy(xp) and W.shape[2:] == (3, 3) and stride == 1
            and as_pair(padding) == (1, 1) and x.shape[2] * x.shape[3] >= WINOGRAD_MIN_PIXELS
            and (precision.get_mode() == "fp32" or np.result_type(x, W) != np.float32))


def _recomputes_cols(xp, kh, kw, stride, padding):
    """CuPy, any conv but 1x1: the forward keeps x and the backward unfolds it again (im2col kernel).

    GPU memory is the limit there, and cols is kh*kw times the activation (9x for 3x3);
    re-running im2col costs one cheap memory-bound kernel per backward.
    """
    return backend.is_cupy(xp) and not _is_pointwise(kh, kw, stride, padding)


def conv2d_forward(x, W, b=None, stride: int = 1, padding=0):
    """x (N, C, H, W), W (O, C, kh, kw), b (O,) -> y (N, O, Ho, Wo), cache. padding: p or (ph, pw).

    The cache holds what the backward needs: cols (C*kh*kw, N*Ho*Wo) for the
    im2col/col2im backward, or, for the transposed-convolution backward, only
    the channel-major input xc (C, N*H*W): 1x the activation instead of kh*kw x.
    """
    xp = backend.array_module(x)
    N, C, H, Wd = x.shape
    O, Cw, kh, kw = W.shape
    if Cw != C:
        raise ValueError(f"conv2d: input has {C} channels but the weight expects {Cw} (weight shape {W.shape})")
    if _uses_winograd(xp, x, W, stride, padding):
        y, wcache = winograd.winograd3x3_forward(x, W, b)
        return y, ("winograd", wcache)                # conv2d_backward follows the forward's choice
    ph, pw = as_pair(padding)
    Ho, Wo = conv_output_size(H, kh, stride, ph), conv_output_size(Wd, kw, stride, pw)
    pointwise = _is_pointwise(kh, kw, stride, padding)
    if pointwise and not backend.is_cupy(xp):
        return _pointwise_forward_numpy(x, W, b)
    transposed = _uses_transposed_backward(xp, kh, kw, stride, padding)
    if transposed:
        xc = xp.empty((C, N, H, Wd), dtype=x.dtype)                  # channel-major x, filled per block below
        Wm = W.reshape(O, C * kh * kw)
        y = xp.empty((N, O, Ho, Wo), dtype=xp.result_type(x, W))

        def samples(lo, hi):
            """Samples lo..hi-1 (one block per parallel.run_split worker) in cache-sized chunks."""
            xc[:, lo:hi] = x[lo:hi].transpose(1, 0, 2, 3)            # this block's part of the copy
            for c0, c1 in _sample_chunks(hi - lo, C * kh * kw * Ho * Wo * x.itemsize):
                n0, n1 = lo + c0, lo + c1
                # the same GEMM as below on the columns of samples n0..n1-1 (cache-sized chunks, _CHUNK_BYTES)
                cols = im2col_cnhw_numpy(xc[:, n0:n1], kh, kw, stride, padding)
                Yt = gemm(Wm, cols).reshape(O, n1 - n0, Ho, Wo).transpose(1, 0, 2, 3)   # (n1-n0, O, Ho, Wo)
                if b is not None:
                    xp.add(Yt, b.reshape(1, O, 1, 1), out=y[n0:n1])                     # y = Y^T + b
                else:
                    y[n0:n1] = Yt
        parallel.run_split(samples, N)                   # serial with one BLAS thread
        return y, (xc.reshape(C, N * H * Wd), W, x.shape, stride, padding, b is not None)
    if pointwise:
        cols = xp.ascontiguousarray(x.transpose(1, 0, 2, 3)).reshape(C, N * H * Wd)   # channel-major x
    else:
        cols = im2col(x, kh, kw, stride, padding)                    # (C*kh*kw, N*Ho*Wo)
    Y = gemm(W.reshape(O, C * kh * kw), cols)         # (O, N*Ho*Wo): one GEMM
    Yt = Y.reshape(O, N, Ho, Wo).transpose(1, 0, 2, 3)   # (N, O, Ho, Wo), a strided view
    if b is not None:
        # y = Y^T + b: the bias rides on the copy back to NCHW (one pass over y, not two)
        y = xp.empty((N, O, Ho, Wo), dtype=Y.dtype)
        xp.add(Yt, b.reshape(1, O, 1, 1), out=y)
    else:
        y = xp.ascontiguousarray(Yt)
    saved = cols
    if _recomputes_cols(xp, kh, kw, stride, padding):
        saved = x                                     # CuPy: x (1x), not cols (kh*kw x); the backward redoes im2col
    cache = (saved, W, x.shape, stride, padding, b is not None)
    return y, cache


# 1x1 convolutions on the CPU: per sample, y[n] = W x[n] with x[n] the (C, H*W) block that NCHW
# already stores contiguously, so the products read and write NCHW directly: no transposed copies
# to and from a channel-major layout (the im2col path's), and the batch splits over the
# parallel.run_split workers like the 3x3 convolutions.

def _pointwise_forward_numpy(x, W, b):
    """x (N, C, H, W), W (O, C, 1, 1) -> y (N, O, H, W), ("pointwise", cache)."""
    N, C, H, Wd = x.shape
    O = W.shape[0]
    Wm = W.reshape(O, C)
    x3 = x.reshape(N, C, H * Wd)                                       # (N, C, HW), a view
    y = np.empty((N, O, H * Wd), dtype=np.result_type(x, W))

    def samples(lo, hi):
        # y[n] = Wm @ x[n] (+ b): one stacked product over the block's samples, (hi-lo, O, HW)
        prod = gemm(Wm, x3[lo:hi])
        if b is not None:
            np.add(prod, b.reshape(1, O, 1), out=y[lo:hi])
        else:
            y[lo:hi] = prod
    parallel.run_split(samples, N)
    return y.reshape(N, O, H, Wd), ("pointwise", (x3, W, b is not None))


def _pointwise_backward_numpy(dy, cache):
    """dy (N, O, H, W) -> dx (N, C, H, W), {"weight": dW (O, C, 1, 1)[, "bias": db (O,)]}."""
    x3, W, has_bias = cache
    N, O, H, Wd = dy.shape
    C = W.shape[1]
    dy3 = dy.reshape(N, O, H * Wd)
    Wt = np.ascontiguousarray(W.reshape(O, C).T)                       # (C, O)
    dx = np.empty((N, C, H * Wd), dtype=np.result_type(dy, W))

    def samples(lo, hi):
        # y[n] = Wm x[n] + b  =>  dx[n] = Wm^T dy[n],  dWm = sum_n dy[n] x[n]^T,  db = sum_{n,k} dy[n, :, k]
        dx[lo:hi] = gemm(Wt, dy3[lo:hi])
        dWm = gemm(dy3[lo:hi], x3[lo:hi].transpose(0, 2, 1)).sum(axis=0)     # (O, C)
        db = dy3[lo:hi].sum(axis=2).sum(axis=0) if has_bias else None
        return dWm, db
    dWm, db = parallel.sum_split(samples, N)             # the blocks' sums added in block order
    grads = {"weight": dWm.reshape(W.shape)}
    if has_bias:
        grads["bias"] = db
    return dx.reshape(N, C, H, Wd), grads


def conv2d_backward(dy, cache):
    """dy (N, O, Ho, Wo) -> dx (N, C, H, W), {"weight": dW (O, C, kh, kw)[, "bias": db (O,)]}."""
    if isinstance(cache[0], str) and cache[0] == "winograd":
        return winograd.winograd3x3_backward(dy, cache[1])
    if isinstance(cache[0], str) and cache[0] == "pointwise":
        return _pointwise_backward_numpy(dy, cache[1])
    saved, W, x_shape, stride, padding, has_bias = cache
    xp = backend.array_module(dy)
    N, O, Ho, Wo = dy.shape
    _, C, kh, kw = W.shape
    H, Wd = x_shape[2:]
    grads = {}
    transposed = _uses_transposed_backward(xp, kh, kw, stride, padding)
    if has_bias and not transposed:
        # y = Y^T + b     =>  db = sum of dy over samples and pixels
        grads["bias"] = dy.reshape(N, O, Ho * Wo).sum(axis=2).sum(axis=0)
    if transposed:
        # y[n,o,i,j] = sum_{c,p,q} W[o,c,p,q] x[n,c,i+p-ph,j+q-pw]  =>
        # dx[n,c,a,b] = sum_{o,p',q'} Wf[c,o,p',q'] dy[n,o,a+p'-ph',b+q'-pw'],
        # Wf[c,o,p',q'] = W[o,c,kh-1-p',kw-1-q'],  ph' = kh-1-ph, pw' = kw-1-pw:
        # a stride-1 conv of dy with the flipped, transposed kernel. Its im2col,
        #   dy_cols[(o,p',q'), (n,a,b)] = dy[n,o,a+p'-ph',b+q'-pw']      (O*kh*kw, N*H*W),
        # serves dx AND dW, so the forward kept only x (xc), not its kh*kw-times larger cols.
        xc = saved                                       # (C, N*H*W)
        ph, pw = as_pair(padding)
        Wf = xp.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(C, O * kh * kw)
        dx = xp.empty((N, C, H, Wd), dtype=xp.result_type(dy, W))
        HW = H * Wd

        def samples(lo, hi):
            """Samples lo..hi-1 (one block per parallel.run_split worker) -> this block's part of dWf."""
            dWf = None
            # y = Y^T + b  =>  db = sum of dy over samples and pixels (this block's samples)
            db = dy[lo:hi].reshape(hi - lo, O, Ho * Wo).sum(axis=2).sum(axis=0) if has_bias else None
            # cache-sized im2col buffers (_CHUNK_BYTES); the sums over (n, a, b) add up
            for c0, c1 in _sample_chunks(hi - lo, O * kh * kw * HW * dy.itemsize):
                n0, n1 = lo + c0, lo + c1
                # dy_cols straight from the channel-major view of dy (no transposed copy of dy first)
                dy_cols = im2col_cnhw_numpy(dy.transpose(1, 0, 2, 3)[:, n0:n1], kh, kw, 1, (kh - 1 - ph, kw - 1 - pw))
                dx[n0:n1] = gemm(Wf, dy_cols).reshape(C, n1 - n0, H, Wd).transpose(1, 0, 2, 3)   # dX (C, N*H*W)
                # dW[o,c,p,q] = sum_{n,i,j} dy[n,o,i,j] x[n,c,i+p-ph,j+q-pw] = sum_{n,a,b} dy_cols[(o,kh-1-p,kw-1-q),(n,a,b)] x[n,c,a,b]
                part = gemm(dy_cols, xc[:, n0 * HW:n1 * HW].T)  # (O*kh*kw, C), rows (o, p', q')
                if dWf is None:
                    dWf = part
                else:
                    dWf += part
            return dWf, db
        dWf, db = parallel.sum_split(samples, N)         # the blocks' parts added in block order
        if has_bias:
            grads["bias"] = db
        dW = dWf.reshape(O, kh, kw, C)[:, ::-1, ::-1, :].transpose(0, 3, 1, 2)
        grads["weight"] = xp.ascontiguousarray(dW)
        return dx, grads
    dY = xp.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(O, N * Ho * Wo)
    # CuPy: the forward kept x, not cols, so unfold it again here (kernels/im2col.cu)
    cols = im2col(saved, kh, kw, stride, padding) if _recomputes_cols(xp, kh, kw, stride, padding) else saved
    # Y = Wm @ cols   =>  dWm = dY @ cols^T   (one GEMM over all samples and pixels), computed as
    # (cols @ dY^T)^T: OpenBLAS runs that orientation 10-35% faster here (docs/performance.md)
    dW = gemm(cols, dY.T).T.reshape(W.shape)
    del cols                                         # (CuPy: the recomputed unfold is freed before dcols)
    if _is_pointwise(kh, kw, stride, padding):
        # Y = Wm @ x  =>  dx = Wm^T @ dY
        dX = gemm(W.reshape(O, C).T, dY)
    else:
        # Y = Wm @ cols   =>  dcols = Wm^T @ dY, then gather back to pixels (col2im)
        dcols = gemm(W.reshape(O, C * kh * kw).T, dY)   # (C*kh*kw, N*Ho*Wo)
        grads["weight"] = dW
        return col2im(dcols, x_shape, kh, kw, stride, padding), grads
    dx = xp.ascontiguousarray(dX.reshape(C, N, H, Wd).transpose(1, 0, 2, 3))
    grads["weight"] = xp.ascontiguousarray(dW)
    return dx, grads


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def conv2d_jvp(x, W, b, x_dot, stride: int = 1, padding=0):
    """The convolution is linear in x, so its tangent is the same convolution without the bias:
        y_dot = conv(x_dot, W)                    -> (y, y_dot, cache)."""
    y, cache = conv2d_forward(x, W, b, stride, padding)
    y_dot, cache_dot = conv2d_forward(x_dot, W, None, stride, padding)
    return y, y_dot, (cache, cache_dot)


def conv2d_jvp_backward(dy, dy_dot, cache):
    """Backward of (y, y_dot) = conv2d_jvp(...) -> (dx, dx_dot, grads).
    y = conv(x, W) + b  and  y_dot = conv(x_dot, W): both use W, so dW adds up."""
    cache, cache_dot = cache
    dx, grads = conv2d_backward(dy, cache)
    dx_dot, g_dot = conv2d_backward(dy_dot, cache_dot)
    grads["weight"] = grads["weight"] + g_dot["weight"]
    return dx, dx_dot, grads
