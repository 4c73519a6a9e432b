"""What the training loop optimises: the teacher's flow-matching objective and
the student's distillation objective. Each turns a data batch x1, the step's
host random Generator and its dropout seed into (loss, grads, metrics), and
can write samples.

Noise and times are drawn on the host (numpy) and then moved to x1's device:
the same seed gives the same numbers on a CPU and on a GPU, and the draws are
tiny next to a network pass.
"""
from __future__ import annotations

import numpy as np

from . import backend, flow, losses, ttfm
from .images import save_image_grid, save_scatter
from .model import model_backward, model_forward


def _to_device_like(a, like):
    """A host array -> like's device and dtype."""
    return backend.to_device(a, backend.array_module(like)).astype(like.dtype, copy=False)


def _noise(rng, like):
    """x0 ~ N(0, I) with like's shape, drawn on the host."""
    return _to_device_like(rng.standard_normal(like.shape), like)


def _fixed_noise(cfg, params, sample_kind):
    """The same noise at every save (seed 0), so progress pictures are comparable across steps."""
    like = params["emb.fc0.weight"]
    n = 1000 if sample_kind in ("toy", "points") else 64
    return _to_device_like(np.random.default_rng(0).standard_normal((n,) + cfg.sample_shape), like)


def _save_samples(x, path, sample_kind, heldout, title):
    if sample_kind in ("toy", "points"):             # points of any d: images.plane draws two coordinates
        save_scatter(x, path, reference=heldout, title=title)
    else:
        save_image_grid(x[:64], path, upscale=2)


class FlowMatchingObjective:
    """L_FM = E || v(x_t, t) - (x1 - x0) ||^2,  x_t = (1 - t) x0 + t x1."""

    def __init__(self, cfg, time_sampling="uniform", sample_kind="image", heldout=None, sample_steps=None):
        self.cfg, self.time_sampling = cfg, time_sampling
        self.sample_kind, self.heldout = sample_kind, heldout
        # progress pictures: 32 Heun steps for 2-D points, 10 for images (64 U-Net passes each is costly on a CPU)
        self.sample_steps = sample_steps or (32 if sample_kind in ("toy", "points") else 10)

    def loss_and_grads(self, params, ema, x1, rng, dropout_seed):
        x0 = _noise(rng, x1)
        t = _to_device_like(flow.sample_times(rng, x1.shape[0], kind=self.time_sampling), x1)
        x_t = flow.interpolate(x0, x1, t)
        v, cache = model_forward(params, self.cfg, x_t, t, None, dropout_seed)
        loss, dv = flow.flow_matching_loss_and_grad(v, x0, x1)
        _, grads = model_backward(dv, cache)
        return float(loss), grads, {}

    def save_samples(self, params, path):
        z = _fixed_noise(self.cfg, params, self.sample_kind)
        velocity = lambda x, t: model_forward(params, self.cfg, x, t, need_grad=False)[0]
        x = flow.solve_ode(velocity, z, n_steps=self.sample_steps, method="heun")
        _save_samples(x, path, self.sample_kind, self.heldout, f"teacher heun {self.sample_steps}")


def sample_time_pairs(rng, n, frac_t1=0.0, max_gap=None, pairs="minmax"):
    """n time pairs 0 <= s <= t <= 1, on the host (float64 numpy).

    pairs="minmax":      s = min(a, b), t = max(a, b), a, b ~ U[0, 1]: the gap g = t - s has
                         density 2 (1 - g), so few pairs train the long jumps few-step sampling makes.
    pairs="uniform-gap": g ~ U[0, 1], s ~ U[0, 1 - g], t = s + g: every gap equally often (the
                         long ones then start near s = 0, like the 1-step jump (0, 1)).
    frac_t1: fraction of pairs whose t is set to 1 (trains the jumps sampling uses).
    max_gap: restrict t - s <= max_gap by shrinking the gap (t = s + min(t - s, max_gap)).
    """
    a = rng.random(n)
    b = rng.random(n)
    if pairs == "minmax":
        s, t = np.minimum(a, b), np.maximum(a, b)
    elif pairs == "uniform-gap":
        s = (1.0 - a) * b                      # a = gap
        t = s + a
    else:
        raise ValueError(f"unknown time-pair sampling {pairs!r}; choose minmax or uniform-gap")
    if frac_t1 > 0:
        t = np.where(rng.random(n) < frac_t1, 1.0, t)
    if max_gap is not None:
        t = s + np.minimum(t - s, max_gap)
    return s, t


class DistillObjective:
    """Distillation of a frozen teacher into the two-timed student (losses.py)."""

    def __init__(self, student_cfg, teacher, loss_opts: losses.DistillLossConfig,
                 sample_kind="image", heldout=None, sample_steps=(1, 2, 4)):
        self.cfg, self.teacher, self.opts = student_cfg, teacher, loss_opts.validate()
        self.sample_kind, self.heldout, self.sample_steps = sample_kind, heldout, sample_steps

    def loss_and_grads(self, params, ema, x1, rng, dropout_seed):
        x0 = _noise(rng, x1)
        s, t = sample_time_pairs(rng, x1.shape[0], self.opts.frac_t1, self.opts.max_gap, self.opts.pairs)
        s, t = _to_device_like(s, x1), _to_device_like(t, x1)
        x_s = flow.interpolate(x0, x1, s)
        return losses.distill_loss((params, self.cfg), (ema, self.cfg), self.teacher, x_s, s, t, self.opts,
                                   dropout_seed)

    def save_samples(self, params, path):
        z = _fixed_noise(self.cfg, params, self.sample_kind)
        x = ttfm.sample(params, self.cfg, z, n_steps=self.sample_steps[0])
        _save_samples(x, path, self.sample_kind, self.heldout, f"student {self.sample_steps[0]}-step")
