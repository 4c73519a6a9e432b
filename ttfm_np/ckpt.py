"""HDF5 checkpoints, written atomically.

Layout (format_version 1):

    /params/<name>     one dataset per parameter (names keep their dots)
    /ema/<name>        EMA copy of the parameters (optional)
    /adam_m/<name>     Adam first moments (optional, with adam_v)
    /adam_v/<name>     Adam second moments
    attrs: format_version (int), step (int), adam_step (int, with the moments),
           config_json, rng_state_json, extra_json (JSON text)

Groups keep the insertion order of their datasets (track_order), so a loaded
dict lists its parameters in the order the model created them.

Atomic write: everything goes to `<path>.tmp-<pid>` in the same folder, is
flushed and fsync'ed, then `os.replace`d over the old file (a rename within one
file system is atomic), and the folder is fsync'ed so the rename survives a
power cut. A crash at any point leaves the previous checkpoint untouched, and
the temp file is removed (or, after a hard kill, removed by the next save).

RNG state: `rng_state` is any JSON-able value (the training loop stores a dict
of seeds and iterator states); a numpy Generator or BitGenerator in it is
stored as its `bit_generator.state`. JSON integers are arbitrary precision in
Python, so PCG64's 128-bit state and increment round-trip exactly; numpy arrays
(e.g. MT19937's key) are stored as tagged lists. `restore_rng(state)` rebuilds
a Generator that continues the saved stream.

Arrays come back as NumPy; the caller moves them to its device.
"""
from __future__ import annotations

import glob
import json
import os
import re

import h5py
import numpy as np

from . import backend
from .optim import AdamState

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.h5"
GROUPS = ("params", "ema", "adam_m", "adam_v")
_REQUIRED_ATTRS = ("format_version", "step", "config_json", "rng_state_json")


class CheckpointError(ValueError):
    """A file that is not a (compatible) ttfm_np checkpoint, or does not fit the model."""


# ----------------------------------------------------------------------------
# JSON for config, RNG state and extras
# ----------------------------------------------------------------------------

def _json_default(obj):
    """What json.dumps cannot encode by itself: numpy values, generators, paths."""
    if isinstance(obj, np.random.Generator):
        return obj.bit_generator.state
    if isinstance(obj, np.random.BitGenerator):
        return obj.state
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):            # np.int64, np.float32, np.bool_ ...
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _json_object_hook(d):
    if "__ndarray__" in d:
        return np.array(d["__ndarray__"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])
    return d


def _dumps(what: str, value) -> str:
    try:
        return json.dumps(value, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot store the {what} in a checkpoint: {exc}; pass plain dicts, lists, "
                         "numbers, strings, numpy values or numpy Generators") from None


def _loads(text):
    if isinstance(text, bytes):                # files written by older h5py store bytes
        text = text.decode("utf-8")
    return json.loads(text, object_hook=_json_object_hook)


def restore_rng(state) -> np.random.Generator:
    """A numpy Generator continuing a saved `bit_generator.state` (as load_checkpoint returns it)."""
    if isinstance(state, np.random.Generator):
        return state
    try:
        bit_generator = getattr(np.random, state["bit_generator"])()
        bit_generator.state = state
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"not a numpy bit generator state ({exc.__class__.__name__}: {exc}): "
                         "expected a dict with 'bit_generator' and 'state'") from None
    return np.random.Generator(bit_generator)


# ----------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------

def _check_names(group: str, arrays: dict):
    for name in arrays:
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name:
            raise ValueError(f"{group} name {name!r} cannot be a checkpoint dataset name: use a non-empty "
                             "string without '/' (dots are fine)")


def _write_group(f, name, arrays):
    """One dataset per array, in insertion order; cupy arrays are copied to the host."""
    g = f.create_group(name, track_order=True)
    for k, v in arrays.items():
        g.create_dataset(k, data=backend.to_numpy(v))


def _remove_stale_temps(path: str):
    """Temp files of earlier saves whose process is gone (a hard kill skips the cleanup)."""
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        m = re.fullmatch(r".*\.tmp-(\d+)", tmp)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)        # raises when no such process exists
        except ProcessLookupError:
            try:
                os.remove(tmp)
            except OSError:
                pass
        except (PermissionError, OSError):
            pass                               # the process exists (another user's) or we cannot tell


