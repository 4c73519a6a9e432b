"""The U-Net's building block: a DDPM++ residual block with optional attention.

With x (N, Cin, H, W), emb_act = silu(e) (N, E) and skip_scale = 1/sqrt(2):

    h = conv0(silu(norm0(x)))                    3x3, Cin -> Cout
    h = h + affine(emb_act)[:, :, None, None]    the time conditioning
    h = conv1(dropout(silu(norm1(h))))           3x3, Cout -> Cout, zero-initialised
    x = (h + skip(x)) * skip_scale               skip = identity or 1x1 conv when Cin != Cout
    if attention:
        x = (x + attn(attn_norm(x))) * skip_scale  attn.proj zero-initialised

Parameter names under the block's prefix (e.g. "enc.16x16_block0"):
{prefix}.norm0.gamma, .conv0.weight, .affine.weight, .norm1.gamma, .conv1.weight,
.skip.weight, .attn_norm.gamma, .attn.qkv.weight, .attn.proj.weight (and the
matching .beta/.bias). The block's cache is a dict keyed by these sublayer
names, so the backward prefixes each sublayer's local gradients with them.
"""
from __future__ import annotations

import numpy as np

from .attention import attention_backward, attention_forward
from .conv import conv2d_backward, conv2d_forward
from .dropout import dropout_backward, dropout_forward, site_id
from .groupnorm import groupnorm_backward, groupnorm_forward
from .linear import linear_backward, linear_forward
from .params import conv_weight, linear_weight
from .tape import backprop, recorder

SKIP_SCALE = float(1.0 / np.sqrt(2.0))   # a Python float: keeps float32 arrays float32


