"""The ADM U-Net's resolution changes (Dhariwal & Nichol 2021, as torchcfm's UNetModel builds
them with conv_resample=True): learned convolutions around a fixed resampling.

    downsample:  y = conv3x3(x, stride 2, padding 1)     x (N, C, H, W) -> y (N, C', H/2, W/2)
    upsample:    y = conv3x3(nearest2x(x), padding 1)    x (N, C, H, W) -> y (N, C', 2H, 2W)

Both are compositions of existing layers (conv.py, resample.py); they live here as one
layer each so the ADM network reads like torchcfm's module list (`Downsample.op`,
`Upsample.conv`). Parameters: weight (C', C, 3, 3), bias (C',).
"""
from __future__ import annotations

from .conv import conv2d_backward, conv2d_forward
from .resample import upsample_nearest2x_backward, upsample_nearest2x_forward


def downsample_forward(x, W, b):
    """x (N, C, H, W) -> y (N, C', ceil(H/2), ceil(W/2)), cache: a 3x3 convolution with stride 2."""
    return conv2d_forward(x, W, b, 2, 1)


def downsample_backward(dy, cache):
    """dy (N, C', H/2, W/2) -> dx (N, C, H, W), {"weight", "bias"}."""
    # y = conv3x3(x, stride 2, padding 1)
    return conv2d_backward(dy, cache)


def upsample_forward(x, W, b):
    """x (N, C, H, W) -> y (N, C', 2H, 2W), cache: nearest-neighbour x2, then a 3x3 convolution."""
    u, up_cache = upsample_nearest2x_forward(x)              # (N, C, 2H, 2W)
    y, conv_cache = conv2d_forward(u, W, b, 1, 1)
    return y, (up_cache, conv_cache)


def upsample_backward(dy, cache):
    """dy (N, C', 2H, 2W) -> dx (N, C, H, W), {"weight", "bias"}."""
    up_cache, conv_cache = cache
    # y = conv3x3(u, padding 1)
    du, grads = conv2d_backward(dy, conv_cache)
    # u = nearest2x(x): each x entry fed a 2x2 block, its gradient is the block's sum
    dx, _ = upsample_nearest2x_backward(du, up_cache)
    return dx, grads


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------
# Both layers are linear in x, so the tangent is the same layer without the bias:
#     downsample:  y_dot = conv3x3(x_dot, stride 2, padding 1)
#     upsample:    y_dot = conv3x3(nearest2x(x_dot), padding 1)

def downsample_jvp(x, W, b, x_dot):
    """(y, y_dot, cache) for y = downsample_forward(x, W, b) and x_dot (N, C, H, W)."""
    from .conv import conv2d_jvp
    return conv2d_jvp(x, W, b, x_dot, 2, 1)


def downsample_jvp_backward(dy, dy_dot, cache):
    """-> (dx, dx_dot, {"weight", "bias"}); dW collects both y's and y_dot's terms."""
    from .conv import conv2d_jvp_backward
    # y = conv3x3(x, stride 2, padding 1),  y_dot = conv3x3(x_dot, stride 2, padding 1)
    return conv2d_jvp_backward(dy, dy_dot, cache)


def upsample_jvp(x, W, b, x_dot):
    """(y, y_dot, cache) for y = upsample_forward(x, W, b) and x_dot (N, C, H, W)."""
    from .conv import conv2d_jvp
    from .resample import upsample_nearest2x_jvp
    u, u_dot, up_cache = upsample_nearest2x_jvp(x, x_dot)              # (N, C, 2H, 2W) each
    y, y_dot, conv_cache = conv2d_jvp(u, W, b, u_dot, 1, 1)
    return y, y_dot, (up_cache, conv_cache)


def upsample_jvp_backward(dy, dy_dot, cache):
    """-> (dx, dx_dot, {"weight", "bias"})."""
    from .conv import conv2d_jvp_backward
    from .resample import upsample_nearest2x_jvp_backward
    up_cache, conv_cache = cache
    # y = conv3x3(u, padding 1),  y_dot = conv3x3(u_dot, padding 1)
    du, du_dot, grads = conv2d_jvp_backward(dy, dy_dot, conv_cache)
    # u = nearest2x(x), u_dot = nearest2x(x_dot): block sums of both cotangents
    dx, dx_dot, _ = upsample_nearest2x_jvp_backward(du, du_dot, up_cache)
    return dx, dx_dot, grads
