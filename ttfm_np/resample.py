"""Resolution changes for the U-Net.

Upsampling is nearest-neighbour x2 (followed by a 3x3 conv in the U-Net);
downsampling is a 3x3 conv with stride 2 (in the U-Net, through conv.py) or the
2x2 average pool here.
    x (N, C, H, W) -> upsample_nearest2x -> (N, C, 2H, 2W)
    x (N, C, H, W) -> avgpool2x2         -> (N, C, H/2, W/2)
"""
from __future__ import annotations

from . import backend


def upsample_nearest2x_forward(x):
    xp = backend.array_module(x)
    N, C, H, W = x.shape
    # y[n, c, 2i + a, 2j + b] = x[n, c, i, j]  for a, b in {0, 1}
    y = xp.broadcast_to(x[:, :, :, None, :, None], (N, C, H, 2, W, 2)).reshape(N, C, 2 * H, 2 * W)
    return y, x.shape


def upsample_nearest2x_backward(dy, cache):
    N, C, H, W = cache
    # every x entry was copied to a 2x2 block: its gradient is the block's sum
    return dy.reshape(N, C, H, 2, W, 2).sum(axis=(3, 5)), {}     # no parameters


def avgpool2x2_forward(x):
    N, C, H, W = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"avgpool2x2 needs even height and width, got {H}x{W}")
    return x.reshape(N, C, H // 2, 2, W // 2, 2).mean(axis=(3, 5)), x.shape


def avgpool2x2_backward(dy, cache):
    xp = backend.array_module(dy)
    N, C, H, W = cache
    # y = mean of a 2x2 block  =>  each block entry gets dy / 4
    d = xp.broadcast_to(dy[:, :, :, None, :, None] * 0.25, (N, C, H // 2, 2, W // 2, 2))
    return d.reshape(N, C, H, W), {}


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def upsample_nearest2x_jvp(x, x_dot):
    """Linear in x: y_dot = upsample(x_dot) -> (y, y_dot, cache)."""
    y, cache = upsample_nearest2x_forward(x)
    return y, upsample_nearest2x_forward(x_dot)[0], cache


def upsample_nearest2x_jvp_backward(dy, dy_dot, cache):
    """-> (dx, dx_dot, {}): the block sums of both cotangents."""
    return upsample_nearest2x_backward(dy, cache)[0], upsample_nearest2x_backward(dy_dot, cache)[0], {}
