"""Kernel study: multi-head spatial self-attention, forward + backward (NumPy).

Reference: float64, one (sample, head) at a time with explicit softmax.
v1: loops over samples and heads with 2-D matmuls.
v2: the library's batched matmuls over (N, heads) (ttfm_np/attention.py).
"""
import numpy as np

from harness import Registry, run_study
from ttfm_np import attention

registry = Registry()


def make_inputs(quick, rng):
    N, C, H, heads = (2, 8, 3, 2) if quick else (32, 128, 8, 2)
    x = rng.standard_normal((N, C, H, H)).astype(np.float32)
    Wqkv = (rng.standard_normal((3 * C, C)) / np.sqrt(C)).astype(np.float32)
    bqkv = (0.1 * rng.standard_normal(3 * C)).astype(np.float32)
    Wo = (rng.standard_normal((C, C)) / np.sqrt(C)).astype(np.float32)
    bo = (0.1 * rng.standard_normal(C)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    return x, Wqkv, bqkv, Wo, bo, heads, dy


def _loop(inp, dtype):
    x, Wqkv, bqkv, Wo, bo, heads, dy = inp
    x, Wqkv, bqkv, Wo, bo, dy = (a.astype(dtype) for a in (x, Wqkv, bqkv, Wo, bo, dy))
    N, C, H, W = x.shape
    L, d = H * W, C // heads
    X = x.reshape(N, C, L)
    dY = dy.reshape(N, C, L)
    y = np.empty((N, C, L), dtype)
    dx = np.empty_like(X)
    dWqkv, dbqkv, dWo = np.zeros_like(Wqkv), np.zeros_like(bqkv), np.zeros_like(Wo)
    for n in range(N):
        qkv = Wqkv @ X[n] + bqkv[:, None]
        o = np.empty((C, L), dtype)
        Ps = []
        for h in range(heads):
            q, k, v = (qkv[i * C + h * d:i * C + (h + 1) * d] for i in range(3))
            S = q.T @ k / np.sqrt(d)
            P = np.exp(S - S.max(1, keepdims=True))
            P /= P.sum(1, keepdims=True)
            Ps.append(P)
            o[h * d:(h + 1) * d] = v @ P.T
        y[n] = Wo @ o + bo[:, None]
        dWo += dY[n] @ o.T
        do = Wo.T @ dY[n]
        dqkv = np.empty_like(qkv)
        for h in range(heads):
            q, k, v = (qkv[i * C + h * d:i * C + (h + 1) * d] for i in range(3))
            P, dOh = Ps[h], do[h * d:(h + 1) * d]
            dv = dOh @ P
            dP = dOh.T @ v
            dS = P * (dP - (dP * P).sum(1, keepdims=True)) / np.sqrt(d)
            dqkv[h * d:(h + 1) * d] = k @ dS.T
            dqkv[C + h * d:C + (h + 1) * d] = q @ dS
            dqkv[2 * C + h * d:2 * C + (h + 1) * d] = dv
        dWqkv += dqkv @ X[n].T
        dbqkv += dqkv.sum(1)
        dx[n] = Wqkv.T @ dqkv
    return y.reshape(x.shape), dx.reshape(x.shape), dWqkv, dbqkv, dWo, dY.sum((0, 2))


def reference(inp):
    return _loop(inp, np.float64)


@registry.version(1, "loops over samples and heads, 2-D matmuls")
def v1(inp):
    return _loop(inp, np.float32)


@registry.version(2, "batched matmuls over (N, heads) (library)")
def v2(inp):
    x, Wqkv, bqkv, Wo, bo, heads, dy = inp
    y, cache = attention.attention_forward(x, Wqkv, bqkv, Wo, bo, heads)
    dx, g = attention.attention_backward(dy, cache)
    return y, dx, g["qkv.weight"], g["qkv.bias"], g["proj.weight"], g["proj.bias"]


if __name__ == "__main__":
    run_study("attention", registry, make_inputs, reference, tol=1e-4)
