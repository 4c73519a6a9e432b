"""The ADM U-Net's residual block (Dhariwal & Nichol 2021; torchcfm's `ResBlock` with
use_scale_shift_norm=False, up=down=False, as its CIFAR-10 models use it).

With x (N, Cin, H, W) and emb_act = silu(e) (N, E):

    h = conv0(silu(norm0(x)))                    3x3, Cin -> Cout           (torch: in_layers)
    h = h + affine(emb_act)[:, :, None, None]    the time conditioning      (torch: emb_layers)
    h = conv1(dropout(silu(norm1(h))))           3x3, Cout -> Cout          (torch: out_layers)
    y = skip(x) + h                              skip = identity, or a 1x1 conv when Cin != Cout

Unlike the DDPM++ block (resblock.py) the sum is not scaled by 1/sqrt(2) and attention is a
separate layer (adm_attention.py). GroupNorm uses a fixed group count (32 in ADM).

Parameter names under the block's prefix (e.g. "enc.1.res"): norm0.gamma/beta,
conv0.weight/bias, affine.weight/bias, norm1.gamma/beta, conv1.weight/bias and, when the
channel count changes, skip.weight/bias. The cache is a dict by sublayer name.
"""
from __future__ import annotations

import numpy as np

from .conv import conv2d_backward, conv2d_forward
from .dropout import dropout_backward, dropout_forward, site_id
from .groupnorm import groupnorm_backward, groupnorm_forward
from .linear import linear_backward, linear_forward
from .params import conv_weight, linear_weight
from .tape import backprop, recorder


def init_adm_resblock(rng, prefix: str, cin: int, cout: int, emb_dim: int):
    """The block's parameters (NumPy float32); conv1 is zero-initialised (ADM's zero_module)."""
    f32 = np.float32
    p = {
        f"{prefix}.norm0.gamma": np.ones(cin, f32), f"{prefix}.norm0.beta": np.zeros(cin, f32),
        f"{prefix}.conv0.weight": conv_weight(rng, cout, cin, 3), f"{prefix}.conv0.bias": np.zeros(cout, f32),
        f"{prefix}.affine.weight": linear_weight(rng, cout, emb_dim), f"{prefix}.affine.bias": np.zeros(cout, f32),
        f"{prefix}.norm1.gamma": np.ones(cout, f32), f"{prefix}.norm1.beta": np.zeros(cout, f32),
        f"{prefix}.conv1.weight": np.zeros((cout, cout, 3, 3), f32), f"{prefix}.conv1.bias": np.zeros(cout, f32),
    }
    if cin != cout:
        p[f"{prefix}.skip.weight"] = conv_weight(rng, cout, cin, 1)
        p[f"{prefix}.skip.bias"] = np.zeros(cout, f32)
    return p


def adm_resblock_forward(params, prefix: str, x, emb_act, *, groups: int, dropout: float = 0.0,
                         dropout_seed=None, need_grad: bool = True):
    """x (N, Cin, H, W), emb_act (N, E) -> y (N, Cout, H, W), cache (None when need_grad is False).

    dropout_seed: int (the same int, the same masks), or None for evaluation mode; the
    block's dropout site is site_id(prefix).
    """
    param = lambda name: params[f"{prefix}.{name}"]      # the block's parameter by local name
    cache = {}
    run = recorder(cache, need_grad)
    cin, cout = x.shape[1], param("conv0.weight").shape[0]
    h = run("norm0", groupnorm_forward(x, param("norm0.gamma"), param("norm0.beta"), groups, silu=True))
    h = run("conv0", conv2d_forward(h, param("conv0.weight"), param("conv0.bias"), 1, 1))
    a = run("affine", linear_forward(emb_act, param("affine.weight"), param("affine.bias")))   # (N, Cout)
    h = h + a[:, :, None, None]
    h = run("norm1", groupnorm_forward(h, param("norm1.gamma"), param("norm1.beta"), groups, silu=True))
    h = run("dropout", dropout_forward(h, dropout, dropout_seed, site_id(prefix)))
    h = run("conv1", conv2d_forward(h, param("conv1.weight"), param("conv1.bias"), 1, 1))
    skip = run("skip", conv2d_forward(x, param("skip.weight"), param("skip.bias"), 1, 0)) if cin != cout else x
    y = skip + h
    if not need_grad:
        return y, None
    cache["prefix"] = prefix
    return y, cache


def adm_resblock_backward(dy, cache):
    """dy (N, Cout, H, W) -> ((dx (N, Cin, H, W), d_emb_act (N, E)), grads with full names)."""
    grads = {}
    back = backprop(cache, grads, cache["prefix"])
    # y = skip(x) + h
    dx = back("skip", dy, conv2d_backward) if "skip" in cache else dy
    # h = conv1(dropout(silu(norm1(h))))
    dh = back("conv1", dy, conv2d_backward)
    dh = back("dropout", dh, dropout_backward)
    dh = back("norm1", dh, groupnorm_backward)
    # h = h + affine(emb_act)[:, :, None, None]
    d_emb_act = back("affine", dh.sum(axis=(2, 3)), linear_backward)
    # h = conv0(silu(norm0(x)))
    dh = back("conv0", dh, conv2d_backward)
    dh = back("norm0", dh, groupnorm_backward)
    return (dx + dh, d_emb_act), grads
