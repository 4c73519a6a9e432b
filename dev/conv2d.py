"""Kernel study: conv2d forward + backward on the CPU (NumPy), 3x3, stride 1, pad 1.

Reference: the direct definition in float64 (a sum over the 9 kernel offsets).
v1: per-sample GEMMs, cols (N, C*9, H*W) from one 6-D strided-view copy
    (the project's first version).
v2: one GEMM with the batch folded in, cols (C*9, N*H*W) filled by 9 slab copies;
    backward dcols = W^T dY then col2im (9 accumulating passes).
v3: as v2, but dx as the transposed convolution (im2col of dy + one GEMM with
    the flipped kernel) instead of dcols + col2im, and im2col writing the
    zero padding into cols instead of padding a copy.
v4: as v3, and dW from the same im2col of dy against the channel-major input,
    so the forward keeps x (1x) instead of cols (9x the activation) for the
    backward: less memory and memory traffic (the library's path, ttfm_np/conv.py).
v5: implicit GEMM: the input padded once into a channel-major buffer whose rows hold every
    padded image end to end; each of the 9 taps is one GEMM on a column window of it,
    accumulated in place by BLAS (beta = 1), so no im2col matrix is written in the forward nor
    the backward (dW and dx: 9 window GEMMs each). Measured slower than v4 with OpenBLAS
    (docs/benchmarks.md): OpenBLAS packs each window anyway, so the saved im2col copy buys
    less than the 9 short-K GEMMs and the 27% extra (padded) pixels cost. Not the library's path.
v6: im2col over the padded width: pad x once, channel-major, and each tap's rows are one contiguous
    copy of H*(W+2) floats per (c, n) block (instead of H runs of W = 8-32 floats); the GEMMs run over
    N*H*(W+2) columns and the 2 wrapped columns per row are dropped on the copy back; the backward
    (transposed convolution, as v4) unfolds dy the same way and gets dW against x on the wide grid.
v7: v6 a few samples at a time (the library's _sample_chunks), as ttfm_np/conv.py does with v4.
    v6 and v7 measured slower than the library's chunked v4 path at every 3x3 shape of the small
    U-Net (forward + backward, 1 OpenBLAS thread, medians of 4 alternating rounds, 2-core AMD EPYC
    with AVX-512 under load): 32x64->64x32x32 lib 122 / v6 126 / v7 129 ms, 32x128->128x16x16
    98 / 107 / 106 ms, 32x128->128x8x8 26 / 30 / 31 ms, 32x32->64x32x32 70 / 74 / 74 ms. The
    longer runs make the unfold only 1-2 ms cheaper per call (16x16: 4.8 -> 3.8 + 0.7 ms for the
    pad), less than the (W+2)/W more GEMM work (12.5% at 16x16, 25% at 8x8) costs. Not adopted.
v8: Winograd F(2x2, 3x3) (ttfm_np/winograd.py, the library's NumPy path since): 16 GEMMs of
    (O x C) @ (C x tiles) on 4x4 input tiles (stride 2) transformed by slice arithmetic, instead of
    one (O x 9C) @ (9C x pixels): 2.25x fewer GEMM FLOPs; the backward recomputes the input transform.
    Other shapes (N,C,O,H) from the environment, e.g. the small U-Net's 32x32 level:
    `CONV2D_SHAPE=32,64,64,32 python dev/conv2d.py 8`.
Measured on the small U-Net's 16x16 level (see docs/performance.md).
"""
import os

import numpy as np

from harness import Registry, run_study
from ttfm_np import conv, winograd

registry = Registry()