def _fsync_folder(folder: str):
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, params, ema=None, opt_state: AdamState | None = None, step: int = 0,
                    rng_state=None, config=None, extra=None) -> None:
    """Write a checkpoint atomically (temp file + flush + fsync + rename).

    params, ema: dict name -> numpy/cupy array; opt_state: AdamState (moments
    saved under adam_m/, adam_v/); rng_state, config, extra: JSON-able values
    (see the module docstring). Everything is validated and serialised before
    the temp file is created, so a bad argument never touches the disk.
    """
    path = os.fspath(path)
    _check_names("parameter", params)
    if ema is not None:
        _check_names("EMA parameter", ema)
    if opt_state is not None:
        _check_names("Adam moment", opt_state.m)
        _check_names("Adam moment", opt_state.v)
    texts = {"config_json": _dumps("config", {} if config is None else config),
             "rng_state_json": _dumps("RNG state", rng_state),
             "extra_json": _dumps("extra data", {} if extra is None else extra)}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temps(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["step"] = int(step)
            for key, text in texts.items():
                f.attrs[key] = text
            _write_group(f, "params", params)
            if ema is not None:
                _write_group(f, "ema", ema)
            if opt_state is not None:
                f.attrs["adam_step"] = int(opt_state.step)
                _write_group(f, "adam_m", opt_state.m)
                _write_group(f, "adam_v", opt_state.v)
            f.flush()
        with open(tmp, "rb+") as fh:           # h5py's flush hands data to the OS; fsync puts it on disk
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:                      # KeyboardInterrupt too: never leave a half-written temp file
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


# ----------------------------------------------------------------------------
# Loading and checking
# ----------------------------------------------------------------------------

def _read_group(f, name):
    if name not in f:
        return None
    group = f[name]
    if not isinstance(group, h5py.Group):
        raise CheckpointError(f"/{name} is not a group")
    out = {}
    for k, ds in group.items():
        if not isinstance(ds, h5py.Dataset):
            raise CheckpointError(f"/{name}/{k} is not a dataset")
        out[k] = np.asarray(ds[()])            # np.asarray: a 0-d dataset comes back as a 0-d array
    return out


def _mismatch_problems(expected: dict, loaded: dict, what: str) -> list:
    """Every missing key, unexpected key and shape mismatch, as readable strings."""
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    shapes = [f"{k}: {tuple(loaded[k].shape)} in the {what}, {tuple(expected[k].shape)} expected"
              for k in expected if k in loaded and tuple(loaded[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes))
    return problems


def check_params_match(expected: dict, loaded: dict, what: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped parameter at once.

    expected: the model's parameter dict (arrays, or anything with .shape);
    loaded: the checkpoint's.
    """
    problems = _mismatch_problems(expected, loaded, what)
    if problems:
        raise CheckpointError(f"the {what}'s parameters do not fit this model ({' | '.join(problems)}); "
                              "was it written for another --model or dataset?")


_MISSING = object()


def _flatten_expected(expected: dict, prefix=()):
    """(path, value) for every leaf; nested dicts and dotted keys ("model.kind") both give paths."""
    for key, value in expected.items():
        path = prefix + tuple(str(key).split("."))
        if isinstance(value, dict) and value:
            yield from _flatten_expected(value, path)
        else:
            yield path, value


def _lookup(config, path):
    node = config
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _normalise(value):
    """Compare as JSON does: tuples equal lists, numpy scalars equal Python numbers."""
    return json.loads(json.dumps(value, default=_json_default))


def check_config_match(expected: dict, config: dict, what: str = "checkpoint") -> None:
    """Raise CheckpointError naming every key of `expected` whose value differs in `config`.

    expected: the keys to compare, nested ({"model": {"kind": "unet"}}) or
    dotted ({"model.kind": "unet"}); keys not named are not compared.
    """
    problems = []
    for path, want in _flatten_expected(expected):
        name = ".".join(path)
        got = _lookup(config, path)
        if got is _MISSING:
            problems.append(f"{name} is not in the {what}'s config ({_normalise(want)!r} expected)")
        elif _normalise(got) != _normalise(want):
            problems.append(f"{name} is {_normalise(got)!r} in the {what}, {_normalise(want)!r} expected")
    if problems:
        raise CheckpointError(f"the {what} was written with another configuration: " + "; ".join(problems))


def load_checkpoint(path, expect_config: dict | None = None, expect_params: dict | None = None) -> dict:
    """Read a checkpoint into NumPy arrays.

    Returns a dict with params, ema (or None), opt_state (AdamState or None),
    step, rng_state, config, extra, format_version and path.
    expect_config: config keys that must match (see check_config_match).
    expect_params: the model's parameters; names and shapes must match (see check_params_match).
    path may also be a run folder holding checkpoint.h5.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"the folder {path} holds no {CHECKPOINT_NAME} (train and distill write "
                                    "one into their --out folder)")
        path = found
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist (train or distill writes {CHECKPOINT_NAME} "
                                "into its --out folder)")
    not_ours = (f"{path} is not a readable HDF5 file: it is corrupt (an interrupted copy?) or not a "
                "ttfm_np checkpoint")
    if not h5py.is_hdf5(path):
        raise CheckpointError(not_ours)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"{not_ours} ({exc})") from None
    with f:
        missing = [a for a in _REQUIRED_ATTRS if a not in f.attrs]
        if "format_version" in missing or "params" not in f:
            raise CheckpointError(f"{path} is HDF5 but not a ttfm_np checkpoint (it has no format_version "
                                  "attribute or no params group)")
        try:
            version = int(f.attrs["format_version"])
        except (TypeError, ValueError):
            raise CheckpointError(f"{path} is damaged: format_version is {f.attrs['format_version']!r}") from None
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path} has checkpoint format {version}, newer than this ttfm_np "
                                  f"understands (format {FORMAT_VERSION}): upgrade ttfm_np to read it")
        if version < 1:
            raise CheckpointError(f"{path} is damaged: format_version {version} does not exist")
        if missing:
            raise CheckpointError(f"{path} is damaged or not a ttfm_np checkpoint: attributes "
                                  f"{', '.join(missing)} are missing")
        try:
            out = dict(
                path=path,
                format_version=version,
                step=int(f.attrs["step"]),
                config=_loads(f.attrs["config_json"]),
                rng_state=_loads(f.attrs["rng_state_json"]),
                extra=_loads(f.attrs["extra_json"]) if "extra_json" in f.attrs else {},
                params=_read_group(f, "params"),
                ema=_read_group(f, "ema"),
            )
            m, v = _read_group(f, "adam_m"), _read_group(f, "adam_v")
            adam_step = int(f.attrs.get("adam_step", 0))
        except CheckpointError as exc:
            raise CheckpointError(f"{path} is damaged: {exc}") from None
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise CheckpointError(f"{path} is damaged ({exc.__class__.__name__}: {exc})") from None
    # the optional parts must fit the parameters they belong to
    for what, arrays in (("EMA copy", out["ema"]), ("Adam first moments", m), ("Adam second moments", v)):
        if arrays is not None:
            problems = _mismatch_problems(out["params"], arrays, what)
            if problems:
                raise CheckpointError(f"{path} is damaged: its {what} does not fit its parameters "
                                      f"({' | '.join(problems)})")
    if (m is None) != (v is None):
        raise CheckpointError(f"{path} is damaged: it has only one of adam_m and adam_v")
    out["opt_state"] = AdamState(step=adam_step, m=m, v=v) if m is not None else None
    try:
        if expect_params is not None:
            check_params_match(expect_params, out["params"])
        if expect_config is not None:
            check_config_match(expect_config, out["config"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return out


def latest_checkpoint(folder) -> str | None:
    """The checkpoint to resume from in a run folder, or None when there is none yet.

    folder/checkpoint.h5 when present (what train and distill write); otherwise
    the highest-numbered checkpoint_<step>.h5 / checkpoint-<step>.h5.
    """
    folder = os.fspath(folder)
    main = os.path.join(folder, CHECKPOINT_NAME)
    if os.path.isfile(main):
        return main
    numbered = []
    for p in glob.glob(os.path.join(glob.escape(folder), "checkpoint*.h5")):
        m = re.fullmatch(r"checkpoint[_-](\d+)\.h5", os.path.basename(p))
        if m and os.path.isfile(p):
            numbered.append((int(m.group(1)), p))
    return max(numbered)[1] if numbered else None
