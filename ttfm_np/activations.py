"""Element-wise activations and their derivatives.

SiLU (a.k.a. swish): silu(x) = x * sigmoid(x)
    d silu / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x))) = s + y (1 - s),   s = sigmoid(x), y = silu(x)

The forward keeps s in the cache, so the backward needs no second sigmoid:
the transcendental function is the costliest pass of the MLP's SiLU layers on
a CPU without AVX-512 (docs/benchmarks.md). Two equal formulas for sigmoid
run at different speeds depending on which SIMD loops NumPy uses on this CPU;
SIGMOID_FORM is chosen once, at import, from what NumPy reports.
"""
from __future__ import annotations

import numpy as np

from . import backend


def numpy_uses_avx512() -> bool:
    """True when NumPy's ufuncs dispatch to their AVX-512 loops here (np.show_runtime's 'found' list;
    NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" turns them off, as on an AVX2-only CPU)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found     # NumPy >= 2
    except ImportError:                                                          # pragma: no cover (NumPy 1.x)
        from numpy.core._multiarray_umath import __cpu_features__ as found
    # NumPy 2.4 names the AVX-512 level X86_V4; earlier releases AVX512_SKX
    return bool(found.get("X86_V4", found.get("AVX512_SKX", False)))


# Measured on 4096 x 256 float32 (benchmarks/sigmoid_forms.py; docs/benchmarks.md, "CPU at two SIMD
# levels"): with AVX-512 loops the tanh form is faster (0.60 vs 0.76 ms, AMD Zen 4); with AVX2 loops the
# exp form is as fast or faster (1.44 vs 1.49 ms on Zen 4 with AVX-512 disabled, 2.0 vs 3.3 ms on an
# AVX2-only Zen 3).
SIGMOID_FORM = "tanh" if numpy_uses_avx512() else "exp"


def _sigmoid_tanh(x, xp, out=None):
    # 1 / (1 + e^-x) = (tanh(x / 2) + 1) / 2, computed in place in one buffer
    s = xp.multiply(x, 0.5, out=out)
    xp.tanh(s, out=s)
    s += 1.0
    s *= 0.5
    return s


def _sigmoid_exp(x, out=None):
    # 1 / (1 + e^-x), in place in one buffer; e^-x overflows to inf for x < -88 (float32),
    # where 1 / (1 + inf) = 0 is the correctly rounded answer, and underflows to 0 for x > 88,
    # where 1 / (1 + 0) = 1 is; so both warnings are silenced
    s = np.negative(x, out=out)
    with np.errstate(over="ignore", under="ignore"):
        np.exp(s, out=s)
    s += 1.0
    np.divide(1.0, s, out=s)
    return s


def sigmoid(x, form: str | None = None, out=None):
    """sigmoid(x) = 1 / (1 + e^-x) in a new array (or in `out`, like x); form 'tanh' or 'exp' (default
    SIGMOID_FORM; the GPU always takes the tanh form, the choice is about NumPy's CPU loops)."""
    xp = backend.array_module(x)
    form = form or SIGMOID_FORM
    if form not in ("tanh", "exp"):
        raise ValueError(f"sigmoid: form must be 'tanh' or 'exp', got {form!r}")
    if form == "exp" and not backend.is_cupy(xp):
        return _sigmoid_exp(x, out)
    return _sigmoid_tanh(x, xp, out)


def silu_forward(x, overwrite_x: bool = False):
    """y = x * sigmoid(x) -> (y, cache = (y, s)). The backward reads s = sigmoid(x) and y from the
    cache instead of recomputing the sigmoid (the caller must not write into y afterwards, as for
    every layer output that a later layer caches). overwrite_x=True writes y into x's buffer: for
    a pre-activation that is a fresh temporary nobody else holds (the MLP's), one allocation less."""
    s = sigmoid(x)
    if overwrite_x:
        x *= s                                             # y = x * s, in x's buffer
        return x, (x, s)
    y = x * s
    return y, (y, s)


def silu_backward(dy, cache):
    """-> dx, {} (the common backward contract; SiLU has no parameters)."""
    y, s = cache
    xp = backend.array_module(dy)
    # y = x * s(x)  =>  dy/dx = s + x s (1 - s) = s + y (1 - s): four in-place passes, one buffer
    g = xp.subtract(1.0, s)
    g *= y
    g += s
    g *= dy
    return g, {}          # no parameters: an empty grads dict


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def silu_derivative(x):
    """silu'(x) = s (1 + x (1 - s)),  s = sigmoid(x)."""
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def silu_derivatives(x):
    """(silu'(x), silu''(x)) from ONE sigmoid s = sigmoid(x):
        silu'(x)  = s (1 + x (1 - s))
        silu''(x) = s (1 - s) (2 + x (1 - 2 s))     (d/dx of s + x s (1 - s), with s' = s (1 - s))"""
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s)), s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


def silu_jvp(x, x_dot):
    """y = silu(x),  y_dot = silu'(x) x_dot  (element-wise) -> (y, y_dot, cache)."""
    y, (_, s) = silu_forward(x)
    # silu'(x) = s + x s (1 - s) = s + y (1 - s), with the forward's s: no second sigmoid
    return y, (s + y * (1.0 - s)) * x_dot, (x, x_dot)


def silu_jvp_backward(dy, dy_dot, cache):
    """Backward of (y, y_dot) = silu_jvp(x, x_dot) -> (dx, dx_dot, {}):
        y = silu(x)              =>  dx     = dy silu'(x)
        y_dot = silu'(x) x_dot   =>  dx    += dy_dot silu''(x) x_dot,   dx_dot = dy_dot silu'(x)"""
    x, x_dot = cache
    d1, d2 = silu_derivatives(x)
    return dy * d1 + dy_dot * d2 * x_dot, dy_dot * d1, {}
