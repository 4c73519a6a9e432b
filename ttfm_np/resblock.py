"""The U-Net's building block: a DDPM++ residual block with optional attention.

With x (N, Cin, H, W), emb_act = silu(e) (N, E) and skip_scale = 1/sqrt(2):

    h = conv0(silu(norm0(x)))                    3x3, Cin -> Cout
    h = h + affine(emb_act)[:, :, None, None]    the time conditioning
    h = conv1(dropout(silu(norm1(h))))           3x3, Cout -> Cout, zero-initialised
    x = (h + skip(x)) * skip_scale               skip = identity or 1x1 conv when Cin != Cout
    if attention:
        x = (x + attn(attn_norm(x))) * skip_scale  attn.proj zero-initialised

Parameter names under the block's prefix P: P.norm0.gamma, P.conv0.weight,
P.affine.weight, P.norm1.gamma, P.conv1.weight, P.skip.weight, P.attn_norm.gamma,
P.attn.qkv.weight, P.attn.proj.weight (and the matching .beta/.bias).
"""
from __future__ import annotations

import numpy as np

from .attention import attention_backward, attention_forward
from .conv import conv2d_backward, conv2d_forward
from .dropout import dropout_backward, dropout_forward
from .groupnorm import groupnorm_backward, groupnorm_forward
from .linear import linear_backward, linear_forward
from .params import accumulate, conv_weight, linear_weight

SKIP_SCALE = float(1.0 / np.sqrt(2.0))   # a Python float: keeps float32 arrays float32


