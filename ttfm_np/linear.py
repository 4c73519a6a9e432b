"""Fully connected layer: y = x W^T + b.

Weight layout is (out_features, in_features), as torch.nn.Linear stores it, so
weights can be compared with PyTorch one to one.
"""
from __future__ import annotations

from .precision import matmul as gemm   # fp32, or TF32 inputs with --precision tf32 (precision.py)


def linear_forward(x, W, b=None):
    """x: (..., in), W: (out, in), b: (out,) or None  ->  y: (..., out)."""
    y = gemm(x, W.T)                   # (..., out)
    if b is not None:
        y += b
    return y, (x, W, b is not None)


def linear_backward(dy, cache):
    """dy: (..., out) -> dx (..., in), {"weight": dW (out, in)[, "bias": db (out,)]}."""
    x, W, has_bias = cache
    n_out, n_in = W.shape
    # y = x @ W.T      =>  dx = dy @ W,  dW = dy^T x (summed over all leading dims)
    dx = gemm(dy, W)
    dy2 = dy.reshape(-1, n_out)        # (M, out), M = prod(leading dims)
    dW = gemm(dy2.T, x.reshape(-1, n_in))   # (out, in)
    grads = {"weight": dW}
    if has_bias:
        # y += b           =>  db = sum of dy over every leading dim
        grads["bias"] = dy2.sum(axis=0)
    return dx, grads


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def linear_jvp(x, W, b, x_dot):
    """Tangent of y = x W^T + b along x_dot (the weights are not perturbed):
        y_dot = x_dot W^T                          (the bias is a constant: no tangent)
    x, x_dot: (..., in) -> (y, y_dot (..., out), cache)."""
    y, cache = linear_forward(x, W, b)
    y_dot, cache_dot = linear_forward(x_dot, W)
    return y, y_dot, (cache, cache_dot)


def linear_jvp_backward(dy, dy_dot, cache):
    """Backward of (y, y_dot) = linear_jvp(x, W, b, x_dot) -> (dx, dx_dot, grads).
    y = x W^T + b  and  y_dot = x_dot W^T  share W:  dW = dy^T x + dy_dot^T x_dot."""
    cache, cache_dot = cache
    dx, grads = linear_backward(dy, cache)
    dx_dot, g_dot = linear_backward(dy_dot, cache_dot)
    grads["weight"] = grads["weight"] + g_dot["weight"]
    return dx, dx_dot, grads
