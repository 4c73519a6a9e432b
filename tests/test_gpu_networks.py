"""Whole networks on the GPU path against the NumPy path: the tiny U-Net (every kind of layer:
conv, GroupNorm+SiLU, attention, resampling, dropout, time embedding) and the MLP, forward
and backward, one-time and two-time, float64 (to rounding) and float32.

On the CuPy stand-in this runs every CuPy branch and every CUDA kernel of the forward and
backward through the emulator; a host array slipping into device code is a TypeError there.
"""
import numpy as np
import pytest

from ttfm_np import backend, model
from ttfm_np import params as P

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.gpu_available(), reason=f"no usable GPU: {backend.gpu_problem()}")]

TOL = {np.float64: 1e-10, np.float32: 2e-4}


def _rel(got, want):
    got, want = backend.to_numpy(got).astype(np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,shape,two_time,dropout", [
    ("tiny", (3, 16, 16), True, 0.2),
    ("tiny", (1, 16, 16), False, 0.0),
    ("mlp-tiny", (2,), True, 0.0),
])
def test_network_forward_backward_gpu_matches_numpy(rng, name, shape, two_time, dropout, dtype):
    import cupy as cp
    overrides = {"dropout": dropout} if name == "tiny" else {}
    cfg = model.make_config(name, shape, two_time=two_time, **overrides)
    host = P.astype(P.randomize(model.init_model(cfg, 0), seed=1), dtype)   # no zero-initialised layers
    dev = P.to_device(host, cp)
    x = rng.standard_normal((3,) + shape).astype(dtype)
    s = rng.uniform(0, 1, 3).astype(dtype)
    t = (s + rng.uniform(0, 1 - s)).astype(dtype) if two_time else None
    seed = 11 if dropout else None
    u, cache = model.model_forward(host, cfg, x, s, t, seed)
    ug, cacheg = model.model_forward(dev, cfg, cp.asarray(x), cp.asarray(s), None if t is None else cp.asarray(t), seed)
    assert isinstance(ug, cp.ndarray) and ug.dtype == dtype
    assert _rel(ug, u) < TOL[dtype]
    du = rng.standard_normal(u.shape).astype(dtype)
    dx, grads = model.model_backward(du, cache)
    dxg, gradsg = model.model_backward(cp.asarray(du), cacheg)
    assert _rel(dxg, dx) < TOL[dtype]
    assert gradsg.keys() == grads.keys() == host.keys()
    worst = max(grads, key=lambda k: _rel(gradsg[k], grads[k]))
    assert _rel(gradsg[worst], grads[worst]) < TOL[dtype], worst
    # evaluation without caches gives the same values
    ue, none = model.model_forward(dev, cfg, cp.asarray(x), cp.asarray(s), None if t is None else cp.asarray(t), seed,
                                   need_grad=False)
    assert none is None and _rel(ue, u) < TOL[dtype]
