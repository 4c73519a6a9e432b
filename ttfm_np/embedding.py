"""Time embeddings: one time (teacher) or two times (TTFM student); docs/method.md section 6.1.

Sinusoidal features of a time t in [0, 1] (positional encoding of scale * t):

    f = [cos(scale t w_0), ..., cos(scale t w_{h-1}), sin(scale t w_0), ..., sin(scale t w_{h-1})]
    w_i = max_period^(-i / h),  h = dim / 2

E(t) = fc1(silu(fc0(f(t))))           the teacher's embedding (an MLP)

Two-timed student (docs/method.md section 3): with the teacher's E reused,

    e(s, t) = E(s) + W_d E(t - s)      W_d (E_dim, E_dim), zero-initialised,

so at initialisation e(s, t) = E(s) and the student equals the teacher.
Parameter names: {prefix}.fc0.weight/bias, {prefix}.fc1.weight/bias and, for
two-time models, {prefix}.delta.weight.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .activations import silu_backward, silu_forward
from .linear import linear_backward, linear_forward
from .params import accumulate_all, linear_weight


def sinusoidal_features(t, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
    """t (N,) -> (N, dim) features; no parameters, no gradient needed w.r.t. t."""
    xp = backend.array_module(t)
    half = dim // 2
    # math.log: a Python float keeps t's dtype (np.log's float64 scalar would promote float32 to float64)
    freqs = xp.exp(-math.log(max_period) * xp.arange(half, dtype=t.dtype) / half)  # (h,)
    args = (scale * t)[:, None] * freqs[None, :]                                   # (N, h)
    return xp.concatenate([xp.cos(args), xp.sin(args)], axis=1)


def init_time_embedding(rng, prefix: str, feat_dim: int, emb_dim: int, two_time: bool):
    p = {
        f"{prefix}.fc0.weight": linear_weight(rng, emb_dim, feat_dim),
        f"{prefix}.fc0.bias": np.zeros(emb_dim, np.float32),
        f"{prefix}.fc1.weight": linear_weight(rng, emb_dim, emb_dim),
        f"{prefix}.fc1.bias": np.zeros(emb_dim, np.float32),
    }
    if two_time:
        p[f"{prefix}.delta.weight"] = np.zeros((emb_dim, emb_dim), np.float32)   # W_d = 0: warm start
    return p


def _mlp_forward(params, prefix, t, feat_dim, scale):
    """E(t) for t (N,) -> (N, emb_dim)."""
    f = sinusoidal_features(t, feat_dim, scale).astype(params[f"{prefix}.fc0.weight"].dtype)
    h, c0 = linear_forward(f, params[f"{prefix}.fc0.weight"], params[f"{prefix}.fc0.bias"])
    a, cs = silu_forward(h)
    e, c1 = linear_forward(a, params[f"{prefix}.fc1.weight"], params[f"{prefix}.fc1.bias"])
    return e, (c0, cs, c1)


def _mlp_backward(de, cache, prefix, grads):
    """Adds E's parameter gradients into grads (E is evaluated twice in a two-time embedding)."""
    c0, cs, c1 = cache
    # e = fc1(a)
    da, g = linear_backward(de, c1)
    accumulate_all(grads, g, f"{prefix}.fc1")
    # a = silu(h)
    dh, _ = silu_backward(da, cs)
    # h = fc0(f)      (f depends on t only: no gradient needed)
    _, g = linear_backward(dh, c0)
    accumulate_all(grads, g, f"{prefix}.fc0")


def time_embedding_forward(params, prefix: str, s, t=None, feat_dim: int = 128, scale: float = 1000.0):
    """e = E(s) (one time) or E(s) + W_d E(t - s) (two times). s, t: (N,)."""
    e, cache_s = _mlp_forward(params, prefix, s, feat_dim, scale)
    if t is None:
        return e, (prefix, cache_s, None, None)
    Wd = params.get(f"{prefix}.delta.weight")
    if Wd is None:
        raise ValueError("two times were given but the model has no delta projection "
                         "(it was built as a one-time teacher; use ttfm.student_from_teacher)")
    e_delta, cache_d = _mlp_forward(params, prefix, t - s, feat_dim, scale)
    proj, cache_p = linear_forward(e_delta, Wd)            # W_d E(t - s)
    return e + proj, (prefix, cache_s, cache_d, cache_p)


