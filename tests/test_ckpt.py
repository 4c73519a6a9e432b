"""HDF5 checkpoints (ttfm_np/ckpt.py): exact round trips, atomic saves that
survive a crash, and errors that name the problem."""
import errno
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


# ----------------------------------------------------------------------------
# Checksums: damage is found before anything is trusted
# ----------------------------------------------------------------------------

def _unet_checkpoint(tmp_path, name="checkpoint.h5", seed=0):
    """A real checkpoint of the tiny U-Net (params, EMA, Adam moments)."""
    from ttfm_np import model, unet
    cfg = unet.preset_config("tiny", in_channels=3, resolution=32)
    p = model.init_model(cfg, seed)
    st = optim.adam_init(p)
    ema = {k: v * 0.5 for k, v in p.items()}
    path = tmp_path / name
    ckpt.save_checkpoint(path, p, ema=ema, opt_state=st, step=7, config={"model": "tiny"})
    return path, p


def _flip(path, offset, mask=0x40):
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _data_offset(path, key):
    with h5py.File(path, "r") as f:
        ds = f[key]
        return ds.id.get_offset(), ds.nbytes


def test_a_flipped_byte_inside_a_parameter_names_that_array(tmp_path):
    path, p = _unet_checkpoint(tmp_path)
    key = "params/enc.32x32_block0.conv0.weight"
    offset, nbytes = _data_offset(path, key)
    with h5py.File(path, "r") as f:                     # the offset really is that array's data
        np.testing.assert_array_equal(
            np.frombuffer(path.read_bytes()[offset:offset + nbytes], f[key].dtype).reshape(f[key].shape),
            p["enc.32x32_block0.conv0.weight"])
    _flip(path, offset + nbytes // 2 + 3)               # an exponent bit: the weight goes wild, HDF5 is happy
    with h5py.File(path, "r") as f:                     # h5py alone would hand out the wrong weights silently
        assert not np.array_equal(f[key][()], p["enc.32x32_block0.conv0.weight"])
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(path)
    msg = str(err.value)
    assert f"checkpoint {path} is damaged: {key} fails its checksum" in msg, msg
    assert "restore it from a backup or retrain" in msg
    assert "ema/" not in msg and "params/enc.32x32_block0.conv0.bias" not in msg   # only the damaged one


def test_damage_message_points_at_the_previous_generation(tmp_path):
    path, p = _unet_checkpoint(tmp_path)
    ckpt.save_checkpoint(path, p, step=8, keep_previous=True)
    key = "params/emb.fc1.weight"
    offset, nbytes = _data_offset(path, key)
    _flip(path, offset)
    with pytest.raises(ckpt.CheckpointError,
                       match=f"{re.escape(key)} fails its checksum; restore {re.escape(str(tmp_path / 'checkpoint.prev.h5'))}"):
        ckpt.load_checkpoint(path)
    assert ckpt.load_checkpoint(tmp_path / "checkpoint.prev.h5")["step"] == 7      # and that one is whole


def test_every_single_byte_flip_is_detected(tmp_path):
    """Flip one byte anywhere (HDF5 metadata, arrays, attributes, trailer): every load must refuse the file.

    Damaged HDF5 metadata can crash the HDF5 library itself (a segfault, seen with
    h5py 3.16 / HDF5 2.0), so this also checks that a damaged file never reaches it.
    """
    path, _ = _unet_checkpoint(tmp_path)
    good = path.read_bytes()
    gen = np.random.default_rng(1)
    positions = np.concatenate([np.arange(0, 4096, 17), gen.integers(0, len(good), 150),
                                gen.integers(len(good) - 20_000, len(good), 150),    # the manifest
                                np.arange(len(good) - 60, len(good))])               # the footer
    outcomes = {}
    for pos in positions:
        data = bytearray(good)
        data[pos] ^= 1 << int(gen.integers(8))
        path.write_bytes(bytes(data))
        with pytest.raises(ckpt.CheckpointError) as err:
            ckpt.load_checkpoint(path)
        kind = re.search(r"fails? (its|their) checksums?|not a readable|trailer|checksum table", str(err.value))
        assert kind is not None, str(err.value)
        outcomes[kind.group(0)] = outcomes.get(kind.group(0), 0) + 1
    assert "fails its checksum" in outcomes and "not a readable" in outcomes, outcomes   # both kinds were hit
    path.write_bytes(good)
    assert ckpt.load_checkpoint(path)["step"] == 7


def test_hdf5_metadata_damage_is_a_checkpoint_error(tmp_path, monkeypatch):
    """What h5py raises for damaged metadata of files without checksums (format 1) becomes CheckpointError."""
    path, _ = _unet_checkpoint(tmp_path)
    for exc in (RuntimeError("Link iteration failed"), KeyError("Unable to open object"), OSError("Bad heap")):
        def broken(self, *args, exc=exc, **kwargs):
            raise exc
        with monkeypatch.context() as mp:
            mp.setattr(h5py.Group, "items", broken)
            with pytest.raises(ckpt.CheckpointError, match=f"not a readable ttfm_np checkpoint.*"
                                                           f"{type(exc).__name__}.*{re.escape(str(exc.args[0]))}"):
                ckpt.load_checkpoint(path)


def _as_format_1(path):
    """What an older ttfm_np wrote: the same HDF5 without the trailer, format_version 1."""
    data = path.read_bytes()
    n = int.from_bytes(data[-48:-40], "little")
    path.write_bytes(data[:len(data) - 48 - n])
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 1


def test_format_1_files_load_with_a_warning(tmp_path):
    path, p = _unet_checkpoint(tmp_path)
    _as_format_1(path)
    with pytest.warns(UserWarning, match="format-1 checkpoint without checksums"):
        back = ckpt.load_checkpoint(path)
    assert back["format_version"] == 1 and back["step"] == 7
    _assert_same_arrays(back["params"], p)
    assert back["opt_state"] is not None and back["ema"] is not None


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -30, -48, -49])
def test_truncated_files_are_refused(tmp_path, keep):
    """Cut anywhere (in the HDF5 part, in the trailer, just before it): never a silent load."""
    path, _ = _unet_checkpoint(tmp_path)
    data = path.read_bytes()
    n_manifest = int.from_bytes(data[-48:-40], "little")
    cut = {0.5: len(data) // 2, -49: len(data) - 48 - n_manifest}.get(keep, keep if keep >= 0 else len(data) + keep)
    path.write_bytes(data[:cut])
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(path)) + ".*(damaged|not a readable)"):
        ckpt.load_checkpoint(path)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "c.h5"
    path.mkdir()                                            # a folder without checkpoint.h5 ...
    with pytest.raises(FileNotFoundError, match="holds no checkpoint.h5"):
        ckpt.load_checkpoint(path)
    nonhdf5 = tmp_path / "notes.txt"
    nonhdf5.write_text("step 5\n" * 20)
    with pytest.raises(ckpt.CheckpointError, match="notes.txt is not a readable ttfm_np checkpoint: it is not an HDF5"):
        ckpt.load_checkpoint(nonhdf5)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="empty.h5 is not a readable ttfm_np checkpoint: the file is empty"):
        ckpt.load_checkpoint(empty)


