"""Flow matching (docs/method.md sections 1-2): interpolant, loss, time samplers, ODE solvers.

Convention: t in [0, 1], t = 0 noise x0 ~ N(0, I), t = 1 data x1.
    x_t = (1 - t) x0 + t x1,   target velocity  x1 - x0
    L_FM = E_{t, x0, x1} || v(x_t, t) - (x1 - x0) ||^2   (mean over non-batch dims, then batch)

Sampling integrates dx/dt = v(x, t) from 0 to 1 on a grid (uniform or given):
    euler:  x <- x + h v(x, t)                                        1 evaluation per step
    heun:   k1 = v(x, t), k2 = v(x + h k1, t + h), x <- x + h (k1 + k2) / 2   2 per step
    rk4:    classical Runge-Kutta                                     4 per step
The evaluation's reference solution is Heun with many steps (default 256).
"""
from __future__ import annotations

import numpy as np

from . import backend

SOLVERS = ("euler", "heun", "rk4")


def bcast(t, x):
    """Per-sample times (N,) -> (N, 1, ..., 1) to broadcast against x (N, ...)."""
    return t.reshape((-1,) + (1,) * (x.ndim - 1))


def interpolate(x0, x1, t):
    """x_t = (1 - t) x0 + t x1, with t (N,) broadcast over each sample."""
    tb = bcast(t, x0)
    return (1 - tb) * x0 + tb * x1


def sample_times(rng, n: int, kind: str = "uniform", mean: float = 0.0, std: float = 1.0):
    """t ~ U[0, 1] or logit-normal: t = sigmoid(mean + std * N(0, 1)) (Esser et al. 2024)."""
    if kind == "uniform":
        return rng.random(n)
    if kind == "logit_normal":
        z = mean + std * rng.standard_normal(n)
        xp = backend.array_module(z)
        return 1.0 / (1.0 + xp.exp(-z))
    raise ValueError(f"unknown time sampling {kind!r}: use uniform or logit_normal")


def flow_matching_loss_and_grad(v_pred, x0, x1):
    """L = mean_n mean_d (v - (x1 - x0))^2 and dL/dv = 2 (v - (x1 - x0)) / (N D)."""
    r = v_pred - (x1 - x0)
    loss = float((r * r).mean())
    return loss, (2.0 / r.size) * r


def make_grid(n_steps=None, grid=None, t0: float = 0.0, t1: float = 1.0):
    """A validated monotone grid: n_steps uniform steps from t0 to t1, or the given times."""
    if grid is None:
        if n_steps is None or int(n_steps) != n_steps or n_steps < 1:
            raise ValueError(f"the number of ODE steps must be an integer >= 1, got {n_steps}")
        return np.linspace(t0, t1, int(n_steps) + 1)
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or g.size < 2:
        raise ValueError("a time grid needs at least two points, e.g. 0,0.5,1")
    if g.min() < 0 or g.max() > 1:
        raise ValueError(f"grid times must lie in [0, 1], got {g.tolist()}")
    d = np.diff(g)
    if not (np.all(d > 0) or np.all(d < 0)):
        raise ValueError(f"the grid must be strictly monotone, got {g.tolist()}")
    return g


def _step(velocity_fn, x, a, b, method):
    xp = backend.array_module(x)
    n = x.shape[0]
    ta = xp.full((n,), a, dtype=x.dtype)
    h = b - a
    if method == "euler":
        return x + h * velocity_fn(x, ta)
    tb = xp.full((n,), b, dtype=x.dtype)
    if method == "heun":
        k1 = velocity_fn(x, ta)
        k2 = velocity_fn(x + h * k1, tb)
        return x + (0.5 * h) * (k1 + k2)
    tm = xp.full((n,), a + 0.5 * h, dtype=x.dtype)
    k1 = velocity_fn(x, ta)
    k2 = velocity_fn(x + (0.5 * h) * k1, tm)
    k3 = velocity_fn(x + (0.5 * h) * k2, tm)
    k4 = velocity_fn(x + h * k3, tb)
    return x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)


def solve_ode(velocity_fn, x, grid=None, n_steps=None, method: str = "euler", t0: float = 0.0,
              t1: float = 1.0, progress: bool = False):
    """Integrate dx/dt = velocity_fn(x, t_vec) along the grid; returns x at the grid's end.

    t0 > t1 (or a decreasing grid) integrates backwards, data -> noise.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown ODE solver {method!r}: use one of {', '.join(SOLVERS)}")
    g = make_grid(n_steps, grid, t0, t1)
    pairs = list(zip(g[:-1], g[1:]))
    if progress:
        from .progress import Progress
        for a, b in Progress.iterate(pairs, f"{method} {len(pairs)} steps"):
            x = _step(velocity_fn, x, float(a), float(b), method)
        return x
    for a, b in pairs:
        x = _step(velocity_fn, x, float(a), float(b), method)
    return x


def nfe(method: str, n_steps: int) -> int:
    """Network evaluations of n_steps steps (Heun evaluates twice every step, the last too)."""
    return {"euler": 1, "heun": 2, "rk4": 4}[method] * int(n_steps)

