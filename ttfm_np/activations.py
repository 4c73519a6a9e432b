"""Element-wise activations and their derivatives.

SiLU (a.k.a. swish): silu(x) = x * sigmoid(x)
    d silu / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x)))
"""
from __future__ import annotations

from . import backend


def sigmoid(x):
    xp = backend.array_module(x)
    # 1 / (1 + e^-x) = (tanh(x / 2) + 1) / 2: no overflow warning for large |x|;
    # computed in place in one buffer (this runs on every GroupNorm+SiLU activation)
    s = xp.multiply(x, 0.5)
    xp.tanh(s, out=s)
    s += 1.0
    s *= 0.5
    return s


def silu_forward(x):
    """y = x * sigmoid(x); the cache keeps x (sigmoid is recomputed in backward)."""
    return x * sigmoid(x), x


def silu_backward(dy, cache):
    """-> dx, {} (the common backward contract; SiLU has no parameters)."""
    x = cache
    s = sigmoid(x)
    # y = x * s(x)  =>  dy/dx = s + x s (1 - s) = s (1 + x (1 - s))
    return dy * (s * (1.0 + x * (1.0 - s))), {}          # no parameters: an empty grads dict
