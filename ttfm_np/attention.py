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


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------
# Tangent of every line of attention_forward along x_dot (weights fixed):
#     qkv_dot = W_qkv @ x_dot                                   -> q_dot, k_dot, v_dot
#     S_dot   = scale (q_dot^T k + q^T k_dot)
#     P_dot   = P * (S_dot - sum_j P S_dot)                     (softmax's tangent)
#     o_dot   = v_dot P^T + v P_dot^T
#     y_dot   = W_out @ o_dot

def attention_jvp(x, W_qkv, b_qkv, W_out, b_out, heads: int, x_dot):
    """(y, y_dot, cache) for y = attention_forward(x, ...) and x_dot (N, C, H, W)."""
    y, fcache = attention_forward(x, W_qkv, b_qkv, W_out, b_out, heads)
    x3, q, k, v, P, o, _, _, _, _ = fcache
    N, C, H, W = x.shape
    L, d = H * W, C // heads
    scale = float(1.0 / np.sqrt(d))
    xd3 = x_dot.reshape(N, C, L)
    qkv_dot = gemm(W_qkv, xd3)                                   # (N, 3C, L)
    qd, kd, vd = (qkv_dot[:, i * C:(i + 1) * C].reshape(N, heads, d, L) for i in range(3))
    S_dot = (gemm(qd.transpose(0, 1, 3, 2), k) + gemm(q.transpose(0, 1, 3, 2), kd)) * scale
    P_dot = P * (S_dot - (P * S_dot).sum(axis=-1, keepdims=True))
    o_dot = (gemm(vd, P.transpose(0, 1, 3, 2)) + gemm(v, P_dot.transpose(0, 1, 3, 2))).reshape(N, C, L)
    y_dot = gemm(W_out, o_dot)
    return y, y_dot.reshape(N, C, H, W), (fcache, xd3, qd, kd, vd, S_dot, P_dot, o_dot)


def attention_jvp_backward(dy, dy_dot, cache):
    """Backward of (y, y_dot) = attention_jvp(...) -> (dx, dx_dot, grads) (names as attention_backward)."""
    fcache, xd3, qd, kd, vd, S_dot, P_dot, o_dot = cache
    x3, q, k, v, P, o, W_qkv, W_out, heads, x_shape = fcache
    xp = backend.array_module(dy)
    N, C, H, W = x_shape
    L, d = H * W, C // heads
    scale = float(1.0 / np.sqrt(d))
    T = lambda a: a.transpose(0, 1, 3, 2)
    gy, gyd = dy.reshape(N, C, L), dy_dot.reshape(N, C, L)
    # y = W_out o + b_out,  y_dot = W_out o_dot
    dW_out = tensordot(gy, o, axes=((0, 2), (0, 2))) + tensordot(gyd, o_dot, axes=((0, 2), (0, 2)))
    db_out = gy.sum(axis=(0, 2))
    go = gemm(W_out.T, gy).reshape(N, heads, d, L)
    god = gemm(W_out.T, gyd).reshape(N, heads, d, L)
    # o_dot = v_dot P^T + v P_dot^T
    gvd = gemm(god, P)
    gP = gemm(T(god), vd)
    gv = gemm(god, P_dot)
    gPd = gemm(T(god), v)
    # o = v P^T
    gv = gv + gemm(go, P)
    gP = gP + gemm(T(go), v)
    # P_dot = P * (S_dot - rowsum(P S_dot))
    rs = (gPd * P).sum(axis=-1, keepdims=True)
    gSd = P * (gPd - rs)
    gP = gP + gPd * (S_dot - (P * S_dot).sum(axis=-1, keepdims=True)) - S_dot * rs
    # P = softmax(S)
    gS = P * (gP - (gP * P).sum(axis=-1, keepdims=True))
    gS *= scale
    gSd *= scale
    # S_dot = scale (q_dot^T k + q^T k_dot),  S = scale q^T k
    gqd = gemm(k, T(gSd))
    gkd = gemm(q, gSd)
    gq = gemm(kd, T(gSd)) + gemm(k, T(gS))
    gk = gemm(qd, gSd) + gemm(q, gS)
    cat = lambda a, b, c: xp.concatenate([a.reshape(N, C, L), b.reshape(N, C, L), c.reshape(N, C, L)], axis=1)
    gqkv, gqkvd = cat(gq, gk, gv), cat(gqd, gkd, gvd)
    # qkv = W_qkv x + b_qkv,  qkv_dot = W_qkv x_dot
    dW_qkv = tensordot(gqkv, x3, axes=((0, 2), (0, 2))) + tensordot(gqkvd, xd3, axes=((0, 2), (0, 2)))
    db_qkv = gqkv.sum(axis=(0, 2))
    dx = gemm(W_qkv.T, gqkv).reshape(x_shape)
    dx_dot = gemm(W_qkv.T, gqkvd).reshape(x_shape)
    return dx, dx_dot, {"qkv.weight": dW_qkv, "qkv.bias": db_qkv, "proj.weight": dW_out, "proj.bias": db_out}
