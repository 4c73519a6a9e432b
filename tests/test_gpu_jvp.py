"""The forward-mode passes on the GPU path against the NumPy path: model_jvp and model_jvp_backward
of the tiny U-Net (every layer kind, dropout on) and the MLP, and the two losses built on them
(LFMD with --lfmd-derivative jvp, MeanFlow), float64 to rounding and float32.

On the CuPy stand-in this runs every CuPy branch of the tangent passes (GroupNorm's tangent after
the fused kernel's forward, the dropout kernel on tangents, the im2col kernel for the tangent
convolutions) through the emulator; a host array slipping into device code is a TypeError there.
"""
import numpy as np
import pytest

from ttfm_np import backend, losses, model, ttfm
from ttfm_np import params as P

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.gpu_available(), reason=f"no usable GPU: {backend.gpu_problem()}")]

TOL = {np.float64: 1e-10, np.float32: 3e-4}     # float32: as test_gpu_networks (different reduction orders)


def _rel(got, want):
    got, want = backend.to_numpy(got).astype(np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _case(rng, name, shape, two_time, dropout, dtype):
    overrides = {"dropout": dropout} if name == "tiny" else {}
    cfg = model.make_config(name, shape, two_time=two_time, **overrides)
    host = P.astype(P.randomize(model.init_model(cfg, 0), seed=1), dtype)
    x = rng.standard_normal((3,) + shape).astype(dtype)
    s = rng.uniform(0, 0.7, 3).astype(dtype)
    t = (s + rng.uniform(0, 0.3, 3)).astype(dtype) if two_time else None
    return cfg, host, x, s, t


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,shape,two_time,dropout", [
    ("tiny", (3, 16, 16), True, 0.2),
    ("tiny", (1, 16, 16), False, 0.0),
    ("mlp-tiny", (2,), True, 0.0),
])
def test_model_jvp_and_backward_gpu_match_numpy(rng, name, shape, two_time, dropout, dtype):
    import cupy as cp
    cfg, host, x, s, t = _case(rng, name, shape, two_time, dropout, dtype)
    dev = P.to_device(host, cp)
    xd = rng.standard_normal(x.shape).astype(dtype)
    sd = rng.standard_normal(3).astype(dtype)
    td = rng.standard_normal(3).astype(dtype) if two_time else None
    on = lambda a: None if a is None else cp.asarray(a)
    seed = 11 if dropout else None
    u, ud, cache = model.model_jvp(host, cfg, x, s, t, xd, sd, td, seed)
    ug, udg, cacheg = model.model_jvp(dev, cfg, on(x), on(s), on(t), on(xd), on(sd), on(td), seed)
    assert isinstance(udg, cp.ndarray) and udg.dtype == dtype
    assert _rel(ug, u) < TOL[dtype] and _rel(udg, ud) < TOL[dtype]
    R, Rd = rng.standard_normal(u.shape).astype(dtype), rng.standard_normal(u.shape).astype(dtype)
    dx, dxd, grads = model.model_jvp_backward(R, Rd, cache)
    dxg, dxdg, gradsg = model.model_jvp_backward(cp.asarray(R), cp.asarray(Rd), cacheg)
    assert _rel(dxg, dx) < TOL[dtype] and _rel(dxdg, dxd) < TOL[dtype]
    assert gradsg.keys() == grads.keys() == host.keys()
    worst = max(grads, key=lambda k: _rel(gradsg[k], grads[k]))
    assert _rel(gradsg[worst], grads[worst]) < TOL[dtype], worst


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kw", [dict(loss="lfmd", lfmd_derivative="jvp"),
                                dict(loss="lfmd", lfmd_derivative="jvp", lfmd_teacher_grad=True),
                                dict(loss="meanflow")], ids=["lfmd-jvp", "lfmd-jvp-teacher-grad", "meanflow"])
def test_exact_losses_gpu_match_numpy(rng, kw, dtype):
    import cupy as cp
    tcfg, tp, x, s, _ = _case(rng, "tiny", (1, 16, 16), False, 0.2, dtype)
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    sp = P.astype(P.randomize(sp, seed=4, std=0.1), dtype)
    t = np.concatenate([s[:2] + 0.2, [1.0]]).astype(dtype)          # one pair at t = 1
    opts = losses.DistillLossConfig(**kw).validate()
    loss, grads, _ = losses.distill_loss((sp, scfg), None, (tp, tcfg), x, s, t, opts, 5)
    dev_s, dev_t = P.to_device(sp, cp), P.to_device(tp, cp)
    lossg, gradsg, _ = losses.distill_loss((dev_s, scfg), None, (dev_t, tcfg), cp.asarray(x), cp.asarray(s),
                                           cp.asarray(t), opts, 5)
    assert abs(lossg - loss) <= TOL[dtype] * abs(loss)
    assert gradsg.keys() == grads.keys() == sp.keys()
    worst = max(grads, key=lambda k: _rel(gradsg[k], grads[k]))
    assert _rel(gradsg[worst], grads[worst]) < TOL[dtype], worst
