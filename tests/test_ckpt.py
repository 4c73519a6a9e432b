"""HDF5 checkpoints (ttfm_np/ckpt.py): exact round trips, atomic saves that
survive a crash, and errors that name the problem."""
import hashlib
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from ttfm_np import backend, ckpt, optim


def _params(rng, dtype):
    return {"enc.32x32_block0.conv0.weight": rng.standard_normal((4, 3, 3, 3)).astype(dtype),
            "enc.32x32_block0.conv0.bias": rng.standard_normal(4).astype(dtype),
            "dec.out.gamma": np.asarray(1.5, dtype=dtype),                      # 0-d
            "aux.empty": np.zeros((0, 3), dtype=dtype)}                         # empty


def _trained(rng, dtype, steps=2):
    p = _params(rng, dtype)
    st = optim.adam_init(p)
    for _ in range(steps):
        optim.adam_step(p, {k: rng.standard_normal(v.shape).astype(dtype) for k, v in p.items()}, st, 0.1,
                        weight_decay=0.01)
    return p, st


def _bits(a):
    """The raw bytes' view, so NaN payloads and -0.0 compare exactly."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8)


def _assert_same_arrays(got, want):
    assert list(got) == list(want)                    # same names, same order
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert isinstance(got[k], np.ndarray), k
        np.testing.assert_array_equal(_bits(got[k]), _bits(want[k]), err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_bitwise_exact(tmp_path, rng, dtype):
    p, st = _trained(rng, dtype)
    p["enc.32x32_block0.conv0.bias"][:3] = [np.nan, -0.0, np.finfo(dtype).tiny / 4]   # NaN, -0, subnormal
    ema = {k: (v * 0.5).astype(dtype) for k, v in p.items()}
    gen = np.random.default_rng(42)
    gen.random(3)
    config = {"model": {"kind": "unet", "channels": (32, 64), "dropout": 0.1}, "lr": np.float32(2e-4),
              "steps": np.int64(10)}
    path = tmp_path / "checkpoint.h5"
    ckpt.save_checkpoint(path, p, ema=ema, opt_state=st, step=17,
                         rng_state={"gen": gen.bit_generator.state, "seed": 7}, config=config,
                         extra={"note": "hello"})
    back = ckpt.load_checkpoint(path)
    _assert_same_arrays(back["params"], p)
    _assert_same_arrays(back["ema"], ema)
    _assert_same_arrays(back["opt_state"].m, st.m)
    _assert_same_arrays(back["opt_state"].v, st.v)
    assert back["step"] == 17 and back["opt_state"].step == st.step == 2
    assert back["format_version"] == ckpt.FORMAT_VERSION
    assert back["config"] == {"model": {"kind": "unet", "channels": [32, 64], "dropout": 0.1},
                              "lr": float(np.float32(2e-4)), "steps": 10}
    assert back["extra"] == {"note": "hello"}
    assert back["rng_state"]["seed"] == 7
    assert back["rng_state"]["gen"] == gen.bit_generator.state                     # 128-bit ints exact
    restored = ckpt.restore_rng(back["rng_state"]["gen"])
    np.testing.assert_array_equal(restored.random(5), gen.random(5))                # the stream continues
    np.testing.assert_array_equal(restored.integers(0, 2 ** 62, 4), gen.integers(0, 2 ** 62, 4))


def test_rng_state_of_any_bit_generator_and_generator_objects(tmp_path, rng):
    p = _params(rng, np.float32)
    mt = np.random.Generator(np.random.MT19937(5))           # its state holds a uint32 array
    philox = np.random.Generator(np.random.Philox(6))
    pcg = np.random.default_rng(2 ** 100 + 3)
    for g in (mt, philox, pcg):
        g.standard_normal(11)
    path = tmp_path / "c.h5"
    ckpt.save_checkpoint(path, p, rng_state={"mt": mt, "philox": philox.bit_generator, "pcg": pcg})
    back = ckpt.load_checkpoint(path)["rng_state"]
    for name, g in (("mt", mt), ("philox", philox), ("pcg", pcg)):
        np.testing.assert_array_equal(ckpt.restore_rng(back[name]).standard_normal(7), g.standard_normal(7))
    with pytest.raises(ValueError, match="bit generator state"):
        ckpt.restore_rng({"seed": 3})


def test_optional_parts_and_folder_paths(tmp_path, rng):
    p = _params(rng, np.float64)
    ckpt.save_checkpoint(tmp_path / "run" / "checkpoint.h5", p)                  # creates the folder
    back = ckpt.load_checkpoint(tmp_path / "run")                                # a run folder works too
    assert back["ema"] is None and back["opt_state"] is None and back["rng_state"] is None
    assert back["config"] == {} and back["extra"] == {} and back["step"] == 0
    assert back["path"] == str(tmp_path / "run" / "checkpoint.h5")
    _assert_same_arrays(back["params"], p)


def test_layout_on_disk(tmp_path, rng):
    p, st = _trained(rng, np.float32)
    path = tmp_path / "c.h5"
    ckpt.save_checkpoint(path, p, ema=p, opt_state=st, step=3, config={"a": 1})
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"params", "ema", "adam_m", "adam_v"}
        assert list(f["params"].keys()) == list(p)                               # dotted names, in order
        assert int(f.attrs["format_version"]) == 2 and int(f.attrs["step"]) == 3
        assert f.attrs["config_json"] == '{"a": 1}'
        offsets = {f"{g}/{k}": ds.id.get_offset() for g in f for k, ds in f[g].items()}
    data = path.read_bytes()
    assert data.endswith(ckpt.TRAILER_MAGIC)                                     # the checksum trailer
    n = int.from_bytes(data[-48:-40], "little")
    manifest = __import__("json").loads(data[-48 - n:-48])
    assert manifest["hdf5_bytes"] == len(data) - 48 - n
    assert manifest["hdf5_sha256"] == hashlib.sha256(data[:manifest["hdf5_bytes"]]).hexdigest()
    w = p["enc.32x32_block0.conv0.weight"]                                       # independent: hash the array
    assert manifest["arrays"]["params/enc.32x32_block0.conv0.weight"] == [
        offsets["params/enc.32x32_block0.conv0.weight"], w.nbytes, hashlib.sha256(w.tobytes()).hexdigest()]
    assert set(manifest["arrays"]) == set(offsets)


def test_resume_continues_training_exactly(tmp_path, rng):
    """Save after 3 Adam+EMA steps, reload, go on: bitwise what an uninterrupted run gives."""
    p, _ = _trained(rng, np.float32, steps=0)
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()} for _ in range(5)]

    def run(params, ema, st, steps):
        for g in steps:
            optim.adam_step(params, {k: v.copy() for k, v in g.items()}, st, 1e-2, weight_decay=0.1)
            optim.ema_update(ema, params, 0.9)

    straight = {k: v.copy() for k, v in p.items()}
    ema0, st0 = {k: v.copy() for k, v in p.items()}, optim.adam_init(p)
    run(straight, ema0, st0, grads)

    first, ema1, st1 = {k: v.copy() for k, v in p.items()}, {k: v.copy() for k, v in p.items()}, optim.adam_init(p)
    run(first, ema1, st1, grads[:3])
    ckpt.save_checkpoint(tmp_path / "c.h5", first, ema=ema1, opt_state=st1, step=3)
    back = ckpt.load_checkpoint(tmp_path / "c.h5", expect_params=p)
    run(back["params"], back["ema"], back["opt_state"], grads[3:])
    _assert_same_arrays(back["params"], straight)
    _assert_same_arrays(back["ema"], ema0)
    assert back["opt_state"].step == st0.step == 5


# ----------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------

def _crash_on_call(monkeypatch, target, name, n, exc):
    """Make target.name raise exc on its n-th call (earlier calls run normally)."""
    real = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, wrapper)


CRASHES = {
    "while writing a group": (ckpt, "_write_group", 3, KeyboardInterrupt("simulated Ctrl-C")),
    "inside h5py": (h5py.Group, "create_dataset", 7, OSError("simulated disk full")),
    "at fsync": (os, "fsync", 1, OSError("simulated I/O error")),
    "at the rename": (os, "replace", 1, OSError("simulated rename failure")),
}


@pytest.mark.parametrize("crash", list(CRASHES), ids=lambda s: s.replace(" ", "-"))
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, rng, monkeypatch, crash):
    p, st = _trained(rng, np.float32)
    path = tmp_path / "checkpoint.h5"
    ckpt.save_checkpoint(path, p, ema=p, opt_state=st, step=1)
    target, name, n, exc = CRASHES[crash]
    newer = {k: v + 1 for k, v in p.items()}
    with monkeypatch.context() as mp:
        _crash_on_call(mp, target, name, n, exc)
        with pytest.raises(type(exc), match="simulated"):
            ckpt.save_checkpoint(path, newer, ema=newer, opt_state=st, step=2)
    back = ckpt.load_checkpoint(path)                      # the old checkpoint, whole
    assert back["step"] == 1
    _assert_same_arrays(back["params"], p)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.h5"]          # no temp file left behind


def test_crash_during_the_first_save_leaves_nothing(tmp_path, rng, monkeypatch):
    _crash_on_call(monkeypatch, ckpt, "_write_group", 1, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(tmp_path / "c.h5", _params(rng, np.float32))
    assert os.listdir(tmp_path) == []


def test_stale_temp_file_of_a_killed_process_is_removed(tmp_path, rng):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                            # a pid that no longer runs
    stale = tmp_path / f"c.h5.tmp-{dead.pid}"
    stale.write_bytes(b"half a checkpoint")
    ckpt.save_checkpoint(tmp_path / "c.h5", _params(rng, np.float32))
    assert sorted(os.listdir(tmp_path)) == ["c.h5"]


def test_bad_arguments_fail_before_touching_the_disk(tmp_path, rng):
    p = _params(rng, np.float32)
    with pytest.raises(ValueError, match="config"):
        ckpt.save_checkpoint(tmp_path / "c.h5", p, config={"fn": print})
    with pytest.raises(ValueError, match="'a/b'.*without '/'"):
        ckpt.save_checkpoint(tmp_path / "c.h5", {"a/b": np.zeros(2)})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# Errors that name the problem
# ----------------------------------------------------------------------------

def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*does not exist"):
        ckpt.load_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint.h5"):
        ckpt.load_checkpoint(tmp_path)


def test_corrupt_and_foreign_files(tmp_path, rng):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(ckpt.CheckpointError, match="junk.h5 is not a readable ttfm_np checkpoint.*not an HDF5"):
        ckpt.load_checkpoint(junk)
    assert issubclass(ckpt.CheckpointError, ValueError)

    good = tmp_path / "good.h5"
    ckpt.save_checkpoint(good, _params(rng, np.float64), step=5)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])          # an interrupted copy
    with pytest.raises(ValueError, match="truncated.h5.*(not a readable|damaged).*truncated file"):
        ckpt.load_checkpoint(truncated)

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ckpt.CheckpointError, match="foreign.h5 is HDF5 but not a ttfm_np checkpoint"):
        ckpt.load_checkpoint(foreign)


def test_damaged_layout_is_named(tmp_path, rng):
    p = _params(rng, np.float64)
    path = tmp_path / "c.h5"
    ckpt.save_checkpoint(path, p, ema=p)
    with h5py.File(path, "a") as f:
        del f.attrs["config_json"]
        del f["ema/dec.out.gamma"]
    with pytest.raises(ckpt.CheckpointError, match="checksum trailer is missing.*edited with h5py"):
        ckpt.load_checkpoint(path)                         # an edit by hand breaks the checksums ...
    ckpt.seal_file(path)                                   # ... unless resealed: then the layout checks speak
    with pytest.raises(ckpt.CheckpointError, match="config_json"):
        ckpt.load_checkpoint(path)
    ckpt.save_checkpoint(path, p, ema=p)
    with h5py.File(path, "a") as f:
        del f["ema/dec.out.gamma"]
    ckpt.seal_file(path)
    with pytest.raises(ckpt.CheckpointError, match="EMA copy does not fit.*missing: dec.out.gamma"):
        ckpt.load_checkpoint(path)


def test_newer_format_version_is_refused(tmp_path, rng):
    path = tmp_path / "newer.h5"
    ckpt.save_checkpoint(path, _params(rng, np.float32))
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = ckpt.FORMAT_VERSION + 1
    ckpt.seal_file(path)
    with pytest.raises(ckpt.CheckpointError, match=f"format {ckpt.FORMAT_VERSION + 1}, newer.*upgrade"):
        ckpt.load_checkpoint(path)


def test_parameter_mismatch_names_every_problem(tmp_path, rng):
    expected = {"a.weight": np.zeros((2, 3)), "b.bias": np.zeros(4), "c.gain": np.zeros(1), "e": np.zeros(2)}
    loaded = {"a.weight": np.zeros((3, 3)), "b.bias": np.zeros(4), "d.extra": np.zeros(1), "e": np.zeros(5)}
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_params_match(expected, loaded)
    msg = str(err.value)
    assert "missing: c.gain" in msg and "unexpected: d.extra" in msg
    assert "a.weight: (3, 3) in the checkpoint, (2, 3) expected" in msg and "e: (5,)" in msg
    ckpt.check_params_match(expected, dict(expected))                             # a match passes

    path = tmp_path / "c.h5"
    ckpt.save_checkpoint(path, loaded)
    with pytest.raises(ckpt.CheckpointError, match="missing: c.gain.*unexpected: d.extra.*a.weight"):
        ckpt.load_checkpoint(path, expect_params=expected)


def test_expect_config_names_mismatches(tmp_path, rng):
    path = tmp_path / "c.h5"
    config = {"model": {"kind": "unet", "channels": [32, 64]}, "data": "cifar10", "seed": 1}
    ckpt.save_checkpoint(path, _params(rng, np.float32), config=config)
    ok = ckpt.load_checkpoint(path, expect_config={"model.kind": "unet", "model": {"channels": (32, 64)},
                                                   "data": "cifar10"})        # dotted or nested; tuple == list
    assert ok["config"] == config
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(path, expect_config={"model": {"kind": "mlp"}, "data": "cifar10",
                                                  "model.dropout": 0.1, "seed": 2})
    msg = str(err.value)
    assert "model.kind is 'unet' in the checkpoint" in msg and "'mlp' expected" in msg
    assert "model.dropout is not in the checkpoint" in msg and "seed is 1" in msg
    assert "data is" not in msg and "data " not in msg                            # matching keys stay quiet


def test_latest_checkpoint(tmp_path, rng):
    assert ckpt.latest_checkpoint(tmp_path) is None
    p = _params(rng, np.float32)
    for step in (2, 10, 9):
        ckpt.save_checkpoint(tmp_path / f"checkpoint_{step}.h5", p, step=step)
    assert ckpt.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_10.h5")
    ckpt.save_checkpoint(tmp_path / "checkpoint.h5", p)
    assert ckpt.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint.h5")


@pytest.mark.gpu
def test_save_accepts_cupy_arrays(tmp_path, rng):
    if not backend.gpu_available():
        pytest.skip(f"no usable GPU: {backend.gpu_problem()}")
    import cupy as cp
    p, st = _trained(rng, np.float32)
    pg = {k: cp.asarray(v) for k, v in p.items()}
    stg = optim.adam_state_to_device(st, cp, np.float32)
    ckpt.save_checkpoint(tmp_path / "c.h5", pg, ema=pg, opt_state=stg)
    back = ckpt.load_checkpoint(tmp_path / "c.h5")
    _assert_same_arrays(back["params"], p)
    _assert_same_arrays(back["opt_state"].v, st.v)
