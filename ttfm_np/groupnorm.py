"""Group normalisation (Wu & He 2018), optionally fused with SiLU.

Shapes: x (N, C, H, W) (any trailing spatial dims), gamma/beta (C,), G groups
of C/G channels. Per sample n and group g:

    mu   = mean(x[n, g])                 over the group's C/G * H * W entries
    var  = mean((x[n, g] - mu)^2)
    xhat = (x - mu) / sqrt(var + eps)
    z    = gamma[c] * xhat + beta[c]
    y    = silu(z) if silu else z

The U-Net always applies SiLU right after GroupNorm, so the fused form saves
one full read and write of the activation on the GPU (kernels/groupnorm.cu,
kernels `groupnorm_fwd` / `groupnorm_bwd`). The NumPy path below is the
reference those kernels are tested against.
"""
from __future__ import annotations

import numpy as np

from . import backend, parallel
from .activations import sigmoid


def _check(x, gamma, groups):
    C = x.shape[1]
    if C % groups:
        raise ValueError(f"GroupNorm: {C} channels cannot be split into {groups} groups; "
                         "choose a group count that divides the channel count")
    if gamma.shape != (C,):
        raise ValueError(f"GroupNorm: gamma has shape {gamma.shape}, expected ({C},)")


# ----------------------------------------------------------------------------
# NumPy (reference) path
# ----------------------------------------------------------------------------

def _per_channel(a_ng, channels_per_group: int):
    """(N, G) group statistic -> (N, C), repeated over each group's channels."""
    return np.repeat(a_ng, channels_per_group, axis=1)


def _row_dots(a, b):
    """a, b (N, C, K) -> (N, C): sum_k a[n, c, k] b[n, c, k], as a stack of (1, K) @ (K, 1) products
    (BLAS dots: 2.5x faster than einsum("nck,nck->nc") on a 64 x 1024 activation; np.vecdot needs NumPy 2)."""
    return np.matmul(a[:, :, None, :], b[:, :, :, None])[:, :, 0, 0]


def groupnorm_forward_numpy(x, gamma, beta, groups: int, eps: float = 1e-5, silu: bool = False):
    """Per-(n, c) coefficients, so every pass over the activation is one fused
    multiply-add in place (dev/groupnorm.py v3; v2 is the formulas as read)."""
    y, mean, rstd, _ = _forward_numpy_keep_sigmoid(x, gamma, beta, groups, eps, silu)
    return y, (mean, rstd)


def _forward_numpy_keep_sigmoid(x, gamma, beta, groups, eps, silu, y_out=None, s_out=None):
    """-> y, mean (N, G), rstd (N, G), s = sigmoid(z) (N, C, HW) with SiLU (else None), kept for the backward.
    y_out, s_out: arrays like x to write y and s into (a block of samples of a larger output), or None."""
    N, C = x.shape[:2]
    cg = C // groups
    x3 = x.reshape(N, C, -1)                                       # (N, C, HW)
    K = cg * x3.shape[2]                                           # entries per group
    mean = x3.sum(axis=2).reshape(N, groups, cg).sum(axis=2) / K   # (N, G)
    z = np.subtract(x3, _per_channel(mean, cg)[:, :, None],        # x - mu, (N, C, HW)
                    out=None if y_out is None else y_out.reshape(x3.shape))
    # var = mean((x - mu)^2): centred (not E[x^2] - mu^2), the square summed without a temporary
    var = _row_dots(z, z).reshape(N, groups, cg).sum(axis=2) / K
    rstd = (1.0 / np.sqrt(var + eps)).astype(x.dtype)              # (N, G)
    # z = gamma * (x - mu) * rstd + beta  =  (x - mu) * [rstd gamma] + beta
    z *= (_per_channel(rstd, cg) * gamma)[:, :, None]
    z += beta[:, None]
    s = None
    if silu:                                                       # y = z * sigmoid(z)
        s = sigmoid(z, out=None if s_out is None else s_out.reshape(z.shape))   # form per SIMD level
        y = z
        y *= s                           # in z's buffer: z is not needed again
        s = s.reshape(x.shape)
    else:
        y = z
    return y.reshape(x.shape), mean.astype(x.dtype), rstd, s


