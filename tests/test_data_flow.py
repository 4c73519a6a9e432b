"""Datasets in their real file formats, the batch iterator, metrics, and the
ODE solvers' order of accuracy on a field with a known solution."""
import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from ttfm_np import recipes

from ttfm_np import data, flow, metrics

# ---------------------------------------------------------------------------- ODE solvers


def test_solver_orders_of_accuracy():
    """dx/dt = -x / (1 + t) + cos(t): known solution, so each solver's global error
    must fall like h^order (fitted log-log slope)."""
    def v(x, t):
        return -x / (1 + t[:, None]) + np.cos(t)[:, None]

    def exact(x0):              # d/dt [(1 + t) x] = (1 + t) cos t  => (1+t) x = x0 + (1+t) sin t + cos t - 1
        return (x0 + 2 * np.sin(1.0) + np.cos(1.0) - 1) / 2
    x0 = np.array([[0.3], [-1.2]])
    ns = np.array([8, 16, 32, 64])
    for method, order in (("euler", 1), ("heun", 2), ("rk4", 4)):
        errs = [np.abs(flow.solve_ode(v, x0, n_steps=n, method=method) - exact(x0)).max() for n in ns]
        slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
        assert abs(slope - order) < 0.2, (method, slope)


def test_grids_backward_and_errors():
    v = lambda x, t: np.ones_like(x) * 2.0
    x = np.zeros((3, 2))
    np.testing.assert_allclose(flow.solve_ode(v, x, grid=[0, 0.3, 1.0]), 2.0)
    np.testing.assert_allclose(flow.solve_ode(v, x, grid=[1.0, 0.0], method="heun"), -2.0)
    assert flow.nfe("heun", 4) == 8 and flow.nfe("rk4", 2) == 8
    for bad, msg in (([0.5], "at least two"), ([0, 0.6, 0.4], "monotone"), ([0, 2], r"\[0, 1\]")):
        with pytest.raises(ValueError, match=msg):
            flow.solve_ode(v, x, grid=bad)
    with pytest.raises(ValueError, match="unknown ODE solver"):
        flow.solve_ode(v, x, n_steps=2, method="rk45")


def test_flow_matching_loss_gradient(rng):
    v, x0, x1 = (rng.standard_normal((4, 3)) for _ in range(3))
    loss, g = flow.flow_matching_loss_and_grad(v, x0, x1)
    assert loss == pytest.approx(((v - (x1 - x0)) ** 2).mean())
    eps = 1e-6
    v2 = v.copy()
    v2[1, 2] += eps
    assert (flow.flow_matching_loss_and_grad(v2, x0, x1)[0] - loss) / eps == pytest.approx(g[1, 2], rel=1e-4)
    t = np.array([0.0, 1.0, 0.5, 0.25])
    np.testing.assert_allclose(flow.interpolate(x0, x1, t)[1], x1[1])
    lt = flow.sample_times(np.random.default_rng(0), 10000, "logit_normal")
    assert 0 < lt.min() and lt.max() < 1 and abs(np.median(lt) - 0.5) < 0.02


# ---------------------------------------------------------------------------- toys and iterator

def test_toys_seeded_and_split():
    for name in data.TOYS:
        a = data.load_dataset(f"toy:{name}", n=500)
        b = data.load_dataset(f"toy:{name}", n=500)
        c = data.load_dataset(f"toy:{name}", split="test", n=500)
        assert a.data.shape == (500, 2) and a.data.dtype == np.float32 and a.kind == "toy"
        np.testing.assert_array_equal(a.data, b.data)
        assert not np.array_equal(a.data, c.data)                  # held-out data is another seed
        assert np.abs(a.data).max() < 4.5
    with pytest.raises(ValueError, match="unknown toy"):
        data.load_dataset("toy:circles")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("mnist")


def test_batch_iterator_resume_and_flip():
    x = np.arange(10 * 1 * 2 * 2, dtype=np.float32).reshape(10, 1, 2, 2)
    it = data.BatchIterator(x, 3, seed=5, flip=True)
    seen = [it.next() for _ in range(4)]
    state = it.state_dict()
    rest = [it.next() for _ in range(5)]
    it2 = data.BatchIterator(x, 3, seed=5, flip=True)
    it2.load_state_dict(state)
    for a, b in zip(rest, [it2.next() for _ in range(5)]):
        np.testing.assert_array_equal(a, b)
    first_epoch = np.concatenate(seen[:3])
    assert len({tuple(r.ravel()) for r in first_epoch}) == 9        # no repeats inside an epoch
    with pytest.raises(ValueError, match="larger than the dataset"):
        data.BatchIterator(x, 11)


