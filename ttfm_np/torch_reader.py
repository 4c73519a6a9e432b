"""Read PyTorch checkpoint files (a state dict of tensors) without torch.

Two serialisations exist (docs/fid.md, "Weights"):

zip (torch >= 1.6): a zip archive holding `<name>/data.pkl` and one raw file
    `<name>/data/<key>` per storage. In data.pkl, tensors are
    `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and
    each storage is a persistent id ('storage', StorageType, key, location, numel).
legacy: a sequence of pickles in one file: magic number 0x1950a86a20f9469cfc6c,
    protocol version 1001, a sys-info dict, the object pickle (persistent ids
    ('storage', StorageType, key, location, numel, view_metadata)), the list of
    storage keys; then for each key in that order a little-endian int64
    element count followed by the raw little-endian bytes.

Unpickling is restricted: only OrderedDict, the tensor/parameter rebuild
functions and the storage types are accepted, so a tampered file cannot run
code. Tensors come back as NumPy arrays (copies, C-contiguous), bit-exact.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# storage class name -> numpy dtype (BFloat16 is widened to float32 bit-exactly)
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class StorageType:
    """Stands in for torch.FloatStorage etc. inside the pickle."""

    def __init__(self, name):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class LazyStorage:
    """A storage whose bytes are filled in after the pickle (legacy format) or from the zip."""

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array = None          # 1-D numpy array once the bytes are known


class LazyTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self) -> np.ndarray:
        base = self.storage.array
        if base is None:
            raise ValueError(f"storage {self.storage.key} has no data: the file is truncated")
        # as_strided trusts its arguments, so check them: a tampered file must not read outside the storage
        fields = (self.offset,) + self.size + self.stride
        if len(self.size) != len(self.stride) or not all(isinstance(v, int) and v >= 0 for v in fields):
            raise ValueError(f"tensor on storage {self.storage.key} has an invalid offset/size/stride "
                             f"{self.offset}/{self.size}/{self.stride}: corrupt file")
        n_needed = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride)) + 1 if all(self.size) else 0
        if n_needed > base.size:
            raise ValueError(f"tensor reads past the end of storage {self.storage.key}: corrupt file")
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(base[self.offset:], shape=self.size,
                                               strides=tuple(st * item for st in self.stride), writeable=False)
        return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class RestrictedTorchUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load_fn):
        super().__init__(file, encoding="utf-8")
        self._persistent_load_fn = persistent_load_fn

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        raise pickle.UnpicklingError(f"refused to unpickle global {module}.{name}: only tensors (of the storage types "
                                     f"{', '.join(STORAGE_DTYPES)}) and OrderedDict are allowed in a weights file; "
                                     "the file holds something else, or was tampered with")

    def persistent_load(self, pid):
        return self._persistent_load_fn(pid)


def _check_storage_pid(pid, length):
    """A storage persistent id ('storage', StorageType, key, location, numel[, view_metadata]), validated."""
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] == "storage"
            and isinstance(pid[1], StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int) and pid[4] >= 0):
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}: not a tensor storage")
    return pid


def _storage_bytes_to_array(raw: bytes, dtype) -> np.ndarray:
    if dtype == "bfloat16":                      # bfloat16 = the top 16 bits of a float32
        u16 = np.frombuffer(raw, dtype="<u2")
        return (u16.astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.dtype(dtype), copy=False)


def _resolve(obj):
    """Replace every LazyTensor in a (nested) container by its numpy array."""
    if isinstance(obj, LazyTensor):
        return obj.materialise()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


# Bounds on what a weights file may make us inflate (checked against the zip's central directory
# BEFORE anything is decompressed; zipfile never inflates an entry beyond its declared size):
MAX_PICKLE_BYTES = 64 << 20          # data.pkl of a state dict is kilobytes
MAX_TOTAL_BYTES = 4 << 30            # all storages together (the FID Inception is 95 MB)
MAX_COMPRESSION_RATIO = 50           # torch stores tensors uncompressed; real weights deflate < 2x


def _check_entry(path, info, expected: int | None = None):
    """Refuse an entry whose declared (inflated) size is not the expected one or is a bomb's."""
    if expected is not None and info.file_size != expected:
        raise ValueError(f"{path}: {info.filename} declares {info.file_size} bytes, but its tensor storage "
                         f"needs {expected}: corrupt or hostile file")
    if info.file_size > (1 << 20) and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise ValueError(f"{path}: {info.filename} would inflate {info.compress_size} bytes to {info.file_size} "
                         f"(more than {MAX_COMPRESSION_RATIO}x; weights barely compress): refused as a zip bomb")