def groupnorm_backward_numpy(dy, x, gamma, beta, mean, rstd, groups: int, silu: bool, y=None, s=None,
                             dx_out=None):
    """y, s: the forward's output and sigmoid(z) (from its cache); without them (the reference for the
    CUDA kernel's tests) z and the sigmoid are recomputed from x. dx_out: an array like x to write dx
    into (a block of samples of a larger output), or None."""
    N, C = x.shape[:2]
    cg = C // groups
    x3, dy3 = x.reshape(N, C, -1), dy.reshape(N, C, -1)            # (N, C, HW)
    K = cg * x3.shape[2]
    rstd_c = _per_channel(rstd, cg)                                # (N, C)
    # xc = x - mu, centred (xhat = xc * rstd is never formed: every use below takes rstd as a per-(n, c)
    # factor instead, one broadcast pass fewer)
    xc = np.subtract(x3, _per_channel(mean, cg)[:, :, None], dtype=np.result_type(x3, dy3))
    dz_in_dx_out = False                                           # dz already lives in dx_out's buffer
    if silu and s is not None:
        # y = z * s(z)  =>  dz = dy * (s + z s (1 - s)) = dy * (s + y (1 - s)): no sigmoid, no z
        dz = np.subtract(1.0, s.reshape(dy3.shape), dtype=s.dtype,     # 1 - s
                         out=None if dx_out is None else dx_out.reshape(dy3.shape))
        dz_in_dx_out = dx_out is not None
        dz *= y.reshape(dy3.shape)
        dz += s.reshape(dy3.shape)
        dz *= dy3
    elif silu:
        # y = z * s(z), z = gamma xhat + beta = xc [rstd gamma] + beta  =>  dz = dy * s (1 + z (1 - s))
        z = xc * (rstd_c * gamma)[:, :, None]
        z += beta[:, None]
        s = sigmoid(z)
        dz = np.subtract(1.0, s, dtype=s.dtype)                    # 1 - s
        dz *= z
        dz += 1.0
        dz *= s
        dz *= dy3
        del z, s
    else:
        dz = dy3
    # z = gamma * xhat + beta  =>  dgamma = sum dz * xhat = rstd sum dz * xc, dbeta = sum dz   (per (n, c) first)
    S1 = dz.sum(axis=2)                                            # (N, C)
    S2 = _row_dots(dz, xc) * rstd_c                                # (N, C)
    dgamma, dbeta = S2.sum(axis=0), S1.sum(axis=0)
    # xhat = (x - mu) * rstd, mu and rstd functions of the whole group; with dxhat = gamma dz:
    #   dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))
    #      = A dz + B xhat + D,   A = rstd gamma,  B = -rstd m2,  D = -rstd m1   (per (n, c))
    m1 = (S1 * gamma).reshape(N, groups, cg).sum(axis=2) / K       # mean_g(dxhat), (N, G)
    m2 = (S2 * gamma).reshape(N, groups, cg).sum(axis=2) / K       # mean_g(dxhat * xhat)
    A = (rstd_c * gamma)[:, :, None]
    if dz is dy3 or (dx_out is not None and not dz_in_dx_out):
        # never write into the caller's dy; dx_out given and dz elsewhere (no SiLU, or recomputed s)
        dx = np.multiply(dz, A, out=None if dx_out is None else dx_out.reshape(dy3.shape))
    else:
        dx = dz
        dx *= A
    xc *= (-rstd_c * rstd_c * _per_channel(m2, cg))[:, :, None]  # B xhat = (-rstd m2) (rstd xc)
    dx += xc
    dx += (-rstd_c * _per_channel(m1, cg))[:, :, None]
    return dx.reshape(x.shape), dgamma, dbeta


# ----------------------------------------------------------------------------
# CuPy path (fused CUDA kernels)
# ----------------------------------------------------------------------------

