"""Central finite differences in float64, used by every gradient test.

For a scalar loss L(theta) = sum(R * f(theta)) with a fixed random R, the
hand-written backward gives dL/dtheta; here each sampled entry is perturbed
by +-eps and (L+ - L-) / (2 eps) is the reference. The error is measured per
tensor over the sampled entries: ||analytic - numeric|| / max(||analytic||, ||numeric||).
"""
from __future__ import annotations

import numpy as np


def numeric_grad_entries(loss_fn, array, indices, eps=1e-6):
    """d loss / d array[idx] for each idx by central differences (array modified in place, restored)."""
    out = []
    for idx in indices:
        old = array[idx]
        array[idx] = old + eps
        lp = loss_fn()
        array[idx] = old - eps
        lm = loss_fn()
        array[idx] = old
        out.append((lp - lm) / (2 * eps))
    return np.array(out)


def sample_indices(shape, n_max, rng):
    size = int(np.prod(shape))
    flat = np.arange(size) if size <= n_max else rng.choice(size, n_max, replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def rel_error(a, b, floor=0.1):
    """||a - b|| / max(||a||, ||b||, floor).

    The floor matters only where the true gradient is (nearly) zero, e.g. the
    key bias of attention (softmax ignores a per-row constant): there the finite
    difference is pure round-off (~5e-9 for a loss of ~10 in float64) and the
    analytic value is 1e-16, so the check becomes an absolute one,
    ||a - b|| < floor * tol = 1e-7 at the default tol.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = max(np.linalg.norm(a), np.linalg.norm(b), floor)
    return float(np.linalg.norm(a - b) / denom)


def check_gradients(loss_fn, tensors: dict, analytic: dict, n_max=12, seed=0, eps=1e-5, tol=1e-6):
    """Compare analytic[name] with finite differences of loss_fn w.r.t. tensors[name].

    Returns {name: rel_error}; raises AssertionError listing every tensor over tol.
    Also asserts that each tensor's analytic gradient is not identically zero
    (a vanishing gradient would make the check pass vacuously).
    """
    rng = np.random.default_rng(seed)
    errors, bad = {}, []
    for name, arr in tensors.items():
        assert arr.dtype == np.float64, f"{name}: gradient checks run in float64"
        g = analytic[name]
        assert g is not None and g.shape == arr.shape, f"{name}: gradient shape {None if g is None else g.shape} != {arr.shape}"
        idx = sample_indices(arr.shape, n_max, rng)
        num = numeric_grad_entries(loss_fn, arr, idx, eps)
        ana = np.array([g[i] for i in idx])
        errors[name] = rel_error(ana, num)
        if errors[name] > tol:
            bad.append(f"{name}: rel err {errors[name]:.2e}")
        if not np.abs(g).max() > 1e-10:
            bad.append(f"{name}: the analytic gradient is zero everywhere (vacuous check)")
    assert not bad, "gradient check failed:\n" + "\n".join(bad)
    return errors
