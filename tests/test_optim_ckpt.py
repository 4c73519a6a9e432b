"""Adam, clipping, warmup, EMA against independent references; checkpoints
round-trip exactly and survive a crash during save."""
import json
import os

import h5py
import numpy as np
import pytest

from ttfm_np import ckpt, optim


def _params(rng, dtype=np.float64):
    return {"a.weight": rng.standard_normal((3, 4)).astype(dtype), "a.bias": rng.standard_normal(4).astype(dtype)}


def test_adam_matches_float64_reference(rng):
    p = _params(rng)
    ref = {k: v.copy() for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    st = optim.adam_init(p)
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.95, 1e-6, 0.1
    for k in range(1, 6):
        g = {n: rng.standard_normal(a.shape) for n, a in p.items()}
        optim.adam_step(p, g, st, lr, (b1, b2), eps, wd)
        for n in ref:        # AdamW, written out independently
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            v2[n] = b2 * v2[n] + (1 - b2) * g[n] ** 2
            ref[n] = ref[n] - lr * wd * ref[n]
            ref[n] = ref[n] - lr * (m[n] / (1 - b1 ** k)) / (np.sqrt(v2[n] / (1 - b2 ** k)) + eps)
    for n in p:
        np.testing.assert_allclose(p[n], ref[n], rtol=1e-12, atol=1e-14)
    assert st.step == 5


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam_matches_torch(rng, wd):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: optional comparison skipped")
    p = _params(rng)
    tp = [torch.tensor(p[k].copy(), requires_grad=True) for k in p]
    opt = (torch.optim.AdamW(tp, lr=0.003, weight_decay=wd) if wd else torch.optim.Adam(tp, lr=0.003))
    st = optim.adam_init(p)
    for _ in range(4):
        g = {k: rng.standard_normal(v.shape) for k, v in p.items()}
        for t, k in zip(tp, p):
            t.grad = torch.tensor(g[k])
        opt.step()
        optim.adam_step(p, g, st, 0.003, weight_decay=wd)
    for t, k in zip(tp, p):
        np.testing.assert_allclose(p[k], t.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_clip_grad_norm_and_warmup(rng):
    g = _params(rng)
    norm = np.sqrt(sum((v ** 2).sum() for v in g.values()))
    assert optim.clip_grad_norm(g, 1e9) == pytest.approx(norm)          # no-op below the limit
    before = {k: v.copy() for k, v in g.items()}
    assert optim.clip_grad_norm(g, 0.5) == pytest.approx(norm)
    assert optim.global_grad_norm(g) == pytest.approx(0.5, rel=1e-9)
    np.testing.assert_allclose(g["a.bias"] / before["a.bias"], 0.5 / (norm + 1e-12))
    assert optim.warmup_lr(1.0, 5, 10) == 0.5 and optim.warmup_lr(1.0, 20, 10) == 1.0
    assert optim.warmup_lr(1.0, 1, 0) == 1.0


def test_ema_formula(rng):
    p, e = _params(rng), _params(rng)
    ref = {k: 0.9 * e[k] + 0.1 * p[k] for k in p}
    optim.ema_update(e, p, 0.9)
    for k in p:
        np.testing.assert_allclose(e[k], ref[k], rtol=1e-14)


def _state(rng, dtype):
    p = _params(rng, dtype)
    st = optim.adam_init(p)
    optim.adam_step(p, {k: rng.standard_normal(v.shape).astype(dtype) for k, v in p.items()}, st, 0.1)
    gen = np.random.default_rng(42)
    gen.random(3)
    return p, st, gen


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpoint_round_trip_is_exact(tmp_path, rng, dtype):
    p, st, gen = _state(rng, dtype)
    ema = {k: v * 0.5 for k, v in p.items()}
    path = tmp_path / "c.h5"
    ckpt.save_checkpoint(path, p, ema=ema, opt_state=st, step=17,
                         rng_state={"gen": gen.bit_generator.state}, config={"model": {"kind": "mlp", "dim": 2}})
    back = ckpt.load_checkpoint(path)
    for k in p:
        assert back["params"][k].dtype == dtype
        np.testing.assert_array_equal(back["params"][k], p[k])
        np.testing.assert_array_equal(back["ema"][k], ema[k])
        np.testing.assert_array_equal(back["opt_state"].m[k], st.m[k])
        np.testing.assert_array_equal(back["opt_state"].v[k], st.v[k])
    assert back["step"] == 17 and back["opt_state"].step == 1
    assert back["config"] == {"model": {"kind": "mlp", "dim": 2}}
    g2 = np.random.default_rng()
    g2.bit_generator.state = back["rng_state"]["gen"]
    np.testing.assert_array_equal(g2.random(5), gen.random(5))     # the restored stream continues exactly


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, rng, monkeypatch):
    p, st, _ = _state(rng, np.float32)
    path = tmp_path / "c.h5"
    ckpt.save_checkpoint(path, p, opt_state=st, step=1)
    calls = {"n": 0}
    real = ckpt._write_group

    def crash(f, name, arrays):
        calls["n"] += 1
        if calls["n"] == 2:                     # die half-way through writing the file
            raise KeyboardInterrupt("simulated crash")
        return real(f, name, arrays)
    monkeypatch.setattr(ckpt, "_write_group", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {k: v + 1 for k, v in p.items()}, opt_state=st, step=2)
    back = ckpt.load_checkpoint(path)
    assert back["step"] == 1
    np.testing.assert_array_equal(back["params"]["a.weight"], p["a.weight"])
    assert os.listdir(tmp_path) == ["c.h5"]          # no temp file left behind


def test_bad_files_are_named(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(ckpt.CheckpointError, match="not a readable HDF5"):
        ckpt.load_checkpoint(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ckpt.CheckpointError, match="not a ttfm_np checkpoint"):
        ckpt.load_checkpoint(other)
    newer = tmp_path / "newer.h5"
    ckpt.save_checkpoint(newer, _params(rng))
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ckpt.CheckpointError, match="newer"):
        ckpt.load_checkpoint(newer)


def test_param_mismatch_names_every_problem(rng):
    exp = {"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(1)}
    got = {"a": np.zeros((3, 3)), "b": np.zeros(4), "d": np.zeros(1)}
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_params_match(exp, got)
    msg = str(e.value)
    assert "missing: c" in msg and "unexpected: d" in msg and "a: (3, 3)" in msg