# ---------------------------------------------------------------------------- IDX / Fashion-MNIST

def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_loader(tmp_path, rng):
    imgs = rng.integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    x = data.load_fashion_mnist("train", str(tmp_path))
    assert x.shape == (5, 1, 32, 32)
    np.testing.assert_allclose(x[:, 0, 2:30, 2:30], imgs / 127.5 - 1, atol=1e-6)
    assert (x[:, 0, :2] == -1).all()                                 # padding is background (black)
    bad = tmp_path / "bad"
    bad.mkdir()
    with gzip.open(bad / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 5, 28, 28) + b"\0" * 100)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        data.load_fashion_mnist("train", str(bad))
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError):
        data.load_fashion_mnist("train", str(bad))


def test_source_files_name_what_load_dataset_decodes(tmp_path, rng):
    """The files a cache key is built from are the ones the loader reads; none for toys, and
    None (not an empty key) where the files are missing, so the loader's error is raised."""
    imgs = rng.integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    assert data.source_files("fashion-mnist", data_dir=str(tmp_path)) == [str(tmp_path / "train-images-idx3-ubyte.gz")]
    assert data.source_files("toy:moons") is None
    assert data.source_files(f"imagefolder:{tmp_path / 'missing'}") is None
    assert data.source_files(f"imagefolder:{tmp_path}") is None            # a folder without images
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not decoded here")
    assert data.source_files(f"imagefolder:{tmp_path}") == [str(tmp_path / "a" / "x.png")]