_BLOCK = 256  # threads per block of both kernels: the launch's block AND -DBLOCK of kernels/groupnorm.cu
_DEFINES = (("BLOCK", _BLOCK),)   # (the kernel sizes its shared memory and reduction by it)


def _kernel_inputs(cp, x, **arrays):
    """What a raw kernel may be given: contiguous arrays of x's dtype (it reads bytes, not arrays).

    A strided view would be read as if it were dense, and a float64 gamma in a float32 kernel
    would be reinterpreted bit by bit, so both are converted here (a no-op when already right).
    """
    out = {}
    for name, a in arrays.items():
        if backend.array_module(a) is not cp:
            raise TypeError(f"GroupNorm: {name} is a {type(a).__module__} array but x is on the GPU; "
                            "move it with backend.to_device first")
        out[name] = cp.ascontiguousarray(a, dtype=x.dtype)
    return out


def groupnorm_forward_cupy(x, gamma, beta, groups: int, eps: float = 1e-5, silu: bool = False):
    from . import cuda
    cp = backend.array_module(x)
    N, C = x.shape[:2]
    HW = int(np.prod(x.shape[2:]))
    x = cp.ascontiguousarray(x)                                    # (N, C, HW...) dense
    k = _kernel_inputs(cp, x, gamma=gamma, beta=beta)             # (C,) each, x.dtype
    y = cp.empty_like(x)
    mean = cp.empty((N, groups), dtype=x.dtype)
    rstd = cp.empty((N, groups), dtype=x.dtype)
    kernel = cuda.get_kernel("groupnorm", "groupnorm_fwd", x.dtype, defines=_DEFINES)
    kernel((N * groups,), (_BLOCK,),
           (x, k["gamma"], k["beta"], y, mean, rstd,
            np.int32(C), np.int32(HW), np.int32(groups), x.dtype.type(eps), np.int32(silu)))
    return y, (mean, rstd)


def groupnorm_backward_cupy(dy, x, gamma, beta, mean, rstd, groups: int, silu: bool):
    from . import cuda
    cp = backend.array_module(x)
    N, C = x.shape[:2]
    HW = int(np.prod(x.shape[2:]))
    if dy.shape != x.shape or mean.shape != (N, groups) or rstd.shape != (N, groups):
        raise ValueError(f"GroupNorm backward: dy {dy.shape}, mean {mean.shape}, rstd {rstd.shape} do not fit "
                         f"x {x.shape} with {groups} groups")
    x = cp.ascontiguousarray(x)              # the cache holds the caller's x, which may be a strided view
    k = _kernel_inputs(cp, x, dy=dy, gamma=gamma, beta=beta, mean=mean, rstd=rstd)
    dx = cp.empty_like(x)
    dgamma_part = cp.empty((N, C), dtype=x.dtype)
    dbeta_part = cp.empty((N, C), dtype=x.dtype)
    kernel = cuda.get_kernel("groupnorm", "groupnorm_bwd", x.dtype, defines=_DEFINES)
    kernel((N * groups,), (_BLOCK,),
           (k["dy"], x, k["gamma"], k["beta"], k["mean"], k["rstd"],
            dx, dgamma_part, dbeta_part, np.int32(C), np.int32(HW), np.int32(groups), np.int32(silu)))
    return dx, dgamma_part.sum(axis=0), dbeta_part.sum(axis=0)


# ----------------------------------------------------------------------------
# Public forward / backward
# ----------------------------------------------------------------------------

def groupnorm_forward(x, gamma, beta, groups: int, eps: float = 1e-5, silu: bool = False):
    """y = [silu](GroupNorm(x)); returns (y, cache)."""
    _check(x, gamma, groups)
    if backend.is_cupy(backend.array_module(x)):
        y, (mean, rstd) = groupnorm_forward_cupy(x, gamma, beta, groups, eps, silu)
        s = None                                      # the CUDA backward recomputes z and its sigmoid
    else:
        y, mean, rstd, s = _forward_numpy_split(x, gamma, beta, groups, eps, silu)
    # with SiLU on NumPy the cache also holds y and s = sigmoid(z): the backward's dz = dy (s + y (1 - s))
    return y, (x, gamma, beta, mean, rstd, groups, silu, y if s is not None else None, s)


