"""HDF5 checkpoints: atomic, checksummed, with an optional previous generation.

Layout (format_version 2; format 1 is still read):

    /params/<name>     one dataset per parameter (names keep their dots)
    /ema/<name>        EMA copy of the parameters (optional)
    /adam_m/<name>     Adam first moments (optional, with adam_v)
    /adam_v/<name>     Adam second moments
    attrs: format_version (int), step (int), adam_step (int, with the moments),
           config_json, rng_state_json, extra_json (JSON text)
    + a checksum trailer after the HDF5 bytes (format 2, see below)

Groups keep the insertion order of their datasets (track_order), so a loaded
dict lists its parameters in the order the model created them.

Checksums (format 2). The HDF5 file is built in memory; behind its last byte
(HDF5 ignores what follows its end-of-file address) comes a trailer:

    manifest JSON | uint64 LE manifest length | sha256(manifest) (32 bytes) | b"TTFMSUM1"

The manifest holds the sha256 of the whole HDF5 image (so the config, step,
names, dtypes and shapes are covered) and, for every array of every group, its
byte offset, length and sha256. Loading verifies the file checksum BEFORE the
HDF5 library parses anything: damaged HDF5 metadata can crash that library
(a segfault, not an exception), so a damaged file never reaches it. When the
file checksum fails, the per-array checksums name the damaged arrays
("params/enc.32x32_block0.conv0.weight fails its checksum"); when all arrays
pass, the damage is in the metadata. Format-1 files (no trailer) load with a
warning: their damage cannot be detected.

Atomic write. The bytes (HDF5 image + trailer) are written with plain file I/O
to `<path>.tmp-<pid>` in the same folder, fsync'ed, then `os.replace`d over the
old file (a rename within one file system is atomic), and the folder is
fsync'ed so the rename survives a power cut. A crash (or kill -9) at any point
leaves the previous checkpoint untouched; the temp file is removed (after a
hard kill: by the next save). A failed write (disk full, read-only or
unwritable folder) raises CheckpointWriteError (an OSError, with the errno)
after removing the temp file; the old checkpoint stays intact.

Two generations (keep_previous=True). Just before the rename, the current
`checkpoint.h5` is hard-linked as `checkpoint.prev.h5` (link to a temp name,
then os.replace, so that name too always holds a whole file). Guarantee: once
one save has finished, at every instant `checkpoint.h5` is a complete
checkpoint (old or new), and after the second save `checkpoint.prev.h5` is the
state saved before it. Which states are worth saving (finite, not exploding)
is the caller's decision; this module only never loses a saved one.

RNG state: `rng_state` is any JSON-able value (the training loop stores a dict
of seeds and iterator states); a numpy Generator or BitGenerator in it is
stored as its `bit_generator.state`. JSON integers are arbitrary precision in
Python, so PCG64's 128-bit state and increment round-trip exactly; numpy arrays
(e.g. MT19937's key) are stored as tagged lists. `restore_rng(state)` rebuilds
a Generator that continues the saved stream.

Arrays come back as NumPy; the caller moves them to its device.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import re
import shutil
import struct
import warnings

import h5py
import numpy as np

from . import backend
from .atomic import _fsync_folder   # makes a rename durable (POSIX)
from .optim import AdamState

FORMAT_VERSION = 2
CHECKPOINT_NAME = "checkpoint.h5"
GROUPS = ("params", "ema", "adam_m", "adam_v")
_REQUIRED_ATTRS = ("format_version", "step", "config_json", "rng_state_json")

TRAILER_MAGIC = b"TTFMSUM1"
_FOOTER = struct.Struct("<Q32s8s")             # manifest length, sha256(manifest), magic
_WRITE_CHUNK = 16 << 20                        # bytes per os.write call


class CheckpointError(ValueError):
    """A file that is not a (compatible) ttfm_np checkpoint, is damaged, or does not fit the model."""


class CheckpointWriteError(CheckpointError, OSError):
    """Saving failed in the file system (disk full, no permission, read-only); the old checkpoint is intact.

    An OSError too: `.errno` says which (errno.ENOSPC, errno.EACCES, errno.EROFS ...).
    """

    def __str__(self):                         # the message, not OSError's "[Errno n] strerror: filename"
        return str(self.args[0])


def previous_path(path) -> str:
    """Where keep_previous=True keeps the generation before `path`: checkpoint.h5 -> checkpoint.prev.h5."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.prev{ext}" if ext else f"{root}.prev"


def _remedy(path: str) -> str:
    """What to do about a damaged checkpoint: name the previous generation when it exists."""
    prev = previous_path(path)
    if os.path.abspath(prev) != os.path.abspath(path) and os.path.isfile(prev):
        return f"restore {prev} (the generation saved before it: copy it over {os.path.basename(path)}) or retrain"
    return "restore it from a backup or retrain"


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


