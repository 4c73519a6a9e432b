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


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def silu_derivative(x):
    """silu'(x) = s (1 + x (1 - s)),  s = sigmoid(x)."""
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def silu_second_derivative(x):
    """silu''(x) = s (1 - s) (2 + x (1 - 2 s)): d/dx of s + x s (1 - s), with s' = s (1 - s)."""
    s = sigmoid(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


def silu_jvp(x, x_dot):
    """y = silu(x),  y_dot = silu'(x) x_dot  (element-wise) -> (y, y_dot, cache)."""
    y, cache = silu_forward(x)
    return y, silu_derivative(x) * x_dot, (x, x_dot)


def silu_jvp_backward(dy, dy_dot, cache):
    """Backward of (y, y_dot) = silu_jvp(x, x_dot) -> (dx, dx_dot, {}):
        y = silu(x)              =>  dx     = dy silu'(x)
        y_dot = silu'(x) x_dot   =>  dx    += dy_dot silu''(x) x_dot,   dx_dot = dy_dot silu'(x)"""
    x, x_dot = cache
    d1 = silu_derivative(x)
    return dy * d1 + dy_dot * silu_second_derivative(x) * x_dot, dy_dot * d1, {}
