"""Two-timed flow model (TTFM): the student phi(x, s, t) (docs/method.md section 3).

    phi_theta(x, s, t) = x + (t - s) * u_theta(x, s, t)

u_theta is a two-time network (model.py with cfg.two_time=True): an *average
velocity* over [s, t]. By construction phi(x, s, s) = x exactly. Few-step
sampling on a grid 0 = tau_0 < ... < tau_N = 1 applies x <- phi(x, tau_k, tau_{k+1}),
one network evaluation per step; a decreasing grid maps data back toward noise.

Warm start: the student copies the teacher's weights and adds W_d = 0 to the
time embedding, so at step 0  u(x, s, t) = v(x, s)  for every t.
"""
from __future__ import annotations

import dataclasses

from . import backend
from .flow import bcast, make_grid
from .model import model_backward, model_forward


def student_config(teacher_cfg):
    """The student's config: the teacher's architecture, conditioned on two times."""
    if teacher_cfg.two_time:
        raise ValueError("the teacher is already a two-time model: pass a flow-matching teacher checkpoint")
    return dataclasses.replace(teacher_cfg, two_time=True)


def student_from_teacher(teacher_params, teacher_cfg):
    """(params, cfg) of a student warm-started from the teacher (W_d = 0)."""
    cfg = student_config(teacher_cfg)
    params = {k: v.copy() for k, v in teacher_params.items()}
    w = params["emb.fc1.weight"]                      # (E, E): the embedding width
    xp = backend.array_module(w)
    params["emb.delta.weight"] = xp.zeros((w.shape[0], w.shape[0]), dtype=w.dtype)
    return params, cfg


def phi_forward(params, cfg, x, s, t, dropout_seed=None, need_grad: bool = True):
    """phi(x, s, t) = x + (t - s) u(x, s, t). x (N, ...), s, t (N,).

    Returns (phi, cache), or (phi, None) when need_grad is False (see model_forward)."""
    u, cache = model_forward(params, cfg, x, s, t, dropout_seed, need_grad)
    gap = bcast(t - s, x)
    return x + gap * u, ((cache, gap) if need_grad else None)


def phi_backward(dphi, cache):
    """-> dx, grads.  phi = x + gap * u(x)  =>  dx = dphi + du/dx^T (gap * dphi)."""
    if cache is None:
        raise ValueError("this evaluation kept no cache: call phi_forward with need_grad=True")
    net_cache, gap = cache
    dx_net, grads = model_backward(gap * dphi, net_cache)
    return dphi + dx_net, grads


def sample(params, cfg, x, n_steps: int | None = None, grid=None):
    """Apply phi along the grid: N network evaluations for an N-step grid.

    x: (N, ...) noise at grid[0] (default 0) -> samples at grid[-1] (default 1).
    """
    g = make_grid(n_steps, grid)
    xp = backend.array_module(x)
    for a, b in zip(g[:-1], g[1:]):
        s = xp.full((x.shape[0],), a, dtype=x.dtype)
        t = xp.full((x.shape[0],), b, dtype=x.dtype)
        x, _ = phi_forward(params, cfg, x, s, t, need_grad=False)
    return x


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def phi_jvp(params, cfg, x, s, t, x_dot, s_dot, t_dot, dropout_seed=None, need_grad: bool = True):
    """(phi, phi_dot, cache): phi(x, s, t) = x + (t - s) u(x, s, t) and its tangent
        phi_dot = x_dot + (t_dot - s_dot) u + (t - s) u_dot,    u_dot = model_jvp's tangent.
    E.g. (x_dot, s_dot, t_dot) = (0, 0, 1) gives d/dt phi exactly. Times' tangents: (N,) or numbers."""
    from .model import model_jvp, time_tangent
    s_dot, t_dot = time_tangent(s_dot, s), time_tangent(t_dot, t)
    u, u_dot, cache = model_jvp(params, cfg, x, s, t, x_dot, s_dot, t_dot, dropout_seed, need_grad)
    gap, gap_dot = bcast(t - s, x), bcast(t_dot - s_dot, x)
    phi = x + gap * u
    phi_dot = x_dot + gap_dot * u + gap * u_dot
    return phi, phi_dot, ((cache, gap, gap_dot) if need_grad else None)


def phi_jvp_backward(dphi, dphi_dot, cache):
    """-> (dx, dx_dot, grads) for a loss of (phi, phi_dot):
        phi = x + gap u           =>  du  = gap dphi,  dx = dphi + ...
        phi_dot = x_dot + gap_dot u + gap u_dot   =>  du += gap_dot dphi_dot,  du_dot = gap dphi_dot"""
    from .model import model_jvp_backward
    if cache is None:
        raise ValueError("this evaluation kept no cache: call phi_jvp with need_grad=True")
    net_cache, gap, gap_dot = cache
    dx_net, dx_dot_net, grads = model_jvp_backward(gap * dphi + gap_dot * dphi_dot, gap * dphi_dot, net_cache)
    return dphi + dx_net, dphi_dot + dx_dot_net, grads