def test_wrong_shape_parameter_in_a_real_checkpoint(tmp_path):
    path, p = _unet_checkpoint(tmp_path)
    expected = dict(p)
    expected["enc.32x32_block0.conv0.weight"] = np.zeros((5, 5, 3, 3), np.float32)
    with pytest.raises(ckpt.CheckpointError, match=r"enc.32x32_block0.conv0.weight: \(\d+, \d+, 3, 3\) in the "
                                                   r"checkpoint, \(5, 5, 3, 3\) expected"):
        ckpt.load_checkpoint(path, expect_params=expected)


# ----------------------------------------------------------------------------
# Disk full, unwritable folders
# ----------------------------------------------------------------------------

def _fill_up_after(monkeypatch, n_bytes, err=errno.ENOSPC):
    """os.write that stores n_bytes and then fails like a full disk (a partial write first, as the kernel does)."""
    written = {"n": 0}

    def write(fd, chunk):
        room = n_bytes - written["n"]
        if room <= 0:
            raise OSError(err, os.strerror(err))
        n = os.write(fd, bytes(chunk[:room]))
        written["n"] += n
        return n
    monkeypatch.setattr(ckpt, "_write_chunk", write)
    monkeypatch.setattr(ckpt, "_WRITE_CHUNK", 4096)      # several writes per file, as for a big checkpoint


