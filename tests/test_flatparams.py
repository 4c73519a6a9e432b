"""Parameters in one buffer (ttfm_np/flatparams.py) and the one-pass optimizer path it enables.

Adam and the EMA are elementwise sequences of correctly rounded IEEE operations (add, multiply,
divide, sqrt), so one pass over the buffer must give the same bits as one pass per tensor: those
comparisons are exact. The gradient norm adds its partial sums in another grouping: compared
against a float64 reference within the rounding bound of the float64 dot products.
"""
import copy
import dataclasses
import pickle

import numpy as np
import pytest

from ttfm_np import backend, flatparams, optim


def _params(rng, dtype=np.float32):
    # "big" spans several optimizer chunks (256 KiB) and norm pieces (65536 elements), not a multiple of either
    return {"enc.conv0.weight": rng.standard_normal((4, 3, 3, 3)).astype(dtype),
            "enc.conv0.bias": rng.standard_normal(4).astype(dtype),
            "big.weight": rng.standard_normal((150001,)).astype(dtype),
            "scalar.gain": np.asarray(rng.standard_normal(), dtype=dtype)}


def test_views_share_one_buffer_and_assignment_copies_into_it(rng):
    plain = _params(rng)
    flat = flatparams.pack(plain)
    assert list(flat) == list(plain) and flat.buffer.size == sum(v.size for v in plain.values())
    start = 0
    for k, v in plain.items():
        np.testing.assert_array_equal(flat[k], v)
        assert flat[k].base is flat.buffer and flat[k].shape == v.shape
        np.testing.assert_array_equal(flat.buffer[start:start + v.size], v.ravel())
        start += v.size
    assert flat.buffer is not None and not np.shares_memory(flat.buffer, plain["big.weight"])  # a copy
    new = rng.standard_normal((4,)).astype(np.float32)
    flat["enc.conv0.bias"] = new                       # assignment writes into the buffer
    np.testing.assert_array_equal(flat.buffer[4 * 27:4 * 27 + 4], new)
    flat["enc.conv0.weight"] *= 2                      # in-place ops land in the buffer too
    np.testing.assert_array_equal(flat.buffer[:108], 2 * plain["enc.conv0.weight"].ravel())
    with pytest.raises(ValueError, match="shape"):
        flat["enc.conv0.bias"] = np.zeros(5, np.float32)
    with pytest.raises(KeyError, match="fixed"):
        flat["new.weight"] = np.zeros(3, np.float32)
    for fixed in (lambda: flat.pop("scalar.gain"), lambda: flat.setdefault("x", 1), flat.clear):
        with pytest.raises(TypeError, match="fixed layout"):
            fixed()
    with pytest.raises(ValueError, match="one dtype"):
        flatparams.pack({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float64)})


def test_copies_get_their_own_buffer(rng):
    flat = flatparams.pack(_params(rng))
    for other in (copy.deepcopy(flat), pickle.loads(pickle.dumps(flat)), flat.copy()):
        assert isinstance(other, flatparams.FlatParams) and flat.same_layout(other)
        assert not np.shares_memory(other.buffer, flat.buffer)
        for k in flat:
            np.testing.assert_array_equal(other[k], flat[k])
            assert other[k].base is other.buffer
        other["big.weight"] += 1
        assert not np.array_equal(other["big.weight"], flat["big.weight"])


def test_pack_like_orders_keys_and_reuses_an_aligned_buffer(rng):
    flat = flatparams.pack(_params(rng))
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in reversed(list(flat.items()))}
    packed = flatparams.pack(grads, like=flat)
    assert list(packed) == list(flat) and flat.same_layout(packed)
    assert flatparams.pack(packed, like=flat) is packed
    with pytest.raises(ValueError, match="missing"):
        flatparams.pack({k: grads[k] for k in list(grads)[1:]}, like=flat)


