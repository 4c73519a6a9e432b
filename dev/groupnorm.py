"""Kernel study: GroupNorm + SiLU forward + backward on the CPU (NumPy).

Reference: float64 formulas written out directly.
v1: unfused: GroupNorm then a separate SiLU, each with its own backward.
v2: fused GroupNorm+SiLU written as the formulas read (xg.var, xhat and z as
    fresh temporaries in forward and again in backward).
v3: per-(n, c) coefficients: every pass over the activation is one fused
    multiply-add in place (z = x * a + b, dx = A dz + B xhat + D), the sums
    as dot-product einsums; about half the memory traffic of v2 (library).
(The CUDA kernels in ttfm_np/kernels/groupnorm.cu are checked against v2 by
tests/test_cuda_kernels.py on a GPU.)
"""
import numpy as np

from harness import Registry, run_study
from ttfm_np import activations, groupnorm

registry = Registry()
G = 4


def make_inputs(quick, rng):
    N, C, H = (2, 8, 4) if quick else (32, 128, 16)
    x = (rng.standard_normal((N, C, H, H)) * 2 + 0.3).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    b = (0.1 * rng.standard_normal(C)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    return x, g, b, dy


def reference(inp):
    x, g, b, dy = (a.astype(np.float64) for a in inp)
    N, C = x.shape[:2]
    xg = x.reshape(N, G, -1)
    mu, var = xg.mean(-1, keepdims=True), xg.var(-1, keepdims=True)
    xhat = ((xg - mu) / np.sqrt(var + 1e-5)).reshape(x.shape)
    z = xhat * g[None, :, None, None] + b[None, :, None, None]
    s = 1 / (1 + np.exp(-z))
    dz = dy * s * (1 + z * (1 - s))
    dxhat = (dz * g[None, :, None, None]).reshape(N, G, -1)
    xh = xhat.reshape(N, G, -1)
    dx = (dxhat - dxhat.mean(-1, keepdims=True) - xh * (dxhat * xh).mean(-1, keepdims=True)) / np.sqrt(var + 1e-5)
    return z * s, dx.reshape(x.shape), (dz * xhat).sum((0, 2, 3)), dz.sum((0, 2, 3))


@registry.version(1, "GroupNorm, then a separate SiLU")
def v1(inp):
    x, g, b, dy = inp
    z, cz = groupnorm.groupnorm_forward(x, g, b, G)
    y, cs = activations.silu_forward(z)
    dx, grads = groupnorm.groupnorm_backward(activations.silu_backward(dy, cs)[0], cz)
    return y, dx, grads["gamma"], grads["beta"]


@registry.version(2, "fused GroupNorm+SiLU, the formulas as read")
def v2(inp):
    x, g, b, dy = inp
    sig = lambda a: 0.5 * (np.tanh(0.5 * a) + 1.0)
    N, C = x.shape[:2]
    bshape = (1, C, 1, 1)
    # forward
    xg = x.reshape(N, G, -1)
    mean, var = xg.mean(axis=2), xg.var(axis=2)
    rstd = 1.0 / np.sqrt(var + 1e-5)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    z = xhat * g.reshape(bshape) + b.reshape(bshape)
    y = z * sig(z)
    # backward (xhat, z, s recomputed from x as the library did)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    z = xhat * g.reshape(bshape) + b.reshape(bshape)
    s = sig(z)
    dz = dy * (s * (1.0 + z * (1.0 - s)))
    dgamma, dbeta = (dz * xhat).sum(axis=(0, 2, 3)), dz.sum(axis=(0, 2, 3))
    dxhat = (dz * g.reshape(bshape)).reshape(N, G, -1)
    xh = xhat.reshape(N, G, -1)
    dx = rstd[..., None] * (dxhat - dxhat.mean(axis=2, keepdims=True) - xh * (dxhat * xh).mean(axis=2, keepdims=True))
    return y, dx.reshape(x.shape), dgamma, dbeta


@registry.version(3, "per-(n, c) coefficients, in-place fused passes (library)")
def v3(inp):
    x, g, b, dy = inp
    y, c = groupnorm.groupnorm_forward(x, g, b, G, silu=True)
    dx, grads = groupnorm.groupnorm_backward(dy, c)
    return y, dx, grads["gamma"], grads["beta"]


if __name__ == "__main__":
    run_study("groupnorm_silu", registry, make_inputs, reference, tol=1e-4)