def norm_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """Number of GroupNorm groups for a channel count (as NVlabs/edm chooses it)."""
    return max(1, min(max_groups, channels // min_channels_per_group))


def init_resblock(rng, P: str, cin: int, cout: int, emb_dim: int, attention: bool, heads_channels: int):
    f32 = np.float32
    p = {
        f"{P}.norm0.gamma": np.ones(cin, f32), f"{P}.norm0.beta": np.zeros(cin, f32),
        f"{P}.conv0.weight": conv_weight(rng, cout, cin, 3), f"{P}.conv0.bias": np.zeros(cout, f32),
        f"{P}.affine.weight": linear_weight(rng, cout, emb_dim), f"{P}.affine.bias": np.zeros(cout, f32),
        f"{P}.norm1.gamma": np.ones(cout, f32), f"{P}.norm1.beta": np.zeros(cout, f32),
        # zero-initialised: the block starts as its skip path (DDPM++ init_scale=0)
        f"{P}.conv1.weight": np.zeros((cout, cout, 3, 3), f32), f"{P}.conv1.bias": np.zeros(cout, f32),
    }
    if cin != cout:
        p[f"{P}.skip.weight"] = conv_weight(rng, cout, cin, 1)
        p[f"{P}.skip.bias"] = np.zeros(cout, f32)
    if attention:
        p[f"{P}.attn_norm.gamma"] = np.ones(cout, f32)
        p[f"{P}.attn_norm.beta"] = np.zeros(cout, f32)
        p[f"{P}.attn.qkv.weight"] = linear_weight(rng, 3 * cout, cout)
        p[f"{P}.attn.qkv.bias"] = np.zeros(3 * cout, f32)
        p[f"{P}.attn.proj.weight"] = np.zeros((cout, cout), f32)
        p[f"{P}.attn.proj.bias"] = np.zeros(cout, f32)
    return p


def attention_heads(channels: int, head_channels: int) -> int:
    return max(1, channels // head_channels)


def resblock_forward(params, P: str, x, emb_act, *, attention: bool, head_channels: int,
                     dropout: float = 0.0, rng=None):
    """x (N, Cin, H, W), emb_act (N, E) -> (N, Cout, H, W), cache."""
    W0 = params[f"{P}.conv0.weight"]
    cin, cout = x.shape[1], W0.shape[0]
    h, c_n0 = groupnorm_forward(x, params[f"{P}.norm0.gamma"], params[f"{P}.norm0.beta"],
                                norm_groups(cin), silu=True)
    h, c_c0 = conv2d_forward(h, W0, params[f"{P}.conv0.bias"], 1, 1)
    a, c_aff = linear_forward(emb_act, params[f"{P}.affine.weight"], params[f"{P}.affine.bias"])
    h = h + a[:, :, None, None]
    h, c_n1 = groupnorm_forward(h, params[f"{P}.norm1.gamma"], params[f"{P}.norm1.beta"],
                                norm_groups(cout), silu=True)
    c_do = None
    if dropout > 0.0 and rng is not None:              # rng None = evaluation mode
        h, c_do = dropout_forward(h, dropout, rng)
    h, c_c1 = conv2d_forward(h, params[f"{P}.conv1.weight"], params[f"{P}.conv1.bias"], 1, 1)
    if cin != cout:
        skip, c_skip = conv2d_forward(x, params[f"{P}.skip.weight"], params[f"{P}.skip.bias"], 1, 0)
    else:
        skip, c_skip = x, None
    y = (h + skip) * SKIP_SCALE
    c_attn = None
    if attention:
        a, c_an = groupnorm_forward(y, params[f"{P}.attn_norm.gamma"], params[f"{P}.attn_norm.beta"],
                                    norm_groups(cout))
        a, c_at = attention_forward(a, params[f"{P}.attn.qkv.weight"], params[f"{P}.attn.qkv.bias"],
                                    params[f"{P}.attn.proj.weight"], params[f"{P}.attn.proj.bias"],
                                    attention_heads(cout, head_channels))
        y = (y + a) * SKIP_SCALE
        c_attn = (c_an, c_at)
    return y, (c_n0, c_c0, c_aff, c_n1, c_do, c_c1, c_skip, c_attn)


def resblock_backward(dy, cache, params, P: str, grads: dict):
    """dy (N, Cout, H, W) -> dx (N, Cin, H, W), d_emb_act (N, E); parameter grads accumulate."""
    c_n0, c_c0, c_aff, c_n1, c_do, c_c1, c_skip, c_attn = cache
    if c_attn is not None:
        c_an, c_at = c_attn
        # y = (y + attn(attn_norm(y))) * SKIP_SCALE
        dy = dy * SKIP_SCALE
        da, dWqkv, dbqkv, dWo, dbo = attention_backward(dy, c_at)
        accumulate(grads, f"{P}.attn.qkv.weight", dWqkv)
        accumulate(grads, f"{P}.attn.qkv.bias", dbqkv)
        accumulate(grads, f"{P}.attn.proj.weight", dWo)
        accumulate(grads, f"{P}.attn.proj.bias", dbo)
        da, dg, db = groupnorm_backward(da, c_an)
        accumulate(grads, f"{P}.attn_norm.gamma", dg)
        accumulate(grads, f"{P}.attn_norm.beta", db)
        dy = dy + da
    # y = (h + skip(x)) * SKIP_SCALE
    dh = dy * SKIP_SCALE
    if c_skip is not None:
        dx, dW, db = conv2d_backward(dh, c_skip)
        accumulate(grads, f"{P}.skip.weight", dW)
        accumulate(grads, f"{P}.skip.bias", db)
    else:
        dx = dh
    # h = conv1(dropout(silu(norm1(h))))
    dh, dW, db = conv2d_backward(dh, c_c1)
    accumulate(grads, f"{P}.conv1.weight", dW)
    accumulate(grads, f"{P}.conv1.bias", db)
    dh = dropout_backward(dh, c_do)
    dh, dg, db = groupnorm_backward(dh, c_n1)
    accumulate(grads, f"{P}.norm1.gamma", dg)
    accumulate(grads, f"{P}.norm1.beta", db)
    # h = h + affine(emb_act)[:, :, None, None]
    d_emb_act, dW, db = linear_backward(dh.sum(axis=(2, 3)), c_aff)
    accumulate(grads, f"{P}.affine.weight", dW)
    accumulate(grads, f"{P}.affine.bias", db)
    # h = conv0(silu(norm0(x)))
    dh, dW, db = conv2d_backward(dh, c_c0)
    accumulate(grads, f"{P}.conv0.weight", dW)
    accumulate(grads, f"{P}.conv0.bias", db)
    dh, dg, db = groupnorm_backward(dh, c_n0)
    accumulate(grads, f"{P}.norm0.gamma", dg)
    accumulate(grads, f"{P}.norm0.beta", db)
    return dx + dh, d_emb_act
