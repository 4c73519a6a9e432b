"""The torch-free weights reader on files that PyTorch itself wrote, in both
serialisations: bit-exact arrays for several dtypes and non-contiguous views;
tampered pickles are refused."""
import os
import pickle
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
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        torch_reader.load_torch_file(str(path))
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        for obj in (torch_reader.LEGACY_MAGIC, torch_reader.LEGACY_PROTOCOL, {}):
            pickle.dump(obj, f)
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        torch_reader.load_torch_file(str(legacy))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(pickle.dumps(123))
    with pytest.raises(ValueError, match="magic"):
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