@pytest.mark.parametrize("weight_decay,decoupled", [(0.0, True), (0.1, True), (0.1, False)],
                         ids=["no-wd", "adamw", "l2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_pass_adam_and_ema_equal_the_per_tensor_path_bit_for_bit(rng, weight_decay, decoupled, dtype):
    plain = _params(rng, dtype)
    flat = flatparams.pack(plain)
    s_plain, s_flat = optim.adam_init(plain), optim.adam_init(flat)
    assert flatparams.all_flat(flat, s_flat.m, s_flat.v)
    e_plain, e_flat = {k: v.copy() for k, v in plain.items()}, flatparams.pack(plain)
    for step in range(4):
        g = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in plain.items()}
        # gradients as a plain dict (concatenated inside adam_step) and as an aligned FlatParams
        g_flat = g if step % 2 else flatparams.pack(g, like=flat)
        optim.adam_step(plain, g, s_plain, 1e-2, weight_decay=weight_decay, decoupled=decoupled)
        optim.adam_step(flat, g_flat, s_flat, 1e-2, weight_decay=weight_decay, decoupled=decoupled)
        optim.ema_update(e_plain, plain, 0.9)
        optim.ema_update(e_flat, flat, 0.9)
    assert s_flat.step == s_plain.step == 4
    for k in plain:
        for got, want in ((flat[k], plain[k]), (s_flat.m[k], s_plain.m[k]), (s_flat.v[k], s_plain.v[k]),
                          (e_flat[k], e_plain[k])):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want, err_msg=k)


def test_one_pass_adam_is_taken(rng, monkeypatch):
    """The flat path makes one update call for all tensors (not one per tensor)."""
    calls = []
    real = optim._adam_update
    monkeypatch.setattr(optim, "_adam_update", lambda *a: calls.append(a[0].size) or real(*a))
    flat = flatparams.pack(_params(rng))
    optim.adam_step(flat, {k: np.ones_like(v) for k, v in flat.items()}, optim.adam_init(flat), 1e-3)
    assert calls == [flat.buffer.size]
    plain = _params(rng)
    calls.clear()
    optim.adam_step(plain, {k: np.ones_like(v) for k, v in plain.items()}, optim.adam_init(plain), 1e-3)
    assert len(calls) == len(plain)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_norm_and_clip_of_a_flat_gradient(rng, dtype):
    grads = flatparams.pack({k: v * 3 for k, v in _params(rng, dtype).items()})
    want = float(np.sqrt(np.sum(grads.buffer.astype(np.float64) ** 2)))
    # each partial sum is a dot of at most _NORM_PIECE products: relative error <= n u (n = piece size)
    u = np.finfo(dtype).eps / 2
    bound = optim._NORM_PIECE * u
    got = optim.global_grad_norm(grads)
    assert abs(got - want) <= bound * want
    norm = optim.clip_grad_norm(grads, 1.0)
    assert norm == got
    clipped = float(np.sqrt(np.sum(grads.buffer.astype(np.float64) ** 2)))
    assert abs(clipped - 1.0) <= 4 * bound
    for k, v in grads.items():
        assert v.base is grads.buffer                 # scaled in place: the views see it


def test_training_loop_runs_on_flat_buffers(tmp_path, rng, monkeypatch):
    """train_loop packs parameters, EMA, moments and gradients; Adam then runs once per step."""
    from ttfm_np import data, model, objectives, train
    cfg = model.make_config("mlp-tiny", (2,))
    calls = []
    real = optim._adam_update
    monkeypatch.setattr(optim, "_adam_update", lambda *a: calls.append(a[0].size) or real(*a))
    tcfg = train.TrainConfig(steps=3, batch_size=16, lr=1e-3, log_every=1, ckpt_every=0, sample_every=0)

    def run(steps, resume):
        return train.train_loop(str(tmp_path / "run"), model_cfg=cfg, init_params=model.init_model(cfg, 0),
                                objective=objectives.FlowMatchingObjective(cfg, sample_kind="points"),
                                data_iter=data.BatchIterator(data.make_toy("moons", 64, 0), 16),
                                tcfg=dataclasses.replace(tcfg, steps=steps), run_config={}, progress=False,
                                resume=resume)
    params, ema, step = run(3, False)
    assert step == 3 and isinstance(params, flatparams.FlatParams) and isinstance(ema, flatparams.FlatParams)
    assert calls == [params.buffer.size] * 3
    assert backend.array_module(params.buffer) is np and not np.shares_memory(params.buffer, ema.buffer)
    params, ema, step = run(5, True)                                    # resumed from the checkpoint: flat too
    assert step == 5 and isinstance(ema, flatparams.FlatParams) and calls == [params.buffer.size] * 5
