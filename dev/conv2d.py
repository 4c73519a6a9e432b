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
Measured on the small U-Net's 16x16 level (see docs/performance.md).
"""
import numpy as np

from harness import Registry, run_study
from ttfm_np import conv

registry = Registry()


def make_inputs(quick, rng):
    N, C, O, H = (2, 4, 5, 6) if quick else (32, 128, 128, 16)
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


def flops(inp):
    x, W, b, dy = inp
    N, C, H, Wd = x.shape
    return 3 * 2 * N * H * Wd * W.shape[0] * C * 9          # forward + 2x backward


if __name__ == "__main__":
    run_study("conv2d", registry, make_inputs, reference, tol=1e-4, flops=flops)
