"""MLP velocity / average-velocity network for low-dimensional data (2-D toys).

    x (N, D), s (N,) [, t (N,)]  ->  u (N, D)

    e  = E(s)  or  E(s) + W_d E(t - s)          (embedding.py; the same as the U-Net's)
    h0 = silu(W_in x + W_emb silu(e) + b_in)    (N, H)
    h_k = silu(W_k h_{k-1} + b_k)              k = 1 .. depth - 1
    u  = W_out h + b_out                        (N, D), zero-initialised
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .activations import silu_backward, silu_forward
from .embedding import init_time_embedding, time_embedding_backward, time_embedding_forward
from .linear import linear_backward, linear_forward
from .params import linear_weight
from .tape import backprop, recorder


@dataclass
class MLPConfig:
    dim: int = 2                 # data dimension D
    hidden: int = 256            # hidden width H
    depth: int = 4               # number of hidden SiLU layers
    emb_features: int = 64       # sinusoidal time features (the embedding MLP is 2x wider)
    two_time: bool = False
    time_scale: float = 1000.0
    kind: str = field(default="mlp", repr=False)

    @property
    def emb_dim(self) -> int:
        return 2 * self.emb_features

    @property
    def sample_shape(self) -> tuple:
        """Shape of one data sample: (D,)."""
        return (self.dim,)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


PRESETS = {
    "tiny": dict(hidden=16, depth=2, emb_features=8),          # tests
    "small": dict(hidden=128, depth=3, emb_features=32),       # the quick main job (minutes on a laptop CPU)
    "mlp": dict(hidden=256, depth=4, emb_features=64),         # the full toy recipe
}


def init_mlp(cfg: MLPConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    p = init_time_embedding(rng, "emb", cfg.emb_features, cfg.emb_dim, cfg.two_time)
    p["in.weight"] = linear_weight(rng, cfg.hidden, cfg.dim)
    p["in.bias"] = np.zeros(cfg.hidden, f32)
    p["in_emb.weight"] = linear_weight(rng, cfg.hidden, cfg.emb_dim)
    for k in range(1, cfg.depth):
        p[f"hidden{k}.weight"] = linear_weight(rng, cfg.hidden, cfg.hidden)
        p[f"hidden{k}.bias"] = np.zeros(cfg.hidden, f32)
    p["out.weight"] = np.zeros((cfg.dim, cfg.hidden), f32)
    p["out.bias"] = np.zeros(cfg.dim, f32)
    return p


def mlp_forward(params, cfg: MLPConfig, x, s, t=None, dropout_seed=None, need_grad: bool = True):
    """u(x, s[, t]) -> (u (N, D), cache). The MLP has no dropout: dropout_seed is accepted
    for interface parity with the U-Net. need_grad=False returns (u, None) and keeps no cache."""
    if x.ndim != 2 or x.shape[1] != cfg.dim:
        raise ValueError(f"MLP built for inputs (N, {cfg.dim}), got {tuple(x.shape)}")
    if (t is not None) != cfg.two_time:
        raise ValueError("a two-time model needs both s and t; a one-time model takes only t"
                         if cfg.two_time else "this is a one-time (teacher) MLP: call it with one time")
    caches = {}                                  # layer name -> cache (stays empty when need_grad is False)
    run = recorder(caches, need_grad)

    e = run("emb", time_embedding_forward(params, "emb", s, t, cfg.emb_features, cfg.time_scale))
    e_act = run("emb_act", silu_forward(e))
    a = run("in", linear_forward(x, params["in.weight"], params["in.bias"]))
    a += run("in_emb", linear_forward(e_act, params["in_emb.weight"]))
    # the pre-activations a and z are fresh temporaries that no cache holds: SiLU overwrites them
    h = run("act0", silu_forward(a, overwrite_x=True))
    for k in range(1, cfg.depth):
        z = run(f"hidden{k}", linear_forward(h, params[f"hidden{k}.weight"], params[f"hidden{k}.bias"]))
        h = run(f"act{k}", silu_forward(z, overwrite_x=True))
    u = run("out", linear_forward(h, params["out.weight"], params["out.bias"]))
    if not need_grad:
        return u, None
    return u, dict(layers=caches, depth=cfg.depth)


def mlp_backward(du, cache):
    """du (N, D) -> dx (N, D), grads (dict like params, full names)."""
    caches = cache["layers"]
    grads = {}
    back = backprop(caches, grads)               # grads[layer name.key] += the layer's local grads

    # u = W_out h + b_out
    dh = back("out", du, linear_backward)
    for k in reversed(range(1, cache["depth"])):
        # h_k = silu(W_k h_{k-1} + b_k)
        dh = back(f"hidden{k}", back(f"act{k}", dh, silu_backward), linear_backward)
    # h0 = silu(W_in x + b_in + W_emb silu(e))
    dz = back("act0", dh, silu_backward)
    dx = back("in", dz, linear_backward)
    de_act = back("in_emb", dz, linear_backward)
    # silu(e), e = E(s) [+ W_d E(t - s)]   (no gradient w.r.t. the times)
    back("emb", back("emb_act", de_act, silu_backward), time_embedding_backward, full_names=True)
    return dx, grads


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def mlp_jvp(params, cfg: MLPConfig, x, s, t, x_dot, s_dot, t_dot=None, dropout_seed=None, need_grad: bool = True):
    """(u, u_dot, cache): u(x, s[, t]) and its tangent along (x_dot, s_dot[, t_dot]); every line of
    mlp_forward with each layer replaced by its jvp. s_dot, t_dot: (N,) arrays."""
    from .activations import silu_jvp
    from .embedding import time_embedding_jvp
    from .linear import linear_jvp
    from .tape import jvp_recorder
    if x.ndim != 2 or x.shape[1] != cfg.dim or x_dot.shape != x.shape:
        raise ValueError(f"MLP built for inputs (N, {cfg.dim}) and tangents of the same shape, "
                         f"got {tuple(x.shape)} and {tuple(x_dot.shape)}")
    if (t is not None) != cfg.two_time:
        raise ValueError("a two-time model needs both s and t; a one-time model takes only t"
                         if cfg.two_time else "this is a one-time (teacher) MLP: call it with one time")
    caches = {}
    run = jvp_recorder(caches, need_grad)
    e, ed = run("emb", time_embedding_jvp(params, "emb", s, s_dot, t, t_dot, cfg.emb_features, cfg.time_scale))
    ea, ead = run("emb_act", silu_jvp(e, ed))
    a, ad = run("in", linear_jvp(x, params["in.weight"], params["in.bias"], x_dot))
    b, bd = run("in_emb", linear_jvp(ea, params["in_emb.weight"], None, ead))
    h, hd = run("act0", silu_jvp(a + b, ad + bd))
    for k in range(1, cfg.depth):
        z, zd = run(f"hidden{k}", linear_jvp(h, params[f"hidden{k}.weight"], params[f"hidden{k}.bias"], hd))
        h, hd = run(f"act{k}", silu_jvp(z, zd))
    u, ud = run("out", linear_jvp(h, params["out.weight"], params["out.bias"], hd))
    if not need_grad:
        return u, ud, None
    return u, ud, dict(layers=caches, depth=cfg.depth)


def mlp_jvp_backward(du, du_dot, cache):
    """-> (dx, dx_dot, grads): gradients of a loss of (u, u_dot) w.r.t. x, x_dot and the parameters."""
    from .activations import silu_jvp_backward
    from .embedding import time_embedding_jvp_backward
    from .linear import linear_jvp_backward
    from .tape import jvp_backprop
    caches = cache["layers"]
    grads = {}
    back = jvp_backprop(caches, grads)
    dh, dh_dot = back("out", du, du_dot, linear_jvp_backward)
    for k in reversed(range(1, cache["depth"])):
        dh, dh_dot = back(f"hidden{k}", *back(f"act{k}", dh, dh_dot, silu_jvp_backward), linear_jvp_backward)
    dz, dz_dot = back("act0", dh, dh_dot, silu_jvp_backward)
    dx, dx_dot = back("in", dz, dz_dot, linear_jvp_backward)
    de, de_dot = back("in_emb", dz, dz_dot, linear_jvp_backward)
    back("emb", *back("emb_act", de, de_dot, silu_jvp_backward), time_embedding_jvp_backward, full_names=True)
    return dx, dx_dot, grads