def _load_zip(path):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise ValueError(f"{path} is a zip file but has no data.pkl: not a PyTorch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        info = zf.getinfo(pkl[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise ValueError(f"{path}: data.pkl declares {info.file_size} bytes (a state dict's is kilobytes; "
                             f"limit {MAX_PICKLE_BYTES}): refused")
        _check_entry(path, info)
        total = sum(i.file_size for i in zf.infolist() if i.filename.startswith(f"{prefix}data/"))
        if total > MAX_TOTAL_BYTES:
            raise ValueError(f"{path}: its tensors declare {total / 2**30:.1f} GiB in all (limit "
                             f"{MAX_TOTAL_BYTES / 2**30:.0f} GiB): refused before inflating anything")
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder") != b"little":
            raise ValueError(f"{path} was written on a big-endian machine; only little-endian files are supported")
        storages = {}

        def persistent_load(pid):
            _, stype, key, _location, numel = _check_storage_pid(pid, 5)
            if key not in storages:
                st = LazyStorage(key, stype.dtype, numel)
                try:
                    entry = zf.getinfo(f"{prefix}data/{key}")
                except KeyError:
                    raise ValueError(f"{path} has no data file for storage {key}: corrupt file") from None
                _check_entry(path, entry, expected=numel * _itemsize(stype.dtype))
                raw = zf.read(entry)
                st.array = _storage_bytes_to_array(raw, stype.dtype)
                storages[key] = st
            return storages[key]

        obj = RestrictedTorchUnpickler(io.BytesIO(zf.read(pkl[0])), persistent_load).load()
        return _resolve(obj)


def _itemsize(dtype) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _load_legacy(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        plain = lambda: RestrictedTorchUnpickler(f, lambda pid: (_ for _ in ()).throw(
            pickle.UnpicklingError("persistent id outside the object pickle"))).load()
        magic = plain()
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path} is not a PyTorch checkpoint (bad magic number)")
        protocol = plain()
        if protocol != LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy protocol version {protocol}")
        sys_info = plain()                               # byte order, type sizes
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise ValueError(f"{path} was written on a big-endian machine; only little-endian files are supported")
        storages, views = {}, {}

        def persistent_load(pid):
            _, stype, key, _location, numel, view_metadata = _check_storage_pid(pid, 6)
            if key not in storages:
                storages[key] = LazyStorage(key, stype.dtype, numel)
            if view_metadata is not None:                # an old-style view into a root storage
                view_key, offset, view_size = view_metadata
                if view_key not in views:
                    views[view_key] = (storages[key], offset, view_size, LazyStorage(view_key, stype.dtype, view_size))
                return views[view_key][3]
            return storages[key]

        obj = RestrictedTorchUnpickler(f, persistent_load).load()
        keys = plain()
        for key in keys:
            if key not in storages:
                raise ValueError(f"{path}: storage {key!r} is listed but no tensor uses it: corrupt file")
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path} is truncated before storage {key}")
            (numel,) = struct.unpack("<q", head)
            st = storages[key]
            if numel != st.numel:
                raise ValueError(f"{path}: storage {key} holds {numel} elements, the pickle says {st.numel}")
            nbytes = numel * _itemsize(st.dtype)
            if nbytes > size - f.tell():                 # before read(): never allocate what the file lacks
                raise ValueError(f"{path} is truncated: storage {key} needs {nbytes} bytes, the file has "
                                 f"{size - f.tell()} left")
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ValueError(f"{path} is truncated: storage {key} needs {nbytes} bytes, found {len(raw)}")
            st.array = _storage_bytes_to_array(raw, st.dtype)
        for root, offset, size, view in views.values():
            view.array = root.array[offset:offset + size]
    return _resolve(obj)


class TorchFileError(ValueError):
    """A file that is not a readable PyTorch state dict (empty, damaged, truncated, or refused)."""


# what a damaged or foreign file makes the unpickler, zipfile and the checks above raise
_DAMAGE = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, ValueError, KeyError, IndexError,
           TypeError, AttributeError, struct.error, OverflowError, UnicodeDecodeError, RecursionError,
           MemoryError, NotImplementedError)


def load_torch_file(path: str):
    """A PyTorch-saved object (typically a state dict) with tensors as numpy arrays.

    Raises FileNotFoundError for a missing file and TorchFileError (a
    ValueError naming the file) for an empty, truncated, damaged or refused one.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    if os.path.getsize(path) == 0:
        raise TorchFileError(f"{path} is empty (0 bytes): not a PyTorch weights file (an interrupted download?)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        return _load_zip(path) if head == b"PK\x03\x04" else _load_legacy(path)
    except _DAMAGE as exc:
        if isinstance(exc, TorchFileError):
            raise
        reason = str(exc) or exc.__class__.__name__
        if reason.startswith(path):                    # the checks above already name the file
            raise TorchFileError(reason) from None
        raise TorchFileError(f"{path} is not a readable PyTorch weights file "
                             f"({exc.__class__.__name__}: {reason})") from None
