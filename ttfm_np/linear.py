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