def time_embedding_backward(de, cache):
    """de (N, emb_dim) -> (None, grads), grads with full names ({prefix}.fc0.weight, ...).

    The input gradient is None: the times s, t are not trained and nothing
    upstream needs d e / d s, so it is never computed.
    """
    prefix, cache_s, cache_d, cache_p = cache
    grads = {}
    _mlp_backward(de, cache_s, prefix, grads)               # e = E(s) + ...
    if cache_d is not None:
        # e = ... + W_d E(t - s)
        de_delta, g = linear_backward(de, cache_p)
        accumulate_all(grads, g, f"{prefix}.delta")
        _mlp_backward(de_delta, cache_d, prefix, grads)    # E's second use: gradients add up
    return None, grads


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) in the time inputs, and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def sinusoidal_features_jvp(t, t_dot, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
    """f(t) and its tangent along t_dot (N,): with a_i = scale t w_i,
        d cos(a_i) = -sin(a_i) scale w_i t_dot,   d sin(a_i) = cos(a_i) scale w_i t_dot."""
    xp = backend.array_module(t)
    half = dim // 2
    # math.log: a Python float keeps t's dtype (np.log's float64 scalar would promote float32 to float64)
    freqs = xp.exp(-math.log(max_period) * xp.arange(half, dtype=t.dtype) / half)  # (h,)
    args = (scale * t)[:, None] * freqs[None, :]                                   # (N, h)
    args_dot = (scale * t_dot)[:, None] * freqs[None, :]                           # (N, h)
    cos, sin = xp.cos(args), xp.sin(args)
    return xp.concatenate([cos, sin], axis=1), xp.concatenate([-sin * args_dot, cos * args_dot], axis=1)


def _mlp_jvp(params, prefix, t, t_dot, feat_dim, scale):
    """E(t) and its tangent: f -> fc0 -> silu -> fc1, each with its jvp."""
    from .activations import silu_jvp
    from .linear import linear_jvp
    dtype = params[f"{prefix}.fc0.weight"].dtype
    f, f_dot = sinusoidal_features_jvp(t, t_dot, feat_dim, scale)
    h, h_dot, c0 = linear_jvp(f.astype(dtype), params[f"{prefix}.fc0.weight"], params[f"{prefix}.fc0.bias"],
                              f_dot.astype(dtype))
    a, a_dot, cs = silu_jvp(h, h_dot)
    e, e_dot, c1 = linear_jvp(a, params[f"{prefix}.fc1.weight"], params[f"{prefix}.fc1.bias"], a_dot)
    return e, e_dot, (c0, cs, c1)


def _mlp_jvp_backward(de, de_dot, cache, prefix, grads):
    """Adds E's parameter gradients (from both e and e_dot) into grads."""
    from .activations import silu_jvp_backward
    from .linear import linear_jvp_backward
    c0, cs, c1 = cache
    da, da_dot, g = linear_jvp_backward(de, de_dot, c1)               # e = fc1(a)
    accumulate_all(grads, g, f"{prefix}.fc1")
    dh, dh_dot, _ = silu_jvp_backward(da, da_dot, cs)                 # a = silu(h)
    _, _, g = linear_jvp_backward(dh, dh_dot, c0)                     # h = fc0(f): f, f_dot are constants
    accumulate_all(grads, g, f"{prefix}.fc0")


def time_embedding_jvp(params, prefix: str, s, s_dot, t=None, t_dot=None, feat_dim: int = 128,
                       scale: float = 1000.0):
    """(e, e_dot, cache): e = E(s) [+ W_d E(t - s)] and its tangent along the times,
        e_dot = E'(s) s_dot [+ W_d E'(t - s) (t_dot - s_dot)]."""
    from .linear import linear_jvp
    e, e_dot, cache_s = _mlp_jvp(params, prefix, s, s_dot, feat_dim, scale)
    if t is None:
        return e, e_dot, (prefix, cache_s, None, None)
    Wd = params.get(f"{prefix}.delta.weight")
    if Wd is None:
        raise ValueError("two times were given but the model has no delta projection "
                         "(it was built as a one-time teacher; use ttfm.student_from_teacher)")
    e_d, e_d_dot, cache_d = _mlp_jvp(params, prefix, t - s, t_dot - s_dot, feat_dim, scale)
    proj, proj_dot, cache_p = linear_jvp(e_d, Wd, None, e_d_dot)
    return e + proj, e_dot + proj_dot, (prefix, cache_s, cache_d, cache_p)


def time_embedding_jvp_backward(de, de_dot, cache):
    """-> (None, None, grads): like time_embedding_backward, no gradient w.r.t. the times."""
    from .linear import linear_jvp_backward
    prefix, cache_s, cache_d, cache_p = cache
    grads = {}
    _mlp_jvp_backward(de, de_dot, cache_s, prefix, grads)
    if cache_d is not None:
        # e = ... + W_d E(t - s)
        dd, dd_dot, g = linear_jvp_backward(de, de_dot, cache_p)
        accumulate_all(grads, g, f"{prefix}.delta")
        _mlp_jvp_backward(dd, dd_dot, cache_d, prefix, grads)
    return None, None, grads
