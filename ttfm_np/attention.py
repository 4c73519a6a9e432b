"""Multi-head self-attention over the pixels of a feature map.

Shapes: x (N, C, H, W) -> L = H*W tokens of C channels, `heads` heads of
d = C / heads channels. Weights: W_qkv (3C, C), b_qkv (3C,), W_out (C, C),
b_out (C,) -- 1x1 convolutions, stored like linear layers (out, in).

    qkv      = W_qkv @ x + b_qkv               (N, 3C, L)  -> q, k, v (N, heads, d, L)
    S[i, j]  = (q[:, i] . k[:, j]) / sqrt(d)   (N, heads, L, L)
    P        = softmax_j(S)
    o[:, i]  = sum_j P[i, j] v[:, j]           (N, heads, d, L)  -> (N, C, L)
    y        = W_out @ o + b_out               (N, C, H, W)

GroupNorm before and the residual connection after live in the U-Net block.
All products are batched matmuls (cuBLAS on the GPU).
"""
from __future__ import annotations

import numpy as np

from . import backend
from .precision import matmul as gemm, tensordot   # fp32, or TF32 inputs with --precision tf32


def softmax_lastaxis(S):
    xp = backend.array_module(S)
    P = S - S.max(axis=-1, keepdims=True)     # subtract the row max: exp cannot overflow
    xp.exp(P, out=P)
    P /= P.sum(axis=-1, keepdims=True)
    return P


def attention_forward(x, W_qkv, b_qkv, W_out, b_out, heads: int):
    xp = backend.array_module(x)
    N, C, H, W = x.shape
    if C % heads:
        raise ValueError(f"attention: {C} channels cannot be split into {heads} heads")
    L, d = H * W, C // heads
    x3 = x.reshape(N, C, L)
    qkv = gemm(W_qkv, x3) + b_qkv.reshape(1, 3 * C, 1)               # (N, 3C, L)
    q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(N, heads, d, L) for i in range(3))
    scale = float(1.0 / np.sqrt(d))
    S = gemm(q.transpose(0, 1, 3, 2), k) * scale                      # (N, h, L, L)
    P = softmax_lastaxis(S)
    o = gemm(v, P.transpose(0, 1, 3, 2)).reshape(N, C, L)             # (N, C, L)
    y = gemm(W_out, o) + b_out.reshape(1, C, 1)
    cache = (x3, q, k, v, P, o, W_qkv, W_out, heads, x.shape)
    return y.reshape(N, C, H, W), cache


def attention_backward(dy, cache):
    """dy (N, C, H, W) -> dx (N, C, H, W), grads with local names
    {"qkv.weight": (3C, C), "qkv.bias": (3C,), "proj.weight": (C, C), "proj.bias": (C,)}
    (the projections' names under the attention's prefix in a ResBlock)."""
    x3, q, k, v, P, o, W_qkv, W_out, heads, x_shape = cache
    xp = backend.array_module(dy)
    N, C, H, W = x_shape
    L, d = H * W, C // heads
    scale = float(1.0 / np.sqrt(d))
    dy3 = dy.reshape(N, C, L)
    # y = W_out @ o + b_out
    dW_out = tensordot(dy3, o, axes=((0, 2), (0, 2)))                 # (C, C)
    db_out = dy3.sum(axis=(0, 2))
    do = gemm(W_out.T, dy3).reshape(N, heads, d, L)
    # o = v @ P^T  =>  dv = do @ P,  dP = do^T @ v
    dv = gemm(do, P)                                                 # (N, h, d, L)
    dP = gemm(do.transpose(0, 1, 3, 2), v)                           # (N, h, L, L)
    # P = softmax(S)  =>  dS = P * (dP - sum_j dP * P)
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
    dS *= scale
    # S = scale * q^T k  =>  dq = k @ dS^T,  dk = q @ dS
    dq = gemm(k, dS.transpose(0, 1, 3, 2))
    dk = gemm(q, dS)
    dqkv = xp.concatenate([dq.reshape(N, C, L), dk.reshape(N, C, L), dv.reshape(N, C, L)], axis=1)
    # qkv = W_qkv @ x + b_qkv
    dW_qkv = tensordot(dqkv, x3, axes=((0, 2), (0, 2)))             # (3C, C)
    db_qkv = dqkv.sum(axis=(0, 2))
    dx = gemm(W_qkv.T, dqkv).reshape(x_shape)
    return dx, {"qkv.weight": dW_qkv, "qkv.bias": db_qkv, "proj.weight": dW_out, "proj.bias": db_out}
