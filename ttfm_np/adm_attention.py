"""The ADM U-Net's attention layer (torchcfm's `AttentionBlock` with QKVAttentionLegacy).

With x (N, C, H, W), `heads` heads of d = C / heads channels:

    a = attention(norm(x))       GroupNorm (no SiLU), then multi-head self-attention over the
                                 H*W pixels with W_qkv (3C, C), b_qkv (3C,), W_proj (C, C), b_proj (C,)
    y = x + a                    plain residual sum (no 1/sqrt(2), unlike resblock.py)

The only difference from attention.py is where q, k and v sit in the 3C rows of the qkv
projection. attention.py reads them "part-major":

    row p*C + h*d + c        part p (0 = q, 1 = k, 2 = v), head h, channel c

ADM's legacy layout is "head-major": each head's q, k, v are consecutive,

    row h*3d + p*d + c

so the layer gathers the rows into attention.py's order, W = W_qkv[perm] with
perm[p*C + h*d + c] = h*3d + p*d + c, runs attention.py, and scatters the gradient rows
back with the inverse permutation. ADM scales q and k by d^(-1/4) each; the product is
attention.py's 1/sqrt(d). Parameters are stored in ADM's order so a torchcfm state dict
maps one to one. Names under the layer's prefix (e.g. "mid.attn"): norm.gamma, norm.beta,
qkv.weight, qkv.bias, proj.weight, proj.bias.
"""
from __future__ import annotations

import numpy as np

from . import backend
from .attention import attention_backward, attention_forward
from .groupnorm import groupnorm_backward, groupnorm_forward
from .params import linear_weight
from .tape import backprop, recorder


def head_major_rows(channels: int, heads: int) -> np.ndarray:
    """perm (3C,) with perm[p*C + h*d + c] = h*3d + p*d + c: ADM's row of each part-major row."""
    if channels % heads:
        raise ValueError(f"attention: {channels} channels cannot be split into {heads} heads")
    d = channels // heads
    p, h, c = np.meshgrid(np.arange(3), np.arange(heads), np.arange(d), indexing="ij")   # (3, heads, d)
    return (h * 3 * d + p * d + c).reshape(-1)


def init_adm_attention(rng, prefix: str, channels: int):
    """Parameters (NumPy float32); the output projection is zero-initialised (ADM's zero_module)."""
    f32 = np.float32
    return {
        f"{prefix}.norm.gamma": np.ones(channels, f32), f"{prefix}.norm.beta": np.zeros(channels, f32),
        f"{prefix}.qkv.weight": linear_weight(rng, 3 * channels, channels),
        f"{prefix}.qkv.bias": np.zeros(3 * channels, f32),
        f"{prefix}.proj.weight": np.zeros((channels, channels), f32),
        f"{prefix}.proj.bias": np.zeros(channels, f32),
    }


def adm_attention_forward(params, prefix: str, x, *, heads: int, groups: int, need_grad: bool = True):
    """x (N, C, H, W) -> y (N, C, H, W), cache (None when need_grad is False)."""
    param = lambda name: params[f"{prefix}.{name}"]
    xp = backend.array_module(x)
    C = x.shape[1]
    rows = head_major_rows(C, heads)                             # (3C,) on the host
    perm, inverse = xp.asarray(rows), xp.asarray(np.argsort(rows))   # inverse[perm[i]] = i
    cache = {}
    run = recorder(cache, need_grad)
    a = run("norm", groupnorm_forward(x, param("norm.gamma"), param("norm.beta"), groups))
    # W = W_qkv[perm], b = b_qkv[perm]: ADM's head-major rows in attention.py's part-major order
    a = run("attn", attention_forward(a, param("qkv.weight")[perm], param("qkv.bias")[perm],
                                      param("proj.weight"), param("proj.bias"), heads))
    y = x + a
    if not need_grad:
        return y, None
    cache["prefix"], cache["inverse"] = prefix, inverse
    return y, cache


