"""Adam, gradient clipping, warmup and EMA (ttfm_np/optim.py).

Checked against an independent float64 transcription of the textbook formulas,
against torch.optim.Adam/AdamW when torch is installed, and the fused CUDA
kernels against the NumPy path (tests marked `gpu`: on real CuPy with a GPU,
otherwise on the CuPy stand-in, where kernels/adam.cu and ema.cu run in the
CUDA emulator, which checks every argument against the C signature and
contracts a*b+c into an FMA as nvcc does).
"""
import dataclasses
import math

import numpy as np
import pytest

from ttfm_np import backend, cuda, optim


def _params(rng, dtype=np.float64):
    # "big" is larger than one NumPy chunk (32768 float64 / 65536 float32 elements) and not a
    # multiple of it, so the chunked path and its ragged last chunk are exercised
    return {"enc.conv0.weight": rng.standard_normal((4, 3, 3, 3)).astype(dtype),
            "enc.conv0.bias": rng.standard_normal(4).astype(dtype),
            "big.weight": rng.standard_normal((70001,)).astype(dtype),
            "scalar.gain": np.asarray(rng.standard_normal(), dtype=dtype)}


def _grads(rng, params):
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}


class ReferenceAdam:
    """Textbook Adam in float64, written out independently of optim.py."""

    def __init__(self, params, lr, betas, eps, weight_decay, decoupled):
        self.p = {k: v.astype(np.float64) for k, v in params.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.wd, self.decoupled, self.k = weight_decay, decoupled, 0

    def step(self, grads):
        self.k += 1
        for n in self.p:
            g = grads[n].astype(np.float64)
            if not self.decoupled:
                g = g + self.wd * self.p[n]                                # L2: gradient of wd/2 |p|^2
            self.m[n] = self.b1 * self.m[n] + (1 - self.b1) * g
            self.v[n] = self.b2 * self.v[n] + (1 - self.b2) * g ** 2
            m_hat = self.m[n] / (1 - self.b1 ** self.k)
            v_hat = self.v[n] / (1 - self.b2 ** self.k)
            if self.decoupled:
                self.p[n] = self.p[n] - self.lr * self.wd * self.p[n]       # AdamW
            self.p[n] = self.p[n] - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


@pytest.mark.parametrize("weight_decay,decoupled", [(0.0, True), (0.1, True), (0.1, False)],
                         ids=["no-wd", "adamw", "l2"])
def test_adam_matches_float64_reference(rng, weight_decay, decoupled):
    p = _params(rng)
    lr, betas, eps = 0.01, (0.8, 0.95), 1e-6
    ref = ReferenceAdam(p, lr, betas, eps, weight_decay, decoupled)
    state = optim.adam_init(p)
    for _ in range(6):
        g = _grads(rng, p)
        optim.adam_step(p, g, state, lr, betas, eps, weight_decay, decoupled=decoupled)
        ref.step(g)
    assert state.step == 6
    for n in p:
        np.testing.assert_allclose(p[n], ref.p[n], rtol=1e-12, atol=1e-14, err_msg=n)
        np.testing.assert_allclose(state.m[n], ref.m[n], rtol=1e-12, atol=1e-15, err_msg=n)
        np.testing.assert_allclose(state.v[n], ref.v[n], rtol=1e-12, atol=1e-15, err_msg=n)


def test_adam_float32_stays_float32_and_close_to_reference(rng):
    p = _params(rng, np.float32)
    ref = ReferenceAdam(p, 1e-3, (0.9, 0.999), 1e-8, 0.01, True)
    state = optim.adam_init(p)
    for _ in range(4):
        g = _grads(rng, p)
        optim.adam_step(p, g, state, 1e-3, weight_decay=0.01)
        ref.step(g)
    for n in p:
        assert p[n].dtype == state.m[n].dtype == state.v[n].dtype == np.float32
        np.testing.assert_allclose(p[n], ref.p[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_bias_correction_makes_the_first_step_lr_sized(rng):
    # with bias correction m_hat = g and v_hat = g^2 at k = 1, so every entry moves by lr
    # (up to eps), whatever the gradient's scale; without it the step would be (1-b1)/sqrt(1-b2) lr
    p = {"w": rng.standard_normal(1000)}
    before = p["w"].copy()
    g = {"w": 1e-3 * rng.choice([-1.0, 1.0], 1000) * rng.uniform(0.5, 2.0, 1000)}
    optim.adam_step(p, g, optim.adam_init(p), lr=0.1, eps=1e-12)
    np.testing.assert_allclose(before - p["w"], 0.1 * np.sign(g["w"]), rtol=1e-7)


def test_adam_handles_strided_params_and_foreign_gradient_dtype(rng):
    base = rng.standard_normal((6, 5))
    p = {"t": base.T}                                  # a non-contiguous view, updated in place
    assert not p["t"].flags.c_contiguous
    ref = ReferenceAdam(p, 0.01, (0.9, 0.999), 1e-8, 0.05, True)
    state = optim.adam_init(p)
    for _ in range(3):
        g = {"t": rng.standard_normal((5, 6)).astype(np.float32)}   # float32 gradients, float64 params
        optim.adam_step(p, g, state, 0.01, weight_decay=0.05)
        ref.step(g)
    np.testing.assert_allclose(base.T, ref.p["t"], rtol=1e-12)


def test_adam_state_is_plain_data(rng):
    p = _params(rng)
    state = optim.adam_init(p)
    assert state.step == 0 and list(state.m) == list(p) and list(state.v) == list(p)
    assert all(not a.any() for a in state.m.values())
    fields = {f.name for f in dataclasses.fields(optim.AdamState)}
    assert fields == {"step", "m", "v"}


def test_adam_rejects_mismatched_inputs(rng):
    p = _params(rng)
    state = optim.adam_init(p)
    g = _grads(rng, p)
    del g["enc.conv0.bias"]
    g["stray"] = np.zeros(2)
    with pytest.raises(ValueError, match=r"missing \['enc.conv0.bias'\].*unexpected \['stray'\]"):
        optim.adam_step(p, g, state, 0.01)
    g = _grads(rng, p)
    g["enc.conv0.bias"] = np.zeros(5)
    with pytest.raises(ValueError, match="enc.conv0.bias"):
        optim.adam_step(p, g, state, 0.01)
    with pytest.raises(ValueError, match="betas"):
        optim.adam_step(p, _grads(rng, p), state, 0.01, betas=(1.0, 0.999))
    assert state.step == 0                              # nothing was counted or written
    assert all(not a.any() for a in state.m.values())
    with pytest.raises(TypeError, match="scalar.gain.*0-d array"):
        optim.adam_step({**p, "scalar.gain": np.float64(1.0)}, _grads(rng, p), state, 0.01)


@pytest.fixture
def torch_one_thread():
    """torch, limited to one thread for the test (small tensors: its thread pool only costs time on 2 cores)."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the optional torch comparison is skipped")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(n)


@pytest.mark.torch
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("kind", ["adam", "adam-l2", "adamw"])
def test_adam_matches_torch(rng, kind, dtype, rtol, torch_one_thread):
    torch = torch_one_thread
    p = _params(rng, dtype)
    wd = 0.0 if kind == "adam" else 0.05
    hyper = dict(lr=3e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=wd)
    tp = [torch.tensor(p[k].copy(), requires_grad=True) for k in p]
    opt = (torch.optim.AdamW if kind == "adamw" else torch.optim.Adam)(tp, **hyper)
    state = optim.adam_init(p)
    for _ in range(5):
        g = _grads(rng, p)
        for t, k in zip(tp, p):
            t.grad = torch.tensor(g[k])
        opt.step()
        optim.adam_step(p, g, state, hyper["lr"], hyper["betas"], hyper["eps"], wd, decoupled=(kind == "adamw"))
    for t, k in zip(tp, p):
        np.testing.assert_allclose(p[k], t.detach().numpy(), rtol=rtol, atol=rtol * 1e-2, err_msg=k)
        np.testing.assert_allclose(state.v[k], opt.state[t]["exp_avg_sq"].numpy(), rtol=rtol, err_msg=k)


def test_clip_grad_norm(rng):
    g = _grads(rng, _params(rng))
    norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in g.values()))
    before = {k: v.copy() for k, v in g.items()}
    assert optim.clip_grad_norm(g, 1e9) == pytest.approx(norm, rel=1e-12)       # returns the norm
    for k in g:                                                                 # and is a no-op below
        np.testing.assert_array_equal(g[k], before[k])
    assert optim.clip_grad_norm(g, float("inf")) == pytest.approx(norm, rel=1e-12)
    assert optim.clip_grad_norm(g, 0.5) == pytest.approx(norm, rel=1e-12)       # pre-clip norm
    assert optim.global_grad_norm(g) == pytest.approx(0.5, rel=1e-10)            # post-clip norm
    for k in g:                                   # one common factor: the direction is unchanged
        np.testing.assert_allclose(g[k], before[k] * (0.5 / norm), rtol=1e-10, atol=1e-300)
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_grad_norm(g, 0.0)


def test_clip_grad_norm_float32_and_non_finite(rng):
    g = {"a": rng.standard_normal((300, 300)).astype(np.float32), "b": np.float32(3) * np.ones(7, np.float32)}
    norm = optim.clip_grad_norm(g, 1.0)
    assert g["a"].dtype == np.float32 and norm > 1.0
    assert optim.global_grad_norm(g) == pytest.approx(1.0, rel=1e-5)
    bad = {"a": np.array([1.0, np.nan])}
    assert math.isnan(optim.clip_grad_norm(bad, 1.0))
    assert bad["a"][0] == 1.0                        # untouched: the caller sees the NaN and stops


@pytest.mark.torch
def test_clip_grad_norm_matches_torch(rng, torch_one_thread):
    torch = torch_one_thread
    g = _grads(rng, _params(rng))
    tg = [torch.tensor(v.copy(), requires_grad=True) for v in g.values()]
    for t, v in zip(tg, g.values()):
        t.grad = torch.tensor(v.copy())
    total = torch.nn.utils.clip_grad_norm_(tg, 2.0)
    assert optim.clip_grad_norm(g, 2.0) == pytest.approx(float(total), rel=1e-12)
    for t, v in zip(tg, g.values()):
        np.testing.assert_allclose(v, t.grad.numpy(), rtol=1e-6)     # torch divides by norm + 1e-6


def test_warmup_lr():
    assert [optim.warmup_lr(2.0, s, 4) for s in (1, 2, 3, 4, 5, 100)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert optim.warmup_lr(2.0, 0, 4) == 0.0
    assert optim.warmup_lr(2.0, 1, 0) == 2.0 and optim.warmup_lr(2.0, 1, -1) == 2.0


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-13), (np.float32, 1e-6)])
def test_ema_formula(rng, dtype, rtol):
    p, e = _params(rng, dtype), _params(rng, dtype)
    ref = {k: 0.999 * e[k].astype(np.float64) + 0.001 * p[k].astype(np.float64) for k in p}
    ids = {k: id(v) for k, v in e.items()}
    optim.ema_update(e, p, 0.999)
    for k in p:
        assert id(e[k]) == ids[k] and e[k].dtype == dtype               # in place
        np.testing.assert_allclose(e[k], ref[k], rtol=rtol, atol=rtol * 1e-3, err_msg=k)


def test_ema_edge_cases(rng):
    p = _params(rng)
    e = {k: np.array(v + 1) for k, v in p.items()}
    keep = {k: v.copy() for k, v in e.items()}
    optim.ema_update(e, p, 1.0)                                          # decay 1: frozen
    for k in p:
        np.testing.assert_array_equal(e[k], keep[k])
    optim.ema_update(e, p, 0.0)                                          # decay 0: a copy
    for k in p:
        np.testing.assert_array_equal(e[k], p[k])
    base = rng.standard_normal((4, 3))
    want = 0.25 * base.T + 0.75                                          # strided EMA copy, in place
    optim.ema_update({"w": base.T}, {"w": np.ones((3, 4))}, 0.25)
    np.testing.assert_allclose(base.T, want, rtol=1e-15)
    with pytest.raises(ValueError, match="decay"):
        optim.ema_update(e, p, 1.5)
    with pytest.raises(ValueError, match="missing"):
        optim.ema_update(e, {"enc.conv0.bias": p["enc.conv0.bias"]}, 0.9)


def test_adam_state_to_device_copies(rng):
    p = _params(rng, np.float32)
    state = optim.adam_init(p)
    optim.adam_step(p, _grads(rng, p), state, 0.01)
    moved = optim.adam_state_to_device(state, np, np.float64)
    assert moved.step == 1 and moved.m["big.weight"].dtype == np.float64
    np.testing.assert_array_equal(moved.v["big.weight"], state.v["big.weight"].astype(np.float64))


# ----------------------------------------------------------------------------
# GPU: the fused kernels against the NumPy path
# ----------------------------------------------------------------------------

def _rel_err(got, want):
    got, want = backend.to_numpy(got).astype(np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("weight_decay,decoupled", [(0.0, True), (0.1, True), (0.1, False)],
                         ids=["no-wd", "adamw", "l2"])
def test_fused_adam_and_ema_match_numpy_on_gpu(rng, monkeypatch, weight_decay, decoupled):
    """The kernels round every product and sum on their own (no FMA contraction), in the NumPy
    path's order, so float32 results are expected to agree bit for bit; the 1e-6 relative slack
    (8 float32 ulp) covers CuPy's -ftz=true, which flushes subnormal intermediates to zero.
    (With nvcc's default contraction, the L2 case drifted by 3.3e-5.)"""
    if not backend.gpu_available():
        pytest.skip(f"no usable GPU: {backend.gpu_problem()}")
    import cupy as cp
    launched = []
    real_get_kernel = cuda.get_kernel
    monkeypatch.setattr(cuda, "get_kernel", lambda *a: launched.append(a[:2]) or real_get_kernel(*a))
    # a grid of at most 16 blocks, so the grid-stride loop wraps around on a small tensor ("big")
    monkeypatch.setattr(cuda, "MAX_GRID_1D", 16)
    p = _params(rng, np.float32)
    pg = {k: cp.asarray(v) for k, v in p.items()}
    s, sg = optim.adam_init(p), optim.adam_init(pg)
    e, eg = {k: v.copy() for k, v in p.items()}, {k: v.copy() for k, v in pg.items()}
    for _ in range(3):
        g = _grads(rng, p)
        optim.adam_step(p, g, s, 1e-2, weight_decay=weight_decay, decoupled=decoupled)
        optim.adam_step(pg, {k: cp.asarray(v) for k, v in g.items()}, sg, 1e-2,
                        weight_decay=weight_decay, decoupled=decoupled)
        optim.ema_update(e, p, 0.9)
        optim.ema_update(eg, pg, 0.9)
    assert launched.count(("adam", "adam_update")) == 3 * len(p) and launched.count(("ema", "ema_update")) == 3 * len(p)
    for k in p:
        assert isinstance(pg[k], cp.ndarray) and pg[k].dtype == cp.float32
        for got, want in ((pg[k], p[k]), (sg.m[k], s.m[k]), (sg.v[k], s.v[k]), (eg[k], e[k])):
            assert _rel_err(got, want) < 1e-6, k


@pytest.mark.gpu
def test_fused_adam_float64_and_grad_norm_on_gpu(rng):
    if not backend.gpu_available():
        pytest.skip(f"no usable GPU: {backend.gpu_problem()}")
    import cupy as cp
    p = _params(rng, np.float64)
    pg = {k: cp.asarray(v) for k, v in p.items()}
    s, sg = optim.adam_init(p), optim.adam_init(pg)
    g = _grads(rng, p)
    gg = {k: cp.asarray(v) for k, v in g.items()}
    assert optim.clip_grad_norm(gg, 1.0) == pytest.approx(optim.clip_grad_norm(g, 1.0), rel=1e-12)
    optim.adam_step(p, g, s, 1e-2, weight_decay=0.1)
    optim.adam_step(pg, gg, sg, 1e-2, weight_decay=0.1)
    for k in p:
        assert _rel_err(pg[k], p[k]) < 1e-12, k


@pytest.mark.gpu
def test_optimizer_step_syncs_once_whatever_the_tensor_count(rng, gpu_counters):
    """clip + Adam + EMA on the GPU: one host sync (the gradient norm), not one per tensor."""
    import cupy as cp
    for n_tensors in (3, 30):
        p = {f"w{i}": cp.asarray(rng.standard_normal(5).astype(np.float32)) for i in range(n_tensors)}
        g = {k: cp.asarray(rng.standard_normal(5).astype(np.float32)) for k in p}
        e, s = {k: v.copy() for k, v in p.items()}, optim.adam_init(p)
        gpu_counters["syncs"] = 0
        norm = optim.clip_grad_norm(g, 1.0)
        optim.adam_step(p, g, s, 1e-3)
        optim.ema_update(e, p, 0.99)
        assert math.isfinite(norm) and gpu_counters["syncs"] == 1, n_tensors


def test_no_stray_device_tests_in_optim():
    """Issue 12: one NumPy/CuPy dispatch point per op, all written backend.is_cupy(...)."""
    import inspect
    src = inspect.getsource(optim)
    assert "xp is np" not in src and "xp is not np" not in src
    assert src.count("backend.is_cupy(") == 3            # _adam_update, _ema_update, global_grad_norm
