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
    b = run("in_emb", linear_forward(e_act, params["in_emb.weight"]))
    h = run("act0", silu_forward(a + b))
    for k in range(1, cfg.depth):
        z = run(f"hidden{k}", linear_forward(h, params[f"hidden{k}.weight"], params[f"hidden{k}.bias"]))
        h = run(f"act{k}", silu_forward(z))
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
