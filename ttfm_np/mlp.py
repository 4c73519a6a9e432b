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
from .params import accumulate, linear_weight


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

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


PRESETS = {
    "tiny": dict(hidden=16, depth=2, emb_features=8),
    "mlp": dict(hidden=256, depth=4, emb_features=64),
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


def mlp_forward(params, cfg: MLPConfig, x, s, t=None, rng=None):
    """u(x, s[, t]); rng is accepted for interface parity with the U-Net (no dropout here)."""
    if x.ndim != 2 or x.shape[1] != cfg.dim:
        raise ValueError(f"MLP built for inputs (N, {cfg.dim}), got {tuple(x.shape)}")
    if (t is not None) != cfg.two_time:
        raise ValueError("a two-time model needs both s and t; a one-time model takes only t"
                         if cfg.two_time else "this is a one-time (teacher) MLP: call it with one time")
    e, c_emb = time_embedding_forward(params, "emb", s, t, cfg.emb_features, cfg.time_scale)
    e_act, c_eact = silu_forward(e)
    a, c_in = linear_forward(x, params["in.weight"], params["in.bias"])
    b, c_in_emb = linear_forward(e_act, params["in_emb.weight"])
    h, c_act = silu_forward(a + b)
    layer_caches = [(c_in, c_in_emb, c_act)]
    for k in range(1, cfg.depth):
        z, c_lin = linear_forward(h, params[f"hidden{k}.weight"], params[f"hidden{k}.bias"])
        h, c_act = silu_forward(z)
        layer_caches.append((c_lin, c_act))
    u, c_out = linear_forward(h, params["out.weight"], params["out.bias"])
    return u, (c_emb, c_eact, layer_caches, c_out)


def mlp_backward(du, cache, params, cfg: MLPConfig):
    """du (N, D) -> dx (N, D), grads."""
    c_emb, c_eact, layer_caches, c_out = cache
    grads = {}
    # u = W_out h + b_out
    dh, dW, db = linear_backward(du, c_out)
    accumulate(grads, "out.weight", dW)
    accumulate(grads, "out.bias", db)
    for k in reversed(range(1, cfg.depth)):
        c_lin, c_act = layer_caches[k]
        # h_k = silu(W_k h_{k-1} + b_k)
        dz = silu_backward(dh, c_act)
        dh, dW, db = linear_backward(dz, c_lin)
        accumulate(grads, f"hidden{k}.weight", dW)
        accumulate(grads, f"hidden{k}.bias", db)
    c_in, c_in_emb, c_act = layer_caches[0]
    # h0 = silu(W_in x + b_in + W_emb silu(e))
    dz = silu_backward(dh, c_act)
    dx, dW, db = linear_backward(dz, c_in)
    accumulate(grads, "in.weight", dW)
    accumulate(grads, "in.bias", db)
    de_act, dW, _ = linear_backward(dz, c_in_emb)
    accumulate(grads, "in_emb.weight", dW)
    de = silu_backward(de_act, c_eact)
    time_embedding_backward(de, c_emb, "emb", grads)
    return dx, grads