def test_real_fashion_mnist_if_installed():
    if not os.path.exists(os.path.join(data.FASHION_DEBIAN_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.skip("Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
    ds = data.load_dataset("fashion-mnist", split="test")
    assert ds.data.shape == (10000, 1, 32, 32) and ds.data.min() == -1 and ds.data.max() == 1


# ---------------------------------------------------------------------------- CIFAR-10

def _cifar_tarball(path, rng, n=4, payload=None):
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            raw = pickle.dumps(obj, protocol=2) if payload is None or name != "data_batch_1" else payload
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            add(name, {b"batch_label": name.encode(), b"labels": list(rng.integers(0, 10, n)),
                       b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                       b"filenames": [b"x.png"] * n})
        add("batches.meta", {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": n})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_tarball_restricted_unpickler_and_md5(tmp_path, rng, monkeypatch):
    tgz = tmp_path / "cifar-10-python.tar.gz"
    _cifar_tarball(tgz, rng)
    x = data.read_cifar10_tarball(str(tgz), "train")
    assert x.shape == (20, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert data.read_cifar10_tarball(str(tgz), "test").shape == (4, 3, 32, 32)
    # the loader checks the official md5: our test tarball is reported, naming both sums
    with pytest.raises(ValueError, match=data.CIFAR10_MD5):
        data.load_cifar10("train", str(tmp_path), allow_download=False)
    monkeypatch.setattr(data, "CIFAR10_MD5", data.md5sum(str(tgz)))
    assert data.load_cifar10("train", str(tmp_path), allow_download=False).shape == (20, 3, 32, 32)
    evil = tmp_path / "evil" / "cifar-10-python.tar.gz"
    evil.parent.mkdir()
    _cifar_tarball(evil, rng, payload=pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|refused"):
        data.read_cifar10_tarball(str(evil), "train")


def test_cifar10_missing_offline_says_where(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "DATA_DIR", str(tmp_path / "nodata"))
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        data.load_cifar10("train", str(tmp_path / "nothere"), allow_download=False)


# ---------------------------------------------------------------------------- image folders

def test_imagefolder(tmp_path, rng):
    (tmp_path / "sub").mkdir()
    for i, size in enumerate([(40, 30), (20, 20), (64, 80)]):
        arr = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / ("sub" if i else "") / f"im{i}.png")
    ds = data.load_dataset(f"imagefolder:{tmp_path}", resolution=16)
    assert ds.data.shape == (3, 3, 16, 16) and ds.data.min() >= -1 and ds.data.max() <= 1
    with pytest.raises(FileNotFoundError, match="no images"):
        (tmp_path / "empty").mkdir()
        data.load_imagefolder(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------- metrics

def test_metrics_against_closed_forms(rng):
    a = rng.standard_normal((2000, 2))
    assert metrics.sliced_w2(a, a) == 0.0
    shift = np.array([0.6, -0.8])                   # |m| = 1: SW2^2 = E_w (m.w)^2 = |m|^2 / d
    sw = metrics.sliced_w2(a, a + shift, n_proj=2000)
    assert sw ** 2 == pytest.approx(1.0 / 2, rel=0.05)
    b = rng.standard_normal((300, 2)) + 1.0
    x, y = a[:200], b[:150]
    dxy = np.linalg.norm(x[:, None] - y[None], axis=-1).mean()
    dxx = np.linalg.norm(x[:, None] - x[None], axis=-1).mean()
    dyy = np.linalg.norm(y[:, None] - y[None], axis=-1).mean()
    assert metrics.energy_distance(x, y) == pytest.approx(2 * dxy - dxx - dyy, rel=1e-9)
    assert metrics.psnr(np.zeros((2, 3)), np.full((2, 3), 0.2)) == pytest.approx(10 * np.log10(4 / 0.04))


# ---------------------------------------------------------------------------- points:PATH.npy

def test_points_file_split_kind_and_recipe(tmp_path, rng):
    from ttfm_np import recipes
    x = rng.standard_normal((23, 2))
    p = tmp_path / "pts.npy"
    np.save(p, x)
    train = data.load_dataset(f"points:{p}")
    test = data.load_dataset(f"points:{p}", split="test")
    # held-out = rows 0, 10, 20 (every 10th from row 0); train = the other 20 rows, in file order
    np.testing.assert_array_equal(test.data, x[[0, 10, 20]].astype(np.float32))
    np.testing.assert_array_equal(train.data, np.delete(x, [0, 10, 20], axis=0).astype(np.float32))
    assert train.data.dtype == np.float32 and train.kind == "toy"            # d = 2: scatter plots
    assert data.load_dataset(f"points:{p}", n=5).data.shape == (5, 2)
    np.save(tmp_path / "p5.npy", rng.standard_normal((40, 5)).astype(np.float16))
    d5 = data.load_dataset(f"points:{tmp_path / 'p5.npy'}")
    assert d5.kind == "points" and d5.shape == (5,) and d5.data.dtype == np.float32
    np.save(tmp_path / "two.npy", np.array([[1, 2], [3, 4]], np.int64))   # n = 2: 1 train + 1 held out
    assert data.load_points(str(tmp_path / "two.npy"), "test").tolist() == [[1.0, 2.0]]
    # the toy recipe (the MLP) serves points; the teacher folder name is file-name safe and path specific
    assert recipes.family(f"points:{p}") == "points"
    assert recipes.TEACHER_RECIPES["points"]["model"] == "mlp"
    assert recipes.DISTILL_RECIPES["points"] == recipes.DISTILL_RECIPES["toy"]
    slug = recipes.slug(f"points:{p}")
    assert slug.startswith("points-pts-") and "/" not in slug
    assert slug != recipes.slug(f"points:{tmp_path / 'other' / 'pts.npy'}")


@pytest.mark.parametrize("arr, msg", [
    (np.zeros(5), "shape"),                                   # 1-D
    (np.zeros((2, 3, 4)), "shape"),                           # 3-D
    (np.zeros((1, 2)), "at least 2 points"),
    (np.zeros((4, 0)), "d >= 1"),
    (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, np.inf]]), "2 rows contain NaN/inf"),
    (np.array([[1e39, 0.0], [0.0, 0.0]]), "NaN/inf"),          # overflows float32
    (np.array([["a", "b"], ["c", "d"]]), "not real numbers"),
    (np.ones((3, 2), np.complex64), "not real numbers"),
])
def test_points_file_errors(tmp_path, arr, msg):
    p = tmp_path / "bad.npy"
    np.save(p, arr)
    with pytest.raises(ValueError, match=msg):
        data.load_dataset(f"points:{p}")


def test_points_file_missing_or_not_npy(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_dataset(f"points:{tmp_path / 'nope.npy'}")
    (tmp_path / "text.npy").write_text("1,2\n3,4\n")
    with pytest.raises(ValueError, match="not a readable .npy"):
        data.load_dataset(f"points:{tmp_path / 'text.npy'}")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable .npy|not real numbers"):
        data.load_dataset(f"points:{tmp_path / 'obj.npy'}")
    np.savez(tmp_path / "z.npz", a=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="several arrays"):
        data.load_dataset(f"points:{tmp_path / 'z.npz'}")
