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


@registry.version(4, "v3, dW from the im2col of dy: x cached, not cols (library)")
def v4(inp):
    x, W, b, dy = inp
    y, cache = conv.conv2d_forward(x, W, b, 1, 1)
    dx, g = conv.conv2d_backward(dy, cache)
    return y, dx, g["weight"], g["bias"]


def flops(inp):
    x, W, b, dy = inp
    N, C, H, Wd = x.shape
    return 3 * 2 * N * H * Wd * W.shape[0] * C * 9          # forward + 2x backward


if __name__ == "__main__":
    run_study("conv2d", registry, make_inputs, reference, tol=1e-4, flops=flops)