def groupnorm_backward(dy, cache):
    """-> dx (like x), {"gamma": dgamma (C,), "beta": dbeta (C,)}."""
    x, gamma, beta, mean, rstd, groups, silu, y, s = cache
    if backend.is_cupy(backend.array_module(x)):
        dx, dgamma, dbeta = groupnorm_backward_cupy(dy, x, gamma, beta, mean, rstd, groups, silu)
    else:
        dx, dgamma, dbeta = _backward_numpy_split(dy, x, gamma, beta, mean, rstd, groups, silu, y, s)
    return dx, {"gamma": dgamma, "beta": dbeta}


# Every sample is normalised on its own, so the NumPy path splits the batch over threads
# (parallel.run_split: one block of samples per worker, each writing its rows of the outputs;
# serial with one BLAS thread). Blocks below this many entries are not worth a thread.
_MIN_SPLIT_ENTRIES = 1 << 16


def _min_rows(x):
    return max(1, _MIN_SPLIT_ENTRIES // max(1, x[0].size))


def _forward_numpy_split(x, gamma, beta, groups, eps, silu):
    N = x.shape[0]
    y = np.empty_like(x)
    s = np.empty_like(x) if silu else None
    parts = parallel.run_split(lambda lo, hi: _forward_numpy_keep_sigmoid(
        x[lo:hi], gamma, beta, groups, eps, silu, y[lo:hi], None if s is None else s[lo:hi]), N, _min_rows(x))
    mean = np.concatenate([p[1] for p in parts])                   # (N, G) each
    rstd = np.concatenate([p[2] for p in parts])
    return y, mean, rstd, s


def _backward_numpy_split(dy, x, gamma, beta, mean, rstd, groups, silu, y, s):
    dx = np.empty(x.shape, dtype=np.result_type(dy, x))
    # dgamma, dbeta: sums over samples, the blocks' partial sums added in block order (fixed for a worker count)
    def block(lo, hi):
        _, dg, db = groupnorm_backward_numpy(dy[lo:hi], x[lo:hi], gamma, beta, mean[lo:hi], rstd[lo:hi], groups,
                                             silu, None if y is None else y[lo:hi], None if s is None else s[lo:hi],
                                             dx[lo:hi])               # dx: written into its rows of dx
        return dg, db
    dgamma, dbeta = parallel.sum_split(block, x.shape[0], _min_rows(x))
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------
# Per sample n and group g (K entries), with r = rstd = (var + eps)^(-1/2), c = x - mu:
#     c_dot    = x_dot - mean(x_dot)
#     var_dot  = 2 mean(c c_dot),   r_dot = -r^3 mean(c c_dot) = -r^2 m,   m = mean(xhat c_dot)
#     xhat_dot = c_dot r + c r_dot = r (c_dot - xhat m)
#     z_dot    = gamma xhat_dot,    y_dot = silu'(z) z_dot  (with SiLU)  or  z_dot
# Written with array operations only (the primal comes from groupnorm_forward, kernel or NumPy),
# so the same code runs on NumPy and CuPy.

def _group_view(a, groups):
    """(N, C, ...) -> (N, G, C/G, HW): a view of the groups (reshape copies only a strided input)."""
    N, C = a.shape[:2]
    return a.reshape(N, groups, C // groups, -1)


def _tangent_terms(x, x_dot, gamma, beta, mean, rstd, groups):
    """xhat, c_dot, m, xhat_dot, z, each (N, G, C/G, HW) (m: (N, G, 1, 1)); r (N, G, 1, 1)."""
    xg, xdg = _group_view(x, groups), _group_view(x_dot, groups)
    r = rstd.reshape(rstd.shape + (1, 1))
    xhat = (xg - mean.reshape(mean.shape + (1, 1))) * r
    c_dot = xdg - xdg.mean(axis=(2, 3), keepdims=True)              # c_dot = x_dot - mean(x_dot)
    m = (xhat * c_dot).mean(axis=(2, 3), keepdims=True)            # m = mean(xhat c_dot)
    xhat_dot = r * (c_dot - xhat * m)                               # xhat_dot = r (c_dot - xhat m)
    gamma4 = gamma.reshape(1, groups, -1, 1)
    z = gamma4 * xhat + beta.reshape(1, groups, -1, 1)              # z = gamma xhat + beta
    return xhat, c_dot, m, xhat_dot, z, r, gamma4


def groupnorm_jvp(x, gamma, beta, groups: int, x_dot, eps: float = 1e-5, silu: bool = False):
    """(y, y_dot, cache): y = [silu](GroupNorm(x)) and its tangent along x_dot (formulas above)."""
    from .activations import silu_derivative
    y, (_, _, _, mean, rstd, *_) = groupnorm_forward(x, gamma, beta, groups, eps, silu)
    xhat, c_dot, m, xhat_dot, z, r, gamma4 = _tangent_terms(x, x_dot, gamma, beta, mean, rstd, groups)
    z_dot = gamma4 * xhat_dot                                       # z_dot = gamma xhat_dot
    y_dot = silu_derivative(z) * z_dot if silu else z_dot           # y_dot = silu'(z) z_dot
    return y, y_dot.reshape(x.shape), (x, x_dot, gamma, beta, mean, rstd, groups, silu)


def groupnorm_jvp_backward(dy, dy_dot, cache):
    """Backward of (y, y_dot) = groupnorm_jvp(...) -> (dx, dx_dot, {"gamma", "beta"})."""
    from .activations import silu_derivatives
    x, x_dot, gamma, beta, mean, rstd, groups, silu = cache
    xhat, c_dot, m, xhat_dot, z, r, gamma4 = _tangent_terms(x, x_dot, gamma, beta, mean, rstd, groups)
    K = xhat.shape[2] * xhat.shape[3]
    gz, gz_dot = _group_view(dy, groups), _group_view(dy_dot, groups)
    if silu:
        # y = silu(z), y_dot = silu'(z) z_dot  =>  gz = dy silu'(z) + dy_dot silu''(z) z_dot,  gz_dot = dy_dot silu'(z)
        d1, d2 = silu_derivatives(z)
        gz, gz_dot = gz * d1 + gz_dot * d2 * (gamma4 * xhat_dot), gz_dot * d1
    # z = gamma xhat + beta,  z_dot = gamma xhat_dot
    dgamma = (gz * xhat + gz_dot * xhat_dot).sum(axis=(0, 3)).reshape(-1)
    dbeta = gz.sum(axis=(0, 3)).reshape(-1)
    g_xhat, a = gamma4 * gz, gamma4 * gz_dot                         # a = d / d xhat_dot
    # xhat_dot = r (c_dot - xhat m)
    g_cdot = r * a
    g_m = -r * (a * xhat).sum(axis=(2, 3), keepdims=True)
    g_xhat = g_xhat - (r * m) * a
    g_r = (a * (c_dot - xhat * m)).sum(axis=(2, 3), keepdims=True)
    # m = mean(xhat c_dot)
    g_xhat = g_xhat + (g_m / K) * c_dot
    g_cdot = g_cdot + (g_m / K) * xhat
    # c_dot = x_dot - mean(x_dot)
    dx_dot = g_cdot - g_cdot.mean(axis=(2, 3), keepdims=True)
    # xhat = (x - mu) r(x):  dx = r (g_xhat - mean(g_xhat) - xhat mean(g_xhat xhat));
    # r = (var + eps)^(-1/2), d r / d x = -r^3 (x - mu) / K = -r^2 xhat / K  carries g_r
    dx = r * (g_xhat - g_xhat.mean(axis=(2, 3), keepdims=True)
              - xhat * (g_xhat * xhat).mean(axis=(2, 3), keepdims=True))
    dx = dx - (g_r * r * r / K) * xhat
    return dx.reshape(x.shape), dx_dot.reshape(x.shape), {"gamma": dgamma, "beta": dbeta}
