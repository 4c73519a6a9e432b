"""The torch-free weights reader on files that PyTorch itself wrote, in both
serialisations: bit-exact arrays for several dtypes and non-contiguous views;
tampered pickles are refused."""
import os
import pickle
import re
import zipfile

import numpy as np
import pytest

from ttfm_np import torch_reader

try:
    import torch
except ImportError:                    # the tampered-pickle test below needs no torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed: cannot write reference .pth files")


def _state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g, dtype=torch.float64)
    sd = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.running_var": torch.rand(4, generator=g, dtype=torch.float64),
        "half": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "idx": torch.arange(7, dtype=torch.int64),
        "num_batches_tracked": torch.tensor(12),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "transposed": base.t(),                    # non-contiguous view
        "strided": base[::2, 1::3],                # view with offset and steps
        "shares_storage": base[1],
    }
    return __import__("collections").OrderedDict(sd)


def _as_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


@needs_torch
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_files_written_by_torch(tmp_path, zip_format):
    sd = _state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    assert (open(path, "rb").read(4) == b"PK\x03\x04") == zip_format
    got = torch_reader.load_torch_file(str(path))
    assert list(got) == list(sd)
    for k, t in sd.items():
        ref = _as_numpy(t)
        assert got[k].shape == ref.shape and got[k].dtype == ref.dtype, k
        np.testing.assert_array_equal(got[k], ref, err_msg=k)


def test_refuses_tampered_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}))
    with pytest.raises(torch_reader.TorchFileError, match="evil.pth is not a readable PyTorch weights file "
                                                          "\\(UnpicklingError: refused to unpickle global (posix|os).system"):
        torch_reader.load_torch_file(str(path))
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        for obj in (torch_reader.LEGACY_MAGIC, torch_reader.LEGACY_PROTOCOL, {}):
            pickle.dump(obj, f)
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ValueError, match="evil_legacy.pth .*refused"):
        torch_reader.load_torch_file(str(legacy))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(pickle.dumps(123))
    with pytest.raises(torch_reader.TorchFileError, match="junk.pth is not a PyTorch checkpoint .bad magic"):
        torch_reader.load_torch_file(str(junk))


def _crafted_zip(path, offset, size, stride, numel=4):
    """A zip checkpoint whose one tensor has the given (possibly hostile) offset/size/stride."""
    import collections
    import io

    class Storage:
        pass

    storage = Storage()

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(collections.OrderedDict(w=Tensor()))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", np.arange(numel, dtype="<f4").tobytes())


@needs_torch
def test_refuses_tensors_outside_their_storage(tmp_path):
    path = tmp_path / "ok.pth"
    _crafted_zip(path, 1, (2,), (2,))                        # the crafting itself is right: elements 1 and 3
    np.testing.assert_array_equal(torch_reader.load_torch_file(str(path))["w"], [1.0, 3.0])
    for offset, size, stride in ((-8, (2,), (1,)), (0, (2,), (-1,)), (0, (3,), (2,)), (0, (5,), (1,))):
        _crafted_zip(path, offset, size, stride)
        with pytest.raises(ValueError, match="invalid offset|past the end"):
            torch_reader.load_torch_file(str(path))


# ----------------------------------------------------------------------------
# Damaged files: one clear ValueError naming the file, never a raw traceback
# ----------------------------------------------------------------------------

def _unicode(s):
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def torchless_zip(path, tensors):
    """A zip-format state dict of float32 tensors as torch.save lays it out, written without torch.

    data.pkl is a protocol-2 pickle written opcode by opcode:
    OrderedDict(name -> _rebuild_tensor_v2(persistent storage id, offset 0, shape, strides, False, OrderedDict())).
    """
    import struct
    ops = [b"\x80\x02", b"ccollections\nOrderedDict\n)R("]
    for i, (name, a) in enumerate(tensors.items()):
        ints = lambda vals: b"(" + b"".join(b"J" + struct.pack("<i", v) for v in vals) + b"t"
        ops += [_unicode(name), b"ctorch._utils\n_rebuild_tensor_v2\n(",
                b"(" + _unicode("storage") + b"ctorch\nFloatStorage\n" + _unicode(str(i)) + _unicode("cpu")
                + b"J" + struct.pack("<i", a.size) + b"tQ",                          # persistent id
                b"K\x00", ints(a.shape), ints([s // a.itemsize for s in a.strides]),
                b"\x89", b"ccollections\nOrderedDict\n)R", b"tR"]
    ops.append(b"u.")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"".join(ops))
        for i, a in enumerate(tensors.values()):
            zf.writestr(f"archive/data/{i}", np.ascontiguousarray(a, "<f4").tobytes())


def test_torchless_zip_writer_is_right(tmp_path, rng):
    sd = {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
          "bn.bias": rng.standard_normal(4).astype(np.float32)}
    torchless_zip(tmp_path / "w.pth", sd)
    got = torch_reader.load_torch_file(str(tmp_path / "w.pth"))
    assert list(got) == list(sd)
    for k in sd:
        np.testing.assert_array_equal(got[k], sd[k])


def test_empty_file(tmp_path):
    path = tmp_path / "pt_inception.pth"
    path.write_bytes(b"")
    with pytest.raises(torch_reader.TorchFileError, match="pt_inception.pth is empty .0 bytes.: not a PyTorch"):
        torch_reader.load_torch_file(str(path))


def test_random_bytes(tmp_path, rng):
    """Random bytes (bare, behind a pickle header, behind a zip header): TorchFileError naming the file."""
    path = tmp_path / "noise.pth"
    for i in range(60):
        body = rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes()
        path.write_bytes([b"", b"\x80\x02", b"PK\x03\x04"][i % 3] + body)
        with pytest.raises(torch_reader.TorchFileError, match=f"^{re.escape(str(path))} is "):
            torch_reader.load_torch_file(str(path))


def test_truncated_zip_and_legacy_files(tmp_path, rng):
    sd = {"a.weight": rng.standard_normal((8, 8)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    whole = tmp_path / "whole.pth"
    torchless_zip(whole, sd)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pth"
    for n in sorted({4, 30, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1}):
        cut.write_bytes(data[:n])                          # an interrupted download
        with pytest.raises(torch_reader.TorchFileError, match="cut.pth is not a readable PyTorch weights file"):
            torch_reader.load_torch_file(str(cut))
    legacy = tmp_path / "legacy.pth"                       # header pickles only: the object pickle is missing
    with open(legacy, "wb") as f:
        for obj in (torch_reader.LEGACY_MAGIC, torch_reader.LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(obj, f)
    with pytest.raises(torch_reader.TorchFileError, match="legacy.pth is not a readable.*EOFError"):
        torch_reader.load_torch_file(str(legacy))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        torch_reader.load_torch_file(str(tmp_path / "nope.pth"))
