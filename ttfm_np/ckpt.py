"""HDF5 checkpoints, written atomically.

Layout (format_version 1):
    /params/<name>     one dataset per parameter (names keep their dots)
    /ema/<name>        EMA copy (optional)
    /adam_m/<name>     Adam first moments (optional)
    /adam_v/<name>     Adam second moments
    attrs: format_version, step, adam_step, config_json, rng_state_json

Atomic write: everything goes to `<path>.tmp-<pid>` in the same folder, is
flushed and fsync'ed, then `os.replace`d over the old file. A crash at any
point leaves the previous checkpoint untouched, and the temp file is removed.
"""
from __future__ import annotations

import json
import os

import h5py
import numpy as np

from . import backend
from .optim import AdamState

FORMAT_VERSION = 1
GROUPS = ("params", "ema", "adam_m", "adam_v")


class CheckpointError(ValueError):
    """A file that is not a (compatible) ttfm_np checkpoint."""


def _write_group(f, name, arrays):
    g = f.create_group(name)
    for k, v in arrays.items():
        g.create_dataset(k, data=backend.to_numpy(v))


def save_checkpoint(path, params, ema=None, opt_state: AdamState | None = None, step: int = 0,
                    rng_state=None, config=None, extra=None):
    """Write a checkpoint atomically (temp file + fsync + rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["step"] = int(step)
            f.attrs["config_json"] = json.dumps(config or {}, sort_keys=True)
            f.attrs["rng_state_json"] = json.dumps(rng_state, sort_keys=True)
            f.attrs["extra_json"] = json.dumps(extra or {}, sort_keys=True)
            _write_group(f, "params", params)
            if ema is not None:
                _write_group(f, "ema", ema)
            if opt_state is not None:
                f.attrs["adam_step"] = int(opt_state.step)
                _write_group(f, "adam_m", opt_state.m)
                _write_group(f, "adam_v", opt_state.v)
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        try:                                   # make the rename itself durable
            dfd = os.open(folder, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_group(f, name):
    if name not in f:
        return None
    return {k: f[name][k][()] for k in f[name].keys()}


def load_checkpoint(path) -> dict:
    """Read a checkpoint into NumPy arrays: dict with params, ema, opt_state, step, rng_state, config."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist (train or distill writes checkpoint.h5 "
                                "into its --out folder)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"{path} is not a readable HDF5 file (corrupt or not a ttfm_np checkpoint): {exc}")
    with f:
        if "format_version" not in f.attrs or "params" not in f:
            raise CheckpointError(f"{path} is HDF5 but not a ttfm_np checkpoint (no format_version/params)")
        version = int(f.attrs["format_version"])
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path} has checkpoint format {version}, newer than this ttfm_np "
                                  f"understands ({FORMAT_VERSION}): upgrade ttfm_np")
        try:
            out = dict(
                format_version=version,
                step=int(f.attrs["step"]),
                config=json.loads(f.attrs["config_json"]),
                rng_state=json.loads(f.attrs["rng_state_json"]),
                extra=json.loads(f.attrs.get("extra_json", "{}")),
                params=_read_group(f, "params"),
                ema=_read_group(f, "ema"),
            )
            m, v = _read_group(f, "adam_m"), _read_group(f, "adam_v")
        except (KeyError, ValueError, OSError) as exc:
            raise CheckpointError(f"{path} is damaged ({exc.__class__.__name__}: {exc})")
        out["opt_state"] = AdamState(step=int(f.attrs.get("adam_step", 0)), m=m, v=v) if m is not None else None
    return out


def check_params_match(expected: dict, loaded: dict, what: str = "checkpoint"):
    """Raise CheckpointError naming every missing, unexpected and mis-shaped parameter."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shapes = [f"{k}: {tuple(loaded[k].shape)} in the {what}, {tuple(expected[k].shape)} expected"
              for k in sorted(set(expected) & set(loaded)) if tuple(loaded[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes))
    if problems:
        raise CheckpointError(f"the {what}'s parameters do not fit this model ({' | '.join(problems)}); "
                              "was it written for another --model or dataset?")
