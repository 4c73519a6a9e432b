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

from . import backend
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

def groupnorm_forward_numpy(x, gamma, beta, groups: int, eps: float = 1e-5, silu: bool = False):
    N, C = x.shape[:2]
    xg = x.reshape(N, groups, -1)                        # (N, G, C/G * HW)
    mean = xg.mean(axis=2)                               # (N, G)
    var = xg.var(axis=2)                                 # centred, not E[x^2] - E[x]^2
    rstd = 1.0 / np.sqrt(var + eps)                      # (N, G)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    bshape = (1, C) + (1,) * (x.ndim - 2)
    z = xhat * gamma.reshape(bshape) + beta.reshape(bshape)
    y = z * sigmoid(z) if silu else z
    return y, (mean.astype(x.dtype), rstd.astype(x.dtype))


def groupnorm_backward_numpy(dy, x, gamma, beta, mean, rstd, groups: int, silu: bool):
    N, C = x.shape[:2]
    bshape = (1, C) + (1,) * (x.ndim - 2)
    reduce_axes = (0,) + tuple(range(2, x.ndim))
    xg = x.reshape(N, groups, -1)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    if silu:
        # y = z * s(z)  =>  dz = dy * s (1 + z (1 - s))
        z = xhat * gamma.reshape(bshape) + beta.reshape(bshape)
        s = sigmoid(z)
        dz = dy * (s * (1.0 + z * (1.0 - s)))
    else:
        dz = dy
    # z = gamma * xhat + beta  =>  dgamma = sum dz * xhat, dbeta = sum dz
    dgamma = (dz * xhat).sum(axis=reduce_axes)
    dbeta = dz.sum(axis=reduce_axes)
    # xhat = (x - mu) * rstd, with mu and rstd functions of the whole group:
    #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dxhat = (dz * gamma.reshape(bshape)).reshape(N, groups, -1)
    xhat_g = xhat.reshape(N, groups, -1)
    m1 = dxhat.mean(axis=2, keepdims=True)
    m2 = (dxhat * xhat_g).mean(axis=2, keepdims=True)
    dx = rstd[..., None] * (dxhat - m1 - xhat_g * m2)
    return dx.reshape(x.shape), dgamma, dbeta


# ----------------------------------------------------------------------------
# CuPy path (fused CUDA kernels)
# ----------------------------------------------------------------------------

_BLOCK = 256  # must equal BLOCK in kernels/groupnorm.cu


def groupnorm_forward_cupy(x, gamma, beta, groups: int, eps: float = 1e-5, silu: bool = False):
    from . import cuda
    cp = backend.array_module(x)
    N, C = x.shape[:2]
    HW = int(np.prod(x.shape[2:]))
    x = cp.ascontiguousarray(x)
    y = cp.empty_like(x)
    mean = cp.empty((N, groups), dtype=x.dtype)
    rstd = cp.empty((N, groups), dtype=x.dtype)
    kernel = cuda.get_kernel("groupnorm", "groupnorm_fwd", x.dtype)
    kernel((N * groups,), (_BLOCK,),
           (x, cp.ascontiguousarray(gamma), cp.ascontiguousarray(beta), y, mean, rstd,
            np.int32(C), np.int32(HW), np.int32(groups), x.dtype.type(eps), np.int32(silu)))
    return y, (mean, rstd)


def groupnorm_backward_cupy(dy, x, gamma, beta, mean, rstd, groups: int, silu: bool):
    from . import cuda
    cp = backend.array_module(x)
    N, C = x.shape[:2]
    HW = int(np.prod(x.shape[2:]))
    dy = cp.ascontiguousarray(dy)
    dx = cp.empty_like(x)
    dgamma_part = cp.empty((N, C), dtype=x.dtype)
    dbeta_part = cp.empty((N, C), dtype=x.dtype)
    kernel = cuda.get_kernel("groupnorm", "groupnorm_bwd", x.dtype)
    kernel((N * groups,), (_BLOCK,),
           (dy, x, cp.ascontiguousarray(gamma), cp.ascontiguousarray(beta), mean, rstd,
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
    else:
        y, (mean, rstd) = groupnorm_forward_numpy(x, gamma, beta, groups, eps, silu)
    return y, (x, gamma, beta, mean, rstd, groups, silu)


def groupnorm_backward(dy, cache):
    """-> dx (like x), dgamma (C,), dbeta (C,)."""
    x, gamma, beta, mean, rstd, groups, silu = cache
    if backend.is_cupy(backend.array_module(x)):
        return groupnorm_backward_cupy(dy, x, gamma, beta, mean, rstd, groups, silu)
    return groupnorm_backward_numpy(dy, x, gamma, beta, mean, rstd, groups, silu)