def make_inputs(quick, rng):
    N, C, O, H = (2, 4, 5, 6) if quick else (32, 128, 128, 16)
    if not quick and os.environ.get("CONV2D_SHAPE"):
        N, C, O, H = (int(v) for v in os.environ["CONV2D_SHAPE"].split(","))
    x = rng.standard_normal((N, C, H, H)).astype(np.float32)
    W = (rng.standard_normal((O, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    dy = rng.standard_normal((N, O, H, H)).astype(np.float32)
    return x, W, b, dy


def reference(inp):
    x, W, b, dy = (a.astype(np.float64) for a in inp)
    N, C, H, Wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros((N, W.shape[0], H, Wd)) + b[None, :, None, None]
    dW = np.zeros_like(W)
    dxp = np.zeros_like(xp)
    for p in range(3):
        for q in range(3):
            patch = xp[:, :, p:p + H, q:q + Wd]
            y += np.einsum("nchw,oc->nohw", patch, W[:, :, p, q])
            dW[:, :, p, q] = np.einsum("nohw,nchw->oc", dy, patch)
            dxp[:, :, p:p + H, q:q + Wd] += np.einsum("nohw,oc->nchw", dy, W[:, :, p, q])
    return y, dxp[:, :, 1:-1, 1:-1], dW, dy.sum(axis=(0, 2, 3))


@registry.version(1, "per-sample GEMMs, 6-D strided im2col copy")
def v1(inp):
    x, W, b, dy = inp
    N, C, H, Wd = x.shape
    O = W.shape[0]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    s = xp.strides
    win = np.lib.stride_tricks.as_strided(xp, (N, C, 3, 3, H, Wd), (s[0], s[1], s[2], s[3], s[2], s[3]))
    cols = win.reshape(N, C * 9, H * Wd)
    Wm = W.reshape(O, C * 9)
    y = np.matmul(Wm, cols).reshape(N, O, H, Wd) + b[None, :, None, None]
    dy3 = dy.reshape(N, O, H * Wd)
    dW = np.tensordot(dy3, cols, axes=((0, 2), (0, 2))).reshape(W.shape)
    dcols = np.matmul(Wm.T, dy3).reshape(N, C, 3, 3, H, Wd)
    dxp = np.zeros_like(xp)
    for p in range(3):
        for q in range(3):
            dxp[:, :, p:p + H, q:q + Wd] += dcols[:, :, p, q]
    return y, dxp[:, :, 1:-1, 1:-1], dW, dy3.sum(axis=(0, 2))


@registry.version(2, "one GEMM, batch folded in, slab-copy im2col, col2im")
def v2(inp):
    x, W, b, dy = inp
    N, C, H, Wd = x.shape
    O = W.shape[0]
    cols = conv.im2col_numpy(x, 3, 3, 1, 1)                          # (C*9, N*H*W)
    Y = W.reshape(O, C * 9) @ cols + b[:, None]
    y = np.ascontiguousarray(Y.reshape(O, N, H, Wd).transpose(1, 0, 2, 3))
    dY = np.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(O, N * H * Wd)
    dW = (dY @ cols.T).reshape(W.shape)
    dx = conv.col2im_numpy(W.reshape(O, C * 9).T @ dY, x.shape, 3, 3, 1, 1)
    return y, dx, dW, dY.sum(axis=1)


@registry.version(3, "v2 with the transposed-conv backward for dx")
def v3(inp):
    x, W, b, dy = inp
    N, C, H, Wd = x.shape
    O = W.shape[0]
    cols = conv.im2col_numpy(x, 3, 3, 1, 1)
    Y = W.reshape(O, C * 9) @ cols + b[:, None]
    y = np.ascontiguousarray(Y.reshape(O, N, H, Wd).transpose(1, 0, 2, 3))
    dY = np.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(O, N * H * Wd)
    dW = (cols @ dY.T).T.reshape(W.shape)
    dy_cols = conv.im2col_cnhw_numpy(dY.reshape(O, N, H, Wd), 3, 3, 1, 1)     # pad 3 - 1 - 1 = 1
    Wf = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(C, O * 9)
    dx = np.ascontiguousarray((Wf @ dy_cols).reshape(C, N, H, Wd).transpose(1, 0, 2, 3))
    return y, dx, dW, dY.sum(axis=1)


@registry.version(4, "v3, dW from the im2col of dy: x cached, not cols")
def v4(inp):
    x, W, b, dy = inp
    N, C, H, Wd = x.shape
    O = W.shape[0]
    xc = np.ascontiguousarray(x.transpose(1, 0, 2, 3)).reshape(C, N * H * Wd)      # kept for the backward
    cols = conv.im2col_cnhw_numpy(xc.reshape(C, N, H, Wd), 3, 3, 1, 1)              # (C*9, N*H*W)
    y = np.ascontiguousarray((W.reshape(O, C * 9) @ cols + b[:, None]).reshape(O, N, H, Wd).transpose(1, 0, 2, 3))
    del cols
    dY = np.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(O, N * H * Wd)
    dy_cols = conv.im2col_cnhw_numpy(dY.reshape(O, N, H, Wd), 3, 3, 1, 1)           # (O*9, N*H*W)
    Wf = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(C, O * 9)
    dx = np.ascontiguousarray((Wf @ dy_cols).reshape(C, N, H, Wd).transpose(1, 0, 2, 3))
    dW = np.ascontiguousarray((dy_cols @ xc.T).reshape(O, 3, 3, C)[:, ::-1, ::-1, :].transpose(0, 3, 1, 2))
    return y, dx, dW, dY.sum(axis=1)


# ---------------------------------------------------------------------------- v5: implicit GEMM
#
# Pad x once into a channel-major buffer and lay each channel's padded images end to end in one row:
#     xf[c, m] = xpad[n, c, a, b],   m = (n Hp + a) Wp + b,   xf (C, L),  L = N Hp Wp
# Output pixel (n, i, j) is computed at the same place m = (n Hp + i) Wp + j of the padded grid; its tap
# (p, q) reads xpad[n, :, i + p, j + q] = xf[:, m + d_pq], d_pq = p Wp + q. So for all m < M = L - d_max,
#     Yf[:, m] = sum_{p,q} W[:, :, p, q] @ xf[:, m + d_pq]:
# one GEMM per tap on the column window xf[:, d_pq : d_pq + M], which BLAS reads where it is (row stride
# L), accumulated into Yf by the GEMM itself (beta = 1). Columns with i >= Ho or j >= Wo straddle two rows
# or samples and are dropped; every valid one lies below M. The GEMMs run over the padded grid:
# (Hp Wp) / (H W) times the pixels, 1.27x at 16x16, 1.13x at 32x32.
# NumPy has no C += A @ B, so the GEMMs call cblas_sgemm/dgemm of NumPy's bundled OpenBLAS directly.

_CBLAS = {}


def gemm_into(a, b, c, beta, trans_a=False, trans_b=False):
    """c = op(a) @ op(b) + beta c in place; a, b, c 2-D views with contiguous rows and any row stride."""
    import ctypes
    from ttfm_np import blas
    key = c.dtype.char
    if key not in _CBLAS:
        fn = blas._openblas_function({"f": "scipy_cblas_sgemm64_", "d": "scipy_cblas_dgemm64_"}[key])
        if fn is None:
            raise RuntimeError("v5 needs NumPy's bundled OpenBLAS (scipy_cblas_?gemm64_)")
        real, i64, ptr = (ctypes.c_float if key == "f" else ctypes.c_double), ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ctypes.c_int] * 3 + [i64] * 3 + [real, ptr, i64, ptr, i64, real, ptr, i64]
        _CBLAS[key] = fn
    for arr in (a, b, c):
        assert arr.dtype == c.dtype and arr.ndim == 2 and arr.strides[1] == arr.itemsize
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    N = b.shape[0] if trans_b else b.shape[1]
    assert c.shape == (M, N) and (b.shape[1] if trans_b else b.shape[0]) == K
    ld = [arr.strides[0] // arr.itemsize for arr in (a, b, c)]
    _CBLAS[key](101, 112 if trans_a else 111, 112 if trans_b else 111, M, N, K, 1.0,   # row-major, (no) transpose
                a.ctypes.data, ld[0], b.ctypes.data, ld[1], beta, c.ctypes.data, ld[2])


def implicit_forward(x, W, b, ph=1, pw=1):
    """-> y (N, O, Ho, Wo), cache (xf, W, x.shape, ph, pw): stride 1, any kernel and padding."""
    N, C, H, Wd = x.shape
    O, _, kh, kw = W.shape
    Hp, Wp = H + 2 * ph, Wd + 2 * pw
    Ho, Wo, L = Hp - kh + 1, Wp - kw + 1, N * Hp * Wp
    M = L - ((kh - 1) * Wp + kw - 1)
    xpad = np.zeros((C, N, Hp, Wp), dtype=x.dtype)
    xpad[:, :, ph:ph + H, pw:pw + Wd] = x.transpose(1, 0, 2, 3)
    xf = xpad.reshape(C, L)
    Wt = np.ascontiguousarray(W.transpose(2, 3, 0, 1))           # (kh, kw, O, C): tap (p, q) is Wt[p, q]
    Yf = np.empty((O, L), dtype=x.dtype)                         # columns >= M are never written nor read
    for p in range(kh):
        for q in range(kw):
            d = p * Wp + q
            # Yf[:, :M] += W[:, :, p, q] @ xf[:, d:d + M]    (the first tap writes: beta = 0)
            gemm_into(Wt[p, q], xf[:, d:d + M], Yf[:, :M], 0.0 if p == q == 0 else 1.0)
    y = np.ascontiguousarray(Yf.reshape(O, N, Hp, Wp)[:, :, :Ho, :Wo].transpose(1, 0, 2, 3))
    y += b[:, None, None]
    return y, (xf, W, x.shape, ph, pw)


def implicit_backward(dy, cache):
    """-> dx, dW, db: the same window GEMMs (9 for dW, 9 accumulating for dx)."""
    xf, W, x_shape, ph, pw = cache
    N, O, Ho, Wo = dy.shape
    _, C, kh, kw = W.shape
    H, Wd = x_shape[2:]
    Hp, Wp = Ho + kh - 1, Wo + kw - 1
    L = N * Hp * Wp
    M = L - ((kh - 1) * Wp + kw - 1)
    dYf = np.zeros((O, N, Hp, Wp), dtype=dy.dtype)               # dy on the padded grid, 0 where dropped
    dYf[:, :, :Ho, :Wo] = dy.transpose(1, 0, 2, 3)
    dYf = dYf.reshape(O, L)[:, :M]
    Wt = np.ascontiguousarray(W.transpose(2, 3, 0, 1))
    dWt = np.empty((kh, kw, O, C), dtype=dy.dtype)
    dxf = np.empty((C, L), dtype=dy.dtype)
    dxf[:, M:] = 0                                               # the first tap writes [0, M), the rest add
    for p in range(kh):
        for q in range(kw):
            d = p * Wp + q
            # Yf[:, :M] += W_pq @ xf[:, d:d + M]  =>  dW_pq = dYf @ xf[:, d:d + M]^T,  dxf[:, d:d + M] += W_pq^T dYf
            gemm_into(dYf, xf[:, d:d + M], dWt[p, q], 0.0, trans_b=True)
            gemm_into(Wt[p, q], dYf, dxf[:, d:d + M], 0.0 if p == q == 0 else 1.0, trans_a=True)
    dx = np.ascontiguousarray(dxf.reshape(C, N, Hp, Wp)[:, :, ph:ph + H, pw:pw + Wd].transpose(1, 0, 2, 3))
    return dx, np.ascontiguousarray(dWt.transpose(2, 3, 0, 1)), dYf.sum(axis=1)


@registry.version(5, "implicit GEMM: 9 in-place GEMMs on windows of the padded input, no im2col")
def v5(inp):
    x, W, b, dy = inp
    y, cache = implicit_forward(x, W, b)
    return (y,) + implicit_backward(dy, cache)


# ---------------------------------------------------------------------------- v6: im2col over the padded width
#
# Pad x once, channel-major, with one spare zero row at the bottom: xpad (C, N, Hp + 1, Wp), Hp = H + 2,
# Wp = W + 2 (stride 1, pad 1). Within one (c, n) block, output pixel (i, j) sits at i Wp + j of a grid
# Wp wide, and its tap (p, q) reads xpad[c, n, i + p, j + q] = block[i Wp + j + d_pq], d_pq = p Wp + q.
# So the tap's im2col rows are ONE contiguous slice per (c, n) block, H Wp floats long (288 at 16x16)
# instead of H rows of W floats (16), and
#     cols[(c, p, q), (n, i, j)] = xpad_flat[c, n, d_pq + i Wp + j],   j < Wp,   cols (C*9, N*H*Wp)
# The columns j = W, W + 1 wrap into the next row and are dropped on the copy back to NCHW; the GEMMs
# run over Wp / W more columns (1.125x at 16x16, 1.06x at 32x32). The spare row keeps the last
# slice of tap (2, 2) inside its block.
# Backward (the transposed convolution, as v4): the same unfold of dy padded by 1 gives dx
# (garbage columns dropped) and dW = dy_cols @ x_wide^T, where x_wide (C, N*H*Wp) is x on the same wide
# grid with zeros in the garbage columns: exactly tap (1, 1)'s slice of xpad, whose wrapped columns land
# on the zero padding. The forward keeps x_wide (1.125x the activation), not cols.

def wide_im2col(xpad, H):
    """xpad (C, N, H + 3, Wp) -> cols (C*9, N*H*Wp): 9 copies with H*Wp-long contiguous runs."""
    C, N, _, Wp = xpad.shape
    xf = xpad.reshape(C, N, -1)
    L = H * Wp
    cols = np.empty((C, 9, N, L), dtype=xpad.dtype)
    for p in range(3):
        for q in range(3):
            d = p * Wp + q
            cols[:, 3 * p + q] = xf[:, :, d:d + L]               # cols[c, pq, n, m] = xf[c, n, d_pq + m]
    return cols.reshape(C * 9, N * L)


def wide_pad(xt, H, Wd):
    """xt (C, N, H, W), any strides -> xpad (C, N, H + 3, W + 2): zero border, one spare zero row."""
    C, N = xt.shape[:2]
    xpad = np.empty((C, N, H + 3, Wd + 2), dtype=xt.dtype)
    xpad[:, :, 0] = 0
    xpad[:, :, H + 1:] = 0
    xpad[:, :, 1:H + 1, 0] = 0
    xpad[:, :, 1:H + 1, Wd + 1] = 0
    xpad[:, :, 1:H + 1, 1:Wd + 1] = xt
    return xpad


@registry.version(6, "im2col over the padded width: 9 copies of H*(W+2)-long runs, garbage columns dropped")
def v6(inp):
    x, W, b, dy = inp
    N, C, H, Wd = x.shape
    O = W.shape[0]
    Wp = Wd + 2
    xpad = wide_pad(x.transpose(1, 0, 2, 3), H, Wd)
    cols = wide_im2col(xpad, H)                                      # (C*9, N*H*Wp)
    x_wide = np.ascontiguousarray(cols.reshape(C, 9, N * H * Wp)[:, 4])   # kept for the backward
    Y = (W.reshape(O, C * 9) @ cols).reshape(O, N, H, Wp)
    del cols
    y = np.empty((N, O, H, Wd), dtype=x.dtype)
    np.add(Y[:, :, :, :Wd].transpose(1, 0, 2, 3), b[None, :, None, None], out=y)
    dypad = wide_pad(dy.transpose(1, 0, 2, 3), H, Wd)
    dy_cols = wide_im2col(dypad, H)                                  # (O*9, N*H*Wp)
    Wf = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(C, O * 9)
    dX = (Wf @ dy_cols).reshape(C, N, H, Wp)
    dx = np.ascontiguousarray(dX[:, :, :, :Wd].transpose(1, 0, 2, 3))
    dW = np.ascontiguousarray((dy_cols @ x_wide.T).reshape(O, 3, 3, C)[:, ::-1, ::-1, :].transpose(0, 3, 1, 2))
    return y, dx, dW, dy.sum(axis=(0, 2, 3))


@registry.version(7, "v6 a few samples at a time (cache-sized cols, as the library's v4 path)")
def v7(inp):
    x, W, b, dy = inp
    N, C, H, Wd = x.shape
    O = W.shape[0]
    Wp = Wd + 2
    L = H * Wp
    Wm = W.reshape(O, C * 9)
    xpad = wide_pad(x.transpose(1, 0, 2, 3), H, Wd)                 # (C, N, H + 3, Wp)
    x_wide = np.empty((C, N * L), dtype=x.dtype)                     # kept for the backward
    y = np.empty((N, O, H, Wd), dtype=x.dtype)
    for n0, n1 in conv._sample_chunks(N, C * 9 * L * x.itemsize):
        cols = wide_im2col(xpad[:, n0:n1], H)                        # (C*9, (n1-n0)*L)
        x_wide[:, n0 * L:n1 * L] = cols.reshape(C, 9, -1)[:, 4]
        Y = (Wm @ cols).reshape(O, n1 - n0, H, Wp)
        np.add(Y[:, :, :, :Wd].transpose(1, 0, 2, 3), b[None, :, None, None], out=y[n0:n1])
    Wf = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(C, O * 9)
    dx = np.empty_like(x)
    dWf = np.zeros((O * 9, C), dtype=x.dtype)
    for n0, n1 in conv._sample_chunks(N, O * 9 * L * x.itemsize):
        dy_cols = wide_im2col(wide_pad(dy.transpose(1, 0, 2, 3)[:, n0:n1], H, Wd), H)   # (O*9, (n1-n0)*L)
        dx[n0:n1] = (Wf @ dy_cols).reshape(C, n1 - n0, H, Wp)[:, :, :, :Wd].transpose(1, 0, 2, 3)
        dWf += dy_cols @ x_wide[:, n0 * L:n1 * L].T
    dW = np.ascontiguousarray(dWf.reshape(O, 3, 3, C)[:, ::-1, ::-1, :].transpose(0, 3, 1, 2))
    return y, dx, dW, dy.sum(axis=(0, 2, 3))


@registry.version(8, "Winograd F(2x2, 3x3): 16 GEMMs on 4x4 tiles, 2.25x fewer FLOPs (ttfm_np/winograd.py)")
def v8(inp):
    x, W, b, dy = inp
    y, cache = winograd.winograd3x3_forward(x, W, b)
    dx, grads = winograd.winograd3x3_backward(dy, cache)
    return y, dx, grads["weight"], grads["bias"]


def flops(inp):
    x, W, b, dy = inp
    N, C, H, Wd = x.shape
    return 3 * 2 * N * H * Wd * W.shape[0] * C * 9          # forward + 2x backward


if __name__ == "__main__":
    run_study("conv2d", registry, make_inputs, reference, tol=1e-4, flops=flops)