def norm_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """Number of GroupNorm groups for a channel count (as NVlabs/edm chooses it)."""
    return max(1, min(max_groups, channels // min_channels_per_group))


def init_resblock(rng, prefix: str, cin: int, cout: int, emb_dim: int, attention: bool):
    """The block's parameters (NumPy float32); rng: numpy Generator for the initial weights."""
    f32 = np.float32
    p = {
        f"{prefix}.norm0.gamma": np.ones(cin, f32), f"{prefix}.norm0.beta": np.zeros(cin, f32),
        f"{prefix}.conv0.weight": conv_weight(rng, cout, cin, 3), f"{prefix}.conv0.bias": np.zeros(cout, f32),
        f"{prefix}.affine.weight": linear_weight(rng, cout, emb_dim), f"{prefix}.affine.bias": np.zeros(cout, f32),
        f"{prefix}.norm1.gamma": np.ones(cout, f32), f"{prefix}.norm1.beta": np.zeros(cout, f32),
        # zero-initialised: the block starts as its skip path (DDPM++ init_scale=0)
        f"{prefix}.conv1.weight": np.zeros((cout, cout, 3, 3), f32), f"{prefix}.conv1.bias": np.zeros(cout, f32),
    }
    if cin != cout:
        p[f"{prefix}.skip.weight"] = conv_weight(rng, cout, cin, 1)
        p[f"{prefix}.skip.bias"] = np.zeros(cout, f32)
    if attention:
        p[f"{prefix}.attn_norm.gamma"] = np.ones(cout, f32)
        p[f"{prefix}.attn_norm.beta"] = np.zeros(cout, f32)
        p[f"{prefix}.attn.qkv.weight"] = linear_weight(rng, 3 * cout, cout)
        p[f"{prefix}.attn.qkv.bias"] = np.zeros(3 * cout, f32)
        p[f"{prefix}.attn.proj.weight"] = np.zeros((cout, cout), f32)
        p[f"{prefix}.attn.proj.bias"] = np.zeros(cout, f32)
    return p


def attention_heads(channels: int, head_channels: int) -> int:
    return max(1, channels // head_channels)


def resblock_forward(params, prefix: str, x, emb_act, *, attention: bool, head_channels: int,
                     dropout: float = 0.0, dropout_seed=None, need_grad: bool = True):
    """x (N, Cin, H, W), emb_act (N, E) -> (N, Cout, H, W), cache.

    dropout_seed: int, or None for evaluation mode (no dropout); the block's
    dropout site is site_id(prefix). need_grad=False returns (y, None) and drops
    every sublayer's cache as soon as the sublayer returns (forward-only memory).
    """
    param = lambda name: params[f"{prefix}.{name}"]      # the block's parameter by local name
    cache = {}
    run = recorder(cache, need_grad)                     # cache[sublayer name] = its cache
    cin, cout = x.shape[1], param("conv0.weight").shape[0]
    h = run("norm0", groupnorm_forward(x, param("norm0.gamma"), param("norm0.beta"), norm_groups(cin),
                                       silu=True))
    h = run("conv0", conv2d_forward(h, param("conv0.weight"), param("conv0.bias"), 1, 1))
    a = run("affine", linear_forward(emb_act, param("affine.weight"), param("affine.bias")))
    h += a[:, :, None, None]               # h = h + a, in place: conv0's output is ours alone (not cached)
    h = run("norm1", groupnorm_forward(h, param("norm1.gamma"), param("norm1.beta"), norm_groups(cout),
                                       silu=True))
    h = run("dropout", dropout_forward(h, dropout, dropout_seed, site_id(prefix)))
    h = run("conv1", conv2d_forward(h, param("conv1.weight"), param("conv1.bias"), 1, 1))
    skip = run("skip", conv2d_forward(x, param("skip.weight"), param("skip.bias"), 1, 0)) if cin != cout else x
    h += skip                              # y = (h + skip) * SKIP_SCALE, in conv1's output (not cached)
    h *= SKIP_SCALE
    y = h
    if attention:
        a = run("attn_norm", groupnorm_forward(y, param("attn_norm.gamma"), param("attn_norm.beta"),
                                               norm_groups(cout)))
        a = run("attn", attention_forward(a, param("attn.qkv.weight"), param("attn.qkv.bias"),
                                          param("attn.proj.weight"), param("attn.proj.bias"),
                                          attention_heads(cout, head_channels)))
        a += y                             # y = (y + a) * SKIP_SCALE, in the attention's output (attn_norm
        a *= SKIP_SCALE                    # caches y itself, so y is not written)
        y = a
    if not need_grad:
        return y, None
    cache["prefix"] = prefix
    return y, cache


def resblock_backward(dy, cache):
    """dy (N, Cout, H, W) -> ((dx (N, Cin, H, W), d_emb_act (N, E)), grads).

    The block has two inputs, so its input gradient is the pair (dx, d_emb_act);
    grads holds full parameter names ({prefix}.conv0.weight, ...).
    """
    grads = {}
    back = backprop(cache, grads, cache["prefix"])       # grads[prefix.sublayer.key] += local grads
    if "attn" in cache:
        # y = (y + attn(attn_norm(y))) * SKIP_SCALE
        dy = dy * SKIP_SCALE
        dy = dy + back("attn_norm", back("attn", dy, attention_backward), groupnorm_backward)
    # y = (h + skip(x)) * SKIP_SCALE
    dh = dy * SKIP_SCALE
    dx = back("skip", dh, conv2d_backward) if "skip" in cache else dh
    # h = conv1(dropout(silu(norm1(h))))
    dh = back("conv1", dh, conv2d_backward)
    dh = back("dropout", dh, dropout_backward)
    dh = back("norm1", dh, groupnorm_backward)
    # h = h + affine(emb_act)[:, :, None, None]
    d_emb_act = back("affine", dh.sum(axis=(2, 3)), linear_backward)
    # h = conv0(silu(norm0(x)))
    dh = back("conv0", dh, conv2d_backward)
    dh = back("norm0", dh, groupnorm_backward)
    dh += dx                               # dx + dh, in norm0's fresh gradient buffer
    return (dh, d_emb_act), grads


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def resblock_jvp(params, prefix: str, x, emb_act, x_dot, emb_act_dot, *, attention: bool, head_channels: int,
                 dropout: float = 0.0, dropout_seed=None, need_grad: bool = True):
    """(y, y_dot, cache): the block of resblock_forward and its tangent along (x_dot, emb_act_dot).
    Every line is the forward's line with each layer replaced by its jvp; the sums and the
    skip scale are linear, so their tangents are the same sums of tangents."""
    from .attention import attention_jvp
    from .conv import conv2d_jvp
    from .dropout import dropout_jvp
    from .groupnorm import groupnorm_jvp
    from .linear import linear_jvp
    from .tape import jvp_recorder
    param = lambda name: params[f"{prefix}.{name}"]
    cache = {}
    run = jvp_recorder(cache, need_grad)
    cin, cout = x.shape[1], param("conv0.weight").shape[0]
    h, hd = run("norm0", groupnorm_jvp(x, param("norm0.gamma"), param("norm0.beta"), norm_groups(cin), x_dot,
                                       silu=True))
    h, hd = run("conv0", conv2d_jvp(h, param("conv0.weight"), param("conv0.bias"), hd, 1, 1))
    a, ad = run("affine", linear_jvp(emb_act, param("affine.weight"), param("affine.bias"), emb_act_dot))
    h, hd = h + a[:, :, None, None], hd + ad[:, :, None, None]
    h, hd = run("norm1", groupnorm_jvp(h, param("norm1.gamma"), param("norm1.beta"), norm_groups(cout), hd,
                                       silu=True))
    h, hd = run("dropout", dropout_jvp(h, hd, dropout, dropout_seed, site_id(prefix)))
    h, hd = run("conv1", conv2d_jvp(h, param("conv1.weight"), param("conv1.bias"), hd, 1, 1))
    if cin != cout:
        skip, skip_d = run("skip", conv2d_jvp(x, param("skip.weight"), param("skip.bias"), x_dot, 1, 0))
    else:
        skip, skip_d = x, x_dot
    y, yd = (h + skip) * SKIP_SCALE, (hd + skip_d) * SKIP_SCALE
    if attention:
        a, ad = run("attn_norm", groupnorm_jvp(y, param("attn_norm.gamma"), param("attn_norm.beta"),
                                               norm_groups(cout), yd))
        a, ad = run("attn", attention_jvp(a, param("attn.qkv.weight"), param("attn.qkv.bias"),
                                          param("attn.proj.weight"), param("attn.proj.bias"),
                                          attention_heads(cout, head_channels), ad))
        y, yd = (y + a) * SKIP_SCALE, (yd + ad) * SKIP_SCALE
    if not need_grad:
        return y, yd, None
    cache["prefix"] = prefix
    return y, yd, cache


def resblock_jvp_backward(dy, dy_dot, cache):
    """-> ((dx, d_emb_act), (dx_dot, d_emb_act_dot), grads): resblock_backward's steps, in pairs."""
    from .attention import attention_jvp_backward
    from .conv import conv2d_jvp_backward
    from .dropout import dropout_jvp_backward
    from .groupnorm import groupnorm_jvp_backward
    from .linear import linear_jvp_backward
    from .tape import jvp_backprop
    grads = {}
    back = jvp_backprop(cache, grads, cache["prefix"])
    if "attn" in cache:
        # y = (y + attn(attn_norm(y))) * SKIP_SCALE
        dy, dy_dot = dy * SKIP_SCALE, dy_dot * SKIP_SCALE
        da, da_dot = back("attn_norm", *back("attn", dy, dy_dot, attention_jvp_backward), groupnorm_jvp_backward)
        dy, dy_dot = dy + da, dy_dot + da_dot
    # y = (h + skip(x)) * SKIP_SCALE
    dh, dh_dot = dy * SKIP_SCALE, dy_dot * SKIP_SCALE
    dx, dx_dot = back("skip", dh, dh_dot, conv2d_jvp_backward) if "skip" in cache else (dh, dh_dot)
    # h = conv1(dropout(silu(norm1(h))))
    dh, dh_dot = back("conv1", dh, dh_dot, conv2d_jvp_backward)
    dh, dh_dot = back("dropout", dh, dh_dot, dropout_jvp_backward)
    dh, dh_dot = back("norm1", dh, dh_dot, groupnorm_jvp_backward)
    # h = h + affine(emb_act)[:, :, None, None]
    de, de_dot = back("affine", dh.sum(axis=(2, 3)), dh_dot.sum(axis=(2, 3)), linear_jvp_backward)
    # h = conv0(silu(norm0(x)))
    dh, dh_dot = back("conv0", dh, dh_dot, conv2d_jvp_backward)
    dh, dh_dot = back("norm0", dh, dh_dot, groupnorm_jvp_backward)
    return (dx + dh, de), (dx_dot + dh_dot, de_dot), grads