@pytest.mark.parametrize("keep_previous", [False, True])
def test_disk_full_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch, keep_previous):
    path, p = _unet_checkpoint(tmp_path)
    before = path.read_bytes()
    if keep_previous:
        ckpt.save_checkpoint(path, p, step=8, keep_previous=True)
        before, prev_before = path.read_bytes(), (tmp_path / "checkpoint.prev.h5").read_bytes()
    newer = {k: v + 1 for k, v in p.items()}
    with monkeypatch.context() as mp:
        _fill_up_after(mp, 10_000)
        with pytest.raises(ckpt.CheckpointWriteError) as err:
            ckpt.save_checkpoint(path, newer, step=9, keep_previous=keep_previous)
    e = err.value
    assert isinstance(e, OSError) and isinstance(e, ckpt.CheckpointError) and e.errno == errno.ENOSPC
    assert str(e) == (f"could not write checkpoint {path}: No space left on device; the previous checkpoint "
                      f"{path} is intact; free space and resume with --resume")
    assert path.read_bytes() == before                                   # untouched, byte for byte
    assert ckpt.load_checkpoint(path)["step"] == (8 if keep_previous else 7)
    expected = ["checkpoint.h5"] + (["checkpoint.prev.h5"] if keep_previous else [])
    assert sorted(os.listdir(tmp_path)) == expected                      # the temp file is gone
    if keep_previous:
        assert (tmp_path / "checkpoint.prev.h5").read_bytes() == prev_before