def _write_group(f, name, arrays) -> dict:
    """One dataset per array, in insertion order; cupy arrays are copied to the host (returned: name -> host array)."""
    g = f.create_group(name, track_order=True)
    host = {}
    for k, v in arrays.items():
        host[k] = backend.to_numpy(v)
        g.create_dataset(k, data=host[k])
    return host


def _array_index(f) -> dict:
    """{"group/name": (byte offset in the file, byte count)} of every array of an open checkpoint.

    Datasets are contiguous (no chunks, no compression), so each array is one
    run of raw bytes; an empty one has no storage (offset None, 0 bytes).
    """
    index = {}
    for group in GROUPS:
        if group in f:
            for k, ds in f[group].items():
                offset = ds.id.get_offset()
                index[f"{group}/{k}"] = (offset, ds.id.get_storage_size() if offset is not None else 0)
    return index


def _trailer(image, index: dict) -> bytes:
    """The checksum trailer of an HDF5 image (see the module docstring)."""
    view = memoryview(image)
    arrays = {}
    for key, (offset, nbytes) in index.items():
        chunk = view[offset:offset + nbytes] if nbytes else b""
        arrays[key] = [offset, nbytes, hashlib.sha256(chunk).hexdigest()]
    manifest = json.dumps({"algorithm": "sha256", "hdf5_bytes": len(view),
                           "hdf5_sha256": hashlib.sha256(view).hexdigest(), "arrays": arrays}).encode()
    return manifest + _FOOTER.pack(len(manifest), hashlib.sha256(manifest).digest(), TRAILER_MAGIC)


