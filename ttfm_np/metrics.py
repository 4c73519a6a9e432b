"""Sample-quality numbers: flow-map error (MSE, PSNR) and distances between
2-D point clouds (sliced Wasserstein-2, energy distance)."""
from __future__ import annotations

import numpy as np

from . import backend


def mse(a, b) -> float:
    """Mean over samples of the per-sample mean squared difference."""
    a, b = backend.to_numpy(a).astype(np.float64), backend.to_numpy(b).astype(np.float64)
    return float(((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1).mean())


def psnr(a, b, data_range: float = 2.0) -> float:
    """10 log10(range^2 / MSE); images in [-1, 1] have range 2."""
    m = mse(a, b)
    return float("inf") if m == 0 else float(10.0 * np.log10(data_range ** 2 / m))


def sliced_w2(a, b, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2: sqrt(mean over random directions w of W2^2(a.w, b.w)).

    In 1-D, W2 between empirical measures matches quantiles: with equal sizes
    the sorted projections pair up; otherwise both are read at common quantile levels.
    """
    a, b = backend.to_numpy(a).astype(np.float64), backend.to_numpy(b).astype(np.float64)
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((a.shape[1], n_proj))
    w /= np.linalg.norm(w, axis=0, keepdims=True)               # unit directions (d, P)
    pa, pb = np.sort(a @ w, axis=0), np.sort(b @ w, axis=0)     # (Na, P), (Nb, P)
    if pa.shape[0] != pb.shape[0]:
        q = (np.arange(max(len(pa), len(pb))) + 0.5) / max(len(pa), len(pb))
        pa = np.quantile(pa, q, axis=0)
        pb = np.quantile(pb, q, axis=0)
    return float(np.sqrt(((pa - pb) ** 2).mean()))


def energy_distance(a, b) -> float:
    """E = 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistics, Szekely & Rizzo)."""
    a, b = backend.to_numpy(a).astype(np.float64), backend.to_numpy(b).astype(np.float64)

    def mean_dist(x, y):
        d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
        return float(np.sqrt(np.maximum(d2, 0)).mean())
    return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)
