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

from .conv import conv2d_backward, conv2d_forward
from .dropout import dropout_backward, dropout_forward, site_id
from .groupnorm import groupnorm_backward, groupnorm_forward
from .linear import linear_backward, linear_forward
from .resblock import init_resblock
from .tape import backprop, recorder


def init_adm_resblock(rng, prefix: str, cin: int, cout: int, emb_dim: int):
    """The block's parameters (NumPy float32); conv1 is zero-initialised (ADM's zero_module).

    The same names, shapes and initial values as the DDPM++ block without its attention
    (resblock.init_resblock): norm0, conv0, affine, norm1, conv1 (zeros) and a 1x1 skip
    when cin != cout. Only the forward differs (no 1/sqrt(2) on the residual sum).
    """
    return init_resblock(rng, prefix, cin, cout, emb_dim, attention=False)


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


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------
# Tangent of every line of adm_resblock_forward along (x_dot, emb_act_dot), parameters fixed:
#     h_dot = conv0(silu(norm0)'(x) x_dot)                       (conv without bias)
#     h_dot = h_dot + (W_affine emb_act_dot)[:, :, None, None]
#     h_dot = conv1(dropout(silu(norm1)'(h) h_dot))              the SAME dropout mask as the primal
#     y_dot = skip(x_dot) + h_dot                                skip is linear (identity or 1x1 conv)

def adm_resblock_jvp(params, prefix: str, x, emb_act, x_dot, emb_act_dot, *, groups: int, dropout: float = 0.0,
                     dropout_seed=None, need_grad: bool = True):
    """(y, y_dot, cache): the block of adm_resblock_forward and its tangent along (x_dot (N, Cin, H, W),
    emb_act_dot (N, E)); every line is the forward's line with each layer replaced by its jvp."""
    from .conv import conv2d_jvp
    from .dropout import dropout_jvp
    from .groupnorm import groupnorm_jvp
    from .linear import linear_jvp
    from .tape import jvp_recorder
    param = lambda name: params[f"{prefix}.{name}"]
    cache = {}
    run = jvp_recorder(cache, need_grad)
    cin, cout = x.shape[1], param("conv0.weight").shape[0]
    # h = conv0(silu(norm0(x)))
    h, hd = run("norm0", groupnorm_jvp(x, param("norm0.gamma"), param("norm0.beta"), groups, x_dot, silu=True))
    h, hd = run("conv0", conv2d_jvp(h, param("conv0.weight"), param("conv0.bias"), hd, 1, 1))
    # h = h + affine(emb_act)[:, :, None, None]
    a, ad = run("affine", linear_jvp(emb_act, param("affine.weight"), param("affine.bias"), emb_act_dot))  # (N, Cout)
    h, hd = h + a[:, :, None, None], hd + ad[:, :, None, None]
    # h = conv1(dropout(silu(norm1(h))))
    h, hd = run("norm1", groupnorm_jvp(h, param("norm1.gamma"), param("norm1.beta"), groups, hd, silu=True))
    h, hd = run("dropout", dropout_jvp(h, hd, dropout, dropout_seed, site_id(prefix)))
    h, hd = run("conv1", conv2d_jvp(h, param("conv1.weight"), param("conv1.bias"), hd, 1, 1))
    # y = skip(x) + h
    if cin != cout:
        skip, skip_d = run("skip", conv2d_jvp(x, param("skip.weight"), param("skip.bias"), x_dot, 1, 0))
    else:
        skip, skip_d = x, x_dot
    y, yd = skip + h, skip_d + hd
    if not need_grad:
        return y, yd, None
    cache["prefix"] = prefix
    return y, yd, cache


def adm_resblock_jvp_backward(dy, dy_dot, cache):
    """-> ((dx, d_emb_act), (dx_dot, d_emb_act_dot), grads with full names): adm_resblock_backward's
    steps on (cotangent of y, cotangent of y_dot) pairs."""
    from .conv import conv2d_jvp_backward
    from .dropout import dropout_jvp_backward
    from .groupnorm import groupnorm_jvp_backward
    from .linear import linear_jvp_backward
    from .tape import jvp_backprop
    grads = {}
    back = jvp_backprop(cache, grads, cache["prefix"])
    # y = skip(x) + h,  y_dot = skip(x_dot) + h_dot
    dx, dx_dot = back("skip", dy, dy_dot, conv2d_jvp_backward) if "skip" in cache else (dy, dy_dot)
    # h = conv1(dropout(silu(norm1(h))))
    dh, dh_dot = back("conv1", dy, dy_dot, conv2d_jvp_backward)
    dh, dh_dot = back("dropout", dh, dh_dot, dropout_jvp_backward)
    dh, dh_dot = back("norm1", dh, dh_dot, groupnorm_jvp_backward)
    # h = h + affine(emb_act)[:, :, None, None]: the broadcast's gradient is the sum over pixels
    de, de_dot = back("affine", dh.sum(axis=(2, 3)), dh_dot.sum(axis=(2, 3)), linear_jvp_backward)
    # h = conv0(silu(norm0(x)))
    dh, dh_dot = back("conv0", dh, dh_dot, conv2d_jvp_backward)
    dh, dh_dot = back("norm0", dh, dh_dot, groupnorm_jvp_backward)
    return (dx + dh, de), (dx_dot + dh_dot, de_dot), grads