def _build_file(params, ema, opt_state, step, texts) -> memoryview:
    """The whole checkpoint file (HDF5 image + checksum trailer) in memory; nothing touches the disk."""
    buf = io.BytesIO()
    host = {}                                  # group -> {name: host array}
    with h5py.File(buf, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["step"] = int(step)
        for key, text in texts.items():
            f.attrs[key] = text
        host["params"] = _write_group(f, "params", params)
        if ema is not None:
            host["ema"] = _write_group(f, "ema", ema)
        if opt_state is not None:
            f.attrs["adam_step"] = int(opt_state.step)
            host["adam_m"] = _write_group(f, "adam_m", opt_state.m)
            host["adam_v"] = _write_group(f, "adam_v", opt_state.v)
        f.flush()
        index = _array_index(f)                # raw data is placed when a dataset is created: final offsets
    image = buf.getbuffer()
    # the index must point at the arrays' own bytes, or damage would be blamed on the wrong array
    for group, arrays in host.items():
        for k, v in arrays.items():
            offset, nbytes = index[f"{group}/{k}"]
            raw = np.ascontiguousarray(v).reshape(-1).view(np.uint8)
            if nbytes != raw.size or (nbytes and not np.array_equal(
                    np.frombuffer(image, np.uint8, nbytes, offset), raw)):
                raise RuntimeError(f"internal error: the HDF5 bytes of {group}/{k} are not where h5py says; "
                                   "please report this (h5py " + h5py.__version__ + ")")
    trailer = _trailer(image, index)
    del image                                  # release the buffer export so BytesIO may grow again
    buf.seek(0, io.SEEK_END)
    buf.write(trailer)
    return buf.getbuffer()


def seal_file(path) -> None:
    """Recompute the checksum trailer of a checkpoint after a deliberate edit with h5py.

    Editing a checkpoint in place (h5py mode "a") invalidates its checksums, so
    the next load reports damage. Call this only when the edit was intended.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    image = _split_trailer(path, data)[0] if data.endswith(TRAILER_MAGIC) else data
    with h5py.File(io.BytesIO(image), "r") as f:
        index = _array_index(f)
    with open(path, "wb") as fh:
        fh.write(image)
        fh.write(_trailer(image, index))


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


def _write_chunk(fd: int, chunk) -> int:
    """One os.write (its own function so tests can make the disk fill up mid-file)."""
    return os.write(fd, chunk)


def _write_file(tmp: str, data) -> None:
    """Write all bytes to a new file and fsync it; any OSError (ENOSPC, EIO ...) propagates."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while len(view):
            n = _write_chunk(fd, view[:_WRITE_CHUNK])
            if n <= 0:
                raise OSError(errno.EIO, f"write to {tmp} stored nothing")
            view = view[n:]
        os.fsync(fd)                           # on disk now (and a late ENOSPC/EIO surfaces here)
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    os.close(fd)                               # a close error (e.g. over NFS) is a write error too


def _keep_as_previous(path: str, prev: str):
    """prev := the current file at path, atomically (hard link + rename; a copy where links are refused)."""
    if os.path.exists(prev) and os.path.samefile(path, prev):
        return                                 # a save killed between its two renames: prev already is this state
    prev_tmp = f"{prev}.tmp-{os.getpid()}"
    if os.path.lexists(prev_tmp):
        os.remove(prev_tmp)
    try:
        try:
            os.link(path, prev_tmp)            # no bytes copied: both names share the old file
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            shutil.copyfile(path, prev_tmp)    # file systems without hard links (some FUSE/SMB mounts)
            with open(prev_tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(prev_tmp, prev)             # (rename between two links of one file would keep both names)
    except BaseException:
        try:
            os.remove(prev_tmp)
        except OSError:
            pass
        raise


def _write_error(path: str, exc: OSError, had_old: bool) -> CheckpointWriteError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space and resume with --resume"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable or choose another --out"
    else:
        fix = "check the disk and resume with --resume"
    kept = (f"the previous checkpoint {path} is intact" if had_old else
            "no checkpoint was written (there was none before)")
    err = CheckpointWriteError(f"could not write checkpoint {path}: {reason}; {kept}; {fix}")
    err.errno, err.strerror, err.filename = exc.errno, exc.strerror, path
    return err


def save_checkpoint(path, params, ema=None, opt_state: AdamState | None = None, step: int = 0,
                    rng_state=None, config=None, extra=None, *, keep_previous: bool = False) -> None:
    """Write a checkpoint atomically (in-memory HDF5 + checksums -> temp file -> fsync -> rename).

    params, ema: dict name -> numpy/cupy array; opt_state: AdamState (moments
    saved under adam_m/, adam_v/); rng_state, config, extra: JSON-able values
    (see the module docstring). Everything is validated and serialised before
    the temp file is created, so a bad argument never touches the disk.
    keep_previous: first keep the current file at `path` as previous_path(path)
    (checkpoint.prev.h5), so two generations exist.
    Raises CheckpointWriteError (an OSError) when the file system refuses the
    write; the temp file is removed and the old checkpoint left as it was.
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
    data = _build_file(params, ema, opt_state, step, texts)
    folder = os.path.dirname(os.path.abspath(path))
    had_old = os.path.isfile(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temps(path)
        prev = previous_path(path)
        if keep_previous:
            _remove_stale_temps(prev)
        _write_file(tmp, data)
        if keep_previous and had_old:
            _keep_as_previous(path, prev)
        os.replace(tmp, path)
    except BaseException as exc:               # KeyboardInterrupt too: never leave a half-written temp file
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise _write_error(path, exc, had_old) from exc
        raise
    _fsync_folder(folder)


# ----------------------------------------------------------------------------
# Loading and checking
# ----------------------------------------------------------------------------

def _split_trailer(path: str, data: bytes):
    """(HDF5 image view, manifest dict) of a file that ends with the trailer magic; CheckpointError if damaged."""
    damaged = f"checkpoint {path} is damaged: its checksum table"
    if len(data) < _FOOTER.size:
        raise CheckpointError(f"{damaged} is cut short; {_remedy(path)}")
    n, digest, _ = _FOOTER.unpack(data[-_FOOTER.size:])
    if n > len(data) - _FOOTER.size:
        raise CheckpointError(f"{damaged} claims {n} bytes, more than the file holds; {_remedy(path)}")
    end = len(data) - _FOOTER.size
    manifest_bytes = data[end - n:end]
    if hashlib.sha256(manifest_bytes).digest() != digest:
        raise CheckpointError(f"{damaged} fails its own checksum; {_remedy(path)}")
    try:
        manifest = json.loads(manifest_bytes)
        size = int(manifest["hdf5_bytes"])
        manifest["hdf5_sha256"], manifest["arrays"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{damaged} cannot be read ({exc}); {_remedy(path)}") from None
    if size != end - n:
        raise CheckpointError(f"{damaged} says the HDF5 part has {size} bytes, the file has {end - n} "
                              f"(bytes were cut out or inserted); {_remedy(path)}")
    return memoryview(data)[:size], manifest


def _verify(path: str, image, manifest: dict):
    """CheckpointError naming the damaged arrays (or the metadata) unless the HDF5 image is intact."""
    if hashlib.sha256(image).hexdigest() == manifest["hdf5_sha256"]:
        return
    bad = []
    for key, entry in manifest["arrays"].items():
        try:
            offset, nbytes, digest = entry
            chunk = image[offset:offset + nbytes] if nbytes else b""
            ok = len(chunk) == nbytes and hashlib.sha256(chunk).hexdigest() == digest
        except (TypeError, ValueError):
            ok = False
        if not ok:
            bad.append(key)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise CheckpointError(f"checkpoint {path} is damaged: {shown} "
                              f"{'fails its checksum' if len(bad) == 1 else 'fail their checksums'}; "
                              f"{_remedy(path)}")
    raise CheckpointError(f"checkpoint {path} is not a readable ttfm_np checkpoint (its HDF5 metadata - "
                          "names, shapes, config or step - fails the file checksum, while every array's "
                          f"data passes: damaged on disk or in a copy); {_remedy(path)}")


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


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _looks_like_hdf5(data) -> bool:
    """HDF5's signature sits at byte 0 or, after a user block, at 512, 1024, 2048, ..."""
    offset = 0
    while offset + 8 <= len(data):
        if data[offset:offset + 8] == _HDF5_SIGNATURE:
            return True
        offset = 512 if offset == 0 else 2 * offset
    return False


def load_checkpoint(path, expect_config: dict | None = None, expect_params: dict | None = None) -> dict:
    """Read a checkpoint into NumPy arrays, verifying its checksums first.

    Returns a dict with params, ema (or None), opt_state (AdamState or None),
    step, rng_state, config, extra, format_version and path.
    expect_config: config keys that must match (see check_config_match).
    expect_params: the model's parameters; names and shapes must match (see check_params_match).
    path may also be a run folder holding checkpoint.h5.
    Raises FileNotFoundError, or CheckpointError (a ValueError) for a damaged,
    foreign or non-matching file; format-1 files (no checksums) give a warning.
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
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    not_ours = f"{path} is not a readable ttfm_np checkpoint"
    if not data:
        raise CheckpointError(f"{not_ours}: the file is empty (an interrupted copy?); {_remedy(path)}")
    manifest = None
    if data.endswith(TRAILER_MAGIC):
        image, manifest = _split_trailer(path, data)
        _verify(path, image, manifest)             # before h5py parses anything
    if not _looks_like_hdf5(data):
        raise CheckpointError(f"{not_ours}: it is not an HDF5 file (corrupt, an interrupted copy, or "
                              f"another kind of file); {_remedy(path)}")
    try:
        # HDF5 ignores the trailer behind its end-of-file address, so the whole buffer can be handed over
        with h5py.File(io.BytesIO(data), "r") as f:
            out, m, v = _read_checkpoint(path, f, has_checksums=manifest is not None)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        # h5py reports damaged metadata as any of these ("Link iteration failed", "truncated file" ...)
        raise CheckpointError(f"{not_ours} ({exc.__class__.__name__}: {exc}); {_remedy(path)}") from None
    # the optional parts must fit the parameters they belong to
    for what, arrays in (("EMA copy", out["ema"]), ("Adam first moments", m), ("Adam second moments", v)):
        if arrays is not None:
            problems = _mismatch_problems(out["params"], arrays, what)
            if problems:
                raise CheckpointError(f"{path} is damaged: its {what} does not fit its parameters "
                                      f"({' | '.join(problems)})")
    if (m is None) != (v is None):
        raise CheckpointError(f"{path} is damaged: it has only one of adam_m and adam_v")
    out["opt_state"] = AdamState(step=out.pop("adam_step"), m=m, v=v) if m is not None else None
    try:
        if expect_params is not None:
            check_params_match(expect_params, out["params"])
        if expect_config is not None:
            check_config_match(expect_config, out["config"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return out


def _read_checkpoint(path: str, f, has_checksums: bool):
    """(fields, adam_m, adam_v) of an open checkpoint, its layout and version checked."""
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
    if version >= 2 and not has_checksums:
        raise CheckpointError(f"checkpoint {path} is damaged: its checksum trailer is missing (the file was cut "
                              "short, or edited with h5py: see ckpt.seal_file); " + _remedy(path))
    if version == 1:
        warnings.warn(f"{path} is a format-1 checkpoint without checksums: damage to it cannot be detected "
                      "(the next save writes format 2)", stacklevel=3)
    if missing:
        raise CheckpointError(f"{path} is damaged or not a ttfm_np checkpoint: attributes "
                              f"{', '.join(missing)} are missing")
    try:
        out = dict(
            path=path,
            format_version=version,
            step=int(f.attrs["step"]),
            adam_step=int(f.attrs.get("adam_step", 0)),
            config=_loads(f.attrs["config_json"]),
            rng_state=_loads(f.attrs["rng_state_json"]),
            extra=_loads(f.attrs["extra_json"]) if "extra_json" in f.attrs else {},
            params=_read_group(f, "params"),
            ema=_read_group(f, "ema"),
        )
        m, v = _read_group(f, "adam_m"), _read_group(f, "adam_v")
    except CheckpointError as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from None
    return out, m, v


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