def adm_attention_backward(dy, cache):
    """dy (N, C, H, W) -> dx (N, C, H, W), grads with full names ({prefix}.qkv.weight, ...)."""
    prefix, inverse = cache["prefix"], cache["inverse"]
    grads = {}
    # a = attention(norm(x)) with W = W_qkv[perm]: W_qkv[perm[i]] is W[i], so its gradient row
    # perm[i] is dW[i], i.e. dW_qkv = dW[inverse] with inverse[perm[i]] = i
    da, g = attention_backward(dy, cache["attn"])
    grads[f"{prefix}.qkv.weight"] = g["qkv.weight"][inverse]
    grads[f"{prefix}.qkv.bias"] = g["qkv.bias"][inverse]
    grads[f"{prefix}.proj.weight"], grads[f"{prefix}.proj.bias"] = g["proj.weight"], g["proj.bias"]
    back = backprop(cache, grads, prefix)
    dx_norm = back("norm", da, groupnorm_backward)
    # y = x + a
    return dy + dx_norm, grads


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------
# The rows are gathered exactly as in the forward (W = W_qkv[perm], b = b_qkv[perm]) and the
# tangent is attention.py's attention_jvp on those rows, parameters fixed:
#     a_dot = attention'(norm(x)) [norm'(x) x_dot]
#     y_dot = x_dot + a_dot
# The backward scatters the qkv rows' gradients back with the inverse permutation, as
# adm_attention_backward does (both dW terms, from a and a_dot, come out of attention_jvp_backward).

def adm_attention_jvp(params, prefix: str, x, x_dot, *, heads: int, groups: int, need_grad: bool = True):
    """x, x_dot (N, C, H, W) -> (y, y_dot, cache) (cache None when need_grad is False)."""
    from .attention import attention_jvp
    from .groupnorm import groupnorm_jvp
    from .tape import jvp_recorder
    param = lambda name: params[f"{prefix}.{name}"]
    xp = backend.array_module(x)
    rows = head_major_rows(x.shape[1], heads)                    # (3C,) on the host
    perm, inverse = xp.asarray(rows), xp.asarray(np.argsort(rows))
    cache = {}
    run = jvp_recorder(cache, need_grad)
    # a = attention(norm(x))   with W = W_qkv[perm], b = b_qkv[perm]
    a, ad = run("norm", groupnorm_jvp(x, param("norm.gamma"), param("norm.beta"), groups, x_dot))
    a, ad = run("attn", attention_jvp(a, param("qkv.weight")[perm], param("qkv.bias")[perm],
                                      param("proj.weight"), param("proj.bias"), heads, ad))
    # y = x + a
    y, yd = x + a, x_dot + ad
    if not need_grad:
        return y, yd, None
    cache["prefix"], cache["inverse"] = prefix, inverse
    return y, yd, cache


def adm_attention_jvp_backward(dy, dy_dot, cache):
    """-> (dx, dx_dot, grads with full names): adm_attention_backward's steps on (dy, dy_dot) pairs."""
    from .attention import attention_jvp_backward
    from .groupnorm import groupnorm_jvp_backward
    from .tape import jvp_backprop
    prefix, inverse = cache["prefix"], cache["inverse"]
    grads = {}
    # a = attention(norm(x)) with W = W_qkv[perm]: dW_qkv = dW[inverse] (inverse[perm[i]] = i)
    da, da_dot, g = attention_jvp_backward(dy, dy_dot, cache["attn"])
    grads[f"{prefix}.qkv.weight"] = g["qkv.weight"][inverse]
    grads[f"{prefix}.qkv.bias"] = g["qkv.bias"][inverse]
    grads[f"{prefix}.proj.weight"], grads[f"{prefix}.proj.bias"] = g["proj.weight"], g["proj.bias"]
    back = jvp_backprop(cache, grads, prefix)
    dx_norm, dx_norm_dot = back("norm", da, da_dot, groupnorm_jvp_backward)
    # y = x + a,  y_dot = x_dot + a_dot
    return dy + dx_norm, dy_dot + dx_norm_dot, grads