def test_unwritable_folder_is_a_clear_error(tmp_path, monkeypatch):
    path, p = _unet_checkpoint(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(ckpt.os, "open", refuse)
    with pytest.raises(ckpt.CheckpointWriteError, match="Permission denied; the previous checkpoint .* is intact; "
                                                        "make the folder writable or choose another --out"):
        ckpt.save_checkpoint(path, p, step=8)
    monkeypatch.undo()
    with pytest.raises(ckpt.CheckpointWriteError, match="Permission denied; no checkpoint was written"):
        with monkeypatch.context() as mp:
            mp.setattr(ckpt.os, "open", refuse)
            ckpt.save_checkpoint(tmp_path / "fresh.h5", p)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.h5"]


def test_a_real_enospc_from_the_kernel(tmp_path, rng):
    """/dev/full fails every write with ENOSPC: let the temp file be a link to it."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    path = tmp_path / "c.h5"
    p = _params(rng, np.float32)
    ckpt.save_checkpoint(path, p, step=1)
    os.symlink("/dev/full", f"{path}.tmp-{os.getpid()}")
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left on device") as err:
        ckpt.save_checkpoint(path, p, step=2)
    assert err.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["c.h5"] and ckpt.load_checkpoint(path)["step"] == 1


def _mount_tmpfs(folder, options):
    import shutil
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("tmpfs mounts need Linux and the mount command")
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")


@pytest.mark.parametrize("fs", ["full", "read-only"])
def test_a_really_full_or_read_only_file_system(tmp_path, fs):
    from ttfm_np import model, unet
    p = model.init_model(unet.preset_config("tiny", in_channels=3, resolution=32), 0)   # ~170 kB per copy
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "size=256k")
    try:
        path = mnt / "checkpoint.h5"
        ckpt.save_checkpoint(path, p, step=1)                             # fits
        if fs == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            want = (errno.EROFS, "Read-only file system.*make the folder writable")
        else:
            want = (errno.ENOSPC, "No space left on device.*free space and resume")
        with pytest.raises(ckpt.CheckpointWriteError, match=want[1]) as err:
            ckpt.save_checkpoint(path, p, ema=p, opt_state=optim.adam_init(p), step=2, keep_previous=True)
        assert err.value.errno == want[0]
        assert sorted(os.listdir(mnt)) == ["checkpoint.h5"]               # no temp file, no half rotation
        back = ckpt.load_checkpoint(path)
        assert back["step"] == 1
        _assert_same_arrays(back["params"], p)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ----------------------------------------------------------------------------
# Two generations
# ----------------------------------------------------------------------------

def test_keep_previous_keeps_one_older_generation(tmp_path, rng):
    path = tmp_path / "checkpoint.h5"
    prev = tmp_path / "checkpoint.prev.h5"
    assert ckpt.previous_path(path) == str(prev) and ckpt.previous_path("x") == "x.prev"
    gens = [{k: v + i for k, v in _params(rng, np.float32).items()} for i in range(3)]
    ckpt.save_checkpoint(path, gens[0], step=0, keep_previous=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.h5"]                      # nothing to keep yet
    for i in (1, 2):
        ckpt.save_checkpoint(path, gens[i], step=i, keep_previous=True)
        now, before = ckpt.load_checkpoint(path), ckpt.load_checkpoint(prev)
        assert (now["step"], before["step"]) == (i, i - 1)
        _assert_same_arrays(now["params"], gens[i])
        _assert_same_arrays(before["params"], gens[i - 1])
        assert os.stat(path).st_ino != os.stat(prev).st_ino                       # two files, not one
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.h5", "checkpoint.prev.h5"]
    ckpt.save_checkpoint(path, gens[0], step=3)                                   # default: no rotation
    assert ckpt.load_checkpoint(prev)["step"] == 1


def test_a_whole_checkpoint_exists_at_every_instant(tmp_path, rng, monkeypatch):
    """Before every rename/link of a rotating save, checkpoint.h5 loads and holds a saved state."""
    path = tmp_path / "checkpoint.h5"
    p = _params(rng, np.float32)
    ckpt.save_checkpoint(path, p, step=1, keep_previous=True)
    ckpt.save_checkpoint(path, p, step=2, keep_previous=True)
    seen = []

    def checked(real):
        def call(*args, **kwargs):
            seen.append((real.__name__, ckpt.load_checkpoint(path)["step"],
                         ckpt.load_checkpoint(ckpt.previous_path(path))["step"]))
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(ckpt.os, "replace", checked(os.replace))
    monkeypatch.setattr(ckpt.os, "link", checked(os.link))
    ckpt.save_checkpoint(path, p, step=3, keep_previous=True)
    monkeypatch.undo()
    assert seen == [("link", 2, 1), ("replace", 2, 1), ("replace", 2, 2)]
    assert (ckpt.load_checkpoint(path)["step"], ckpt.load_checkpoint(ckpt.previous_path(path))["step"]) == (3, 2)


def test_rotation_without_hard_links_copies(tmp_path, rng, monkeypatch):
    path = tmp_path / "checkpoint.h5"
    p = _params(rng, np.float32)
    ckpt.save_checkpoint(path, p, step=1)

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(ckpt.os, "link", no_links)
    ckpt.save_checkpoint(path, p, step=2, keep_previous=True)
    assert ckpt.load_checkpoint(ckpt.previous_path(path))["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.h5", "checkpoint.prev.h5"]


_KILL_LOOP = """
import sys, numpy as np
from ttfm_np import ckpt
p = {"w": np.zeros((64, 64), np.float32), "b": np.zeros(64, np.float32)}
step = int(sys.argv[2])
while True:
    step += 1
    ckpt.save_checkpoint(sys.argv[1], {k: v + step for k, v in p.items()}, step=step, keep_previous=True)
"""


def test_kill_9_during_rotating_saves(tmp_path):
    """SIGKILL at random moments: both generations always load, hold what their step says, and differ by 1."""
    import signal
    import time
    path = tmp_path / "checkpoint.h5"
    gen = np.random.default_rng(3)
    step = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_LOOP, str(path), str(step)],
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        deadline = time.time() + 30
        while not path.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.05 + 0.2 * gen.random())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = ckpt.load_checkpoint(path)
        step = now["step"]
        np.testing.assert_array_equal(now["params"]["w"], np.full((64, 64), step, np.float32))
        if ckpt.load_checkpoint(path)["step"] > 1 and os.path.exists(ckpt.previous_path(path)):
            before = ckpt.load_checkpoint(ckpt.previous_path(path))
            assert before["step"] in (step - 1, step)          # killed between the link and the last rename: equal
            np.testing.assert_array_equal(before["params"]["b"], np.full(64, before["step"], np.float32))
    ckpt.save_checkpoint(path, {"w": np.zeros(1)}, keep_previous=True)            # the next save cleans up
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.h5", "checkpoint.prev.h5"]


def test_rotation_after_a_kill_between_the_two_renames(tmp_path, rng):
    """Killed after prev := current but before current := new: both names are links to one file.

    rename() between two links of one file does nothing (POSIX), so a naive rotation would leave its temp
    link behind; the next save must keep the state and leave exactly two files.
    """
    path = tmp_path / "checkpoint.h5"
    p = _params(rng, np.float32)
    ckpt.save_checkpoint(path, p, step=1)
    os.link(path, ckpt.previous_path(path))
    ckpt.save_checkpoint(path, p, step=2, keep_previous=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.h5", "checkpoint.prev.h5"]
    assert (ckpt.load_checkpoint(path)["step"], ckpt.load_checkpoint(ckpt.previous_path(path))["step"]) == (2, 1)
