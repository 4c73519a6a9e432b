"""Datasets (README "Command line": DATA) and a seeded, resumable batch iterator.

    ds = load_dataset("toy:moons")            # ds.data (N, 2) float32
    ds = load_dataset("fashion-mnist")        # ds.data (N, 1, 32, 32) in [-1, 1]
    ds = load_dataset("cifar10")              # ds.data (N, 3, 32, 32) in [-1, 1]
    ds = load_dataset("imagefolder:PATH", resolution=64)
    ds = load_dataset("points:my.npy")        # your own (n, d) float array; 10 % held out (load_points)
    it = BatchIterator(ds.data, batch_size=128, seed=0, flip=True); x = it.next()

Files are looked for in data_dir (if given), then the data root (docs/method.md section 10)
(and, for fashion-mnist, where Debian's dataset-fashion-mnist installs them).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.request
from dataclasses import dataclass

import numpy as np

from . import seeds
from .recipes import data_root

TOYS = ("checkerboard", "moons", "8gaussians", "spirals")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILE = "cifar-10-python.tar.gz"
FASHION_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
TOY_SPLIT_SEED = {"train": 0, "test": 1_000_003}          # held-out toy data = another seed


@dataclass
class Dataset:
    name: str
    data: np.ndarray       # (N, 2) for toys, (N, d) for points, (N, C, H, W) in [-1, 1] for images
    kind: str              # "toy" (2-D points: scatter plots), "points" (d != 2, no pictures) or "image"

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape[1:])


# ----------------------------------------------------------------------------- 2-D toys

def make_toy(name: str, n: int, seed: int = 0) -> np.ndarray:
    """n points of a 2-D toy distribution, roughly within [-4, 4]^2, float32."""
    rng = np.random.default_rng(seed)
    if name == "checkerboard":
        # FFJORD's checkerboard: 8 unit squares of a 4x4 board on [-2, 2]^2, scaled by 2
        x1 = rng.uniform(0, 1, n) * 4 - 2
        x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n)
        x2 = x2 + np.floor(x1) % 2
        pts = 2.0 * np.stack([x1, x2], 1)
    elif name == "moons":
        k = rng.integers(0, 2, n)
        a = rng.uniform(0, np.pi, n)
        upper = np.stack([np.cos(a), np.sin(a)], 1)
        lower = np.stack([1 - np.cos(a), 0.5 - np.sin(a)], 1)
        pts = np.where(k[:, None] == 0, upper, lower) + 0.08 * rng.standard_normal((n, 2))
        pts = (pts - [0.5, 0.25]) * 2.0
    elif name == "8gaussians":
        ang = 2 * np.pi * rng.integers(0, 8, n) / 8
        centres = 2.8 * np.stack([np.cos(ang), np.sin(ang)], 1)
        pts = centres + 0.25 * rng.standard_normal((n, 2))
    elif name == "spirals":
        r = np.sqrt(rng.uniform(0, 1, n)) * 3.5 * np.pi
        sign = np.where(rng.integers(0, 2, n) == 0, 1.0, -1.0)
        pts = sign[:, None] * np.stack([np.cos(r) * r, np.sin(r) * r], 1) / 3.0
        pts += 0.15 * rng.standard_normal((n, 2))
    else:
        raise ValueError(f"unknown toy {name!r}: choose one of {', '.join('toy:' + t for t in TOYS)}")
    return pts.astype(np.float32)


# ----------------------------------------------------------------------------- your own points

POINTS_HELDOUT_EVERY = 10      # held-out split of points:PATH.npy = rows 0, 10, 20, ... (10 %)


def load_points(path: str, split: str = "train") -> np.ndarray:
    """An (n, d) array of points from a .npy file, float32, for `--data points:PATH.npy`.

    Split (deterministic, no shuffling): the held-out ("test") split is every
    10th row starting at row 0 (rows 0, 10, 20, ...: ceil(n / 10) rows), the
    training split is all other rows. Taking every 10th row rather than the
    last 10 % keeps both splits representative when the file is sorted (e.g.
    by class). The values are used as they are: like the toys (within about
    [-4, 4]), data should be roughly standardised, since the flow starts from
    N(0, I) noise.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"points file {path!r} does not exist; points:PATH needs a .npy file holding an "
                                "(n, d) float array (np.save('points.npy', x))")
    try:
        raw = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable .npy array of numbers ({exc}); save an (n, d) float array "
                         "with np.save") from exc
    if not isinstance(raw, np.ndarray):
        raise ValueError(f"{path} holds several arrays (an .npz?); points:PATH needs one (n, d) array "
                         "saved with np.save")
    if raw.dtype.kind not in "biuf":
        raise ValueError(f"{path} holds an array of dtype {raw.dtype}, which is not real numbers; save an (n, d) "
                         "float array")
    if raw.ndim != 2:
        raise ValueError(f"{path} holds an array of shape {raw.shape}; points need shape (n, d): one row per point "
                         "(reshape a 1-D array with x[:, None])")
    n, d = raw.shape
    if n < 2 or d < 1:
        raise ValueError(f"{path} holds {n} points of dimension {d}; need at least 2 points (one is held out) "
                         "and d >= 1")
    with np.errstate(over="ignore"):                          # overflow becomes inf, reported just below
        x = raw.astype(np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} rows contain NaN/inf (or overflow float32), first at row "
                         f"{int(np.flatnonzero(bad)[0])}; remove or fix them")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    heldout = np.arange(n) % POINTS_HELDOUT_EVERY == 0
    return x[heldout] if split == "test" else x[~heldout]


# ----------------------------------------------------------------------------- IDX (Fashion-MNIST)

def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (.gz or raw): magic 0x0000 <type> <ndim>, big-endian dims, data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable IDX file ({exc}); delete it and get a fresh copy")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated or corrupt: header says {dims} = {int(np.prod(dims))} bytes, "
                         f"found {body.size}")
    return body.reshape(dims)


def _find(names, folders):
    for folder in folders:
        for name in names:
            p = os.path.join(folder, name)
            if os.path.exists(p):
                return p
    return None


def _fashion_mnist_path(split: str, data_dir: str | None):
    """(the IDX image file of the split or None, the folders searched)."""
    folders = [d for d in (data_dir, os.path.join(data_dir or "", "fashion-mnist") if data_dir else None,
                           os.path.join(data_root(), "fashion-mnist"), FASHION_DEBIAN_DIR) if d]
    stem = FASHION_FILES[split][0]
    return _find([stem + ".gz", stem], folders), folders


def load_fashion_mnist(split: str = "train", data_dir: str | None = None) -> np.ndarray:
    """(N, 1, 32, 32) float32 in [-1, 1]: 28x28 padded by 2 background pixels per side."""
    path, folders = _fashion_mnist_path(split, data_dir)
    stem = FASHION_FILES[split][0]
    if path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} images ({stem}.gz) not found in: {', '.join(folders)}. "
            "Install them with `apt-get install dataset-fashion-mnist` or copy the IDX gz files into data/fashion-mnist/.")
    img = read_idx(path)
    if img.ndim != 3 or img.shape[1:] != (28, 28):
        raise ValueError(f"{path}: expected images of shape (N, 28, 28), got {img.shape}")
    x = np.pad(img, ((0, 0), (2, 2), (2, 2))).astype(np.float32)
    return (x / 127.5 - 1.0)[:, None]


# ----------------------------------------------------------------------------- CIFAR-10

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 batches contain: dicts, lists, bytes,
    numbers and NumPy arrays. Any other global (os.system, eval, ...) is refused,
    so a tampered download cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to unpickle global {module}.{name}: the file is not a plain "
                                     "CIFAR-10 batch (possibly tampered); delete it and download it again")


def restricted_loads(raw: bytes):
    return RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()


def md5sum(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, path: str, md5: str):
    """Download with a progress bar to path (via a .part file), then check the md5."""
    from .progress import Progress
    part = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            total = int(r.headers.get("Content-Length") or 0)               # bytes (0: unknown)
            with open(part, "wb") as f, Progress(total >> 20, f"downloading {url} (MiB)") as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(1)
    except OSError as exc:
        if os.path.exists(part):
            os.remove(part)
        raise FileNotFoundError(f"could not download {url} ({exc}). Offline? Download it elsewhere and "
                                f"put it at {path}")
    got = md5sum(part)
    if got != md5:
        os.remove(part)
        raise ValueError(f"downloaded {url} has md5 {got}, expected {md5}; the file was discarded. Try again.")
    os.replace(part, path)


def _cifar10_path(data_dir: str | None):
    """(the python tarball or None, the folders searched)."""
    folders = [d for d in (data_dir, data_root()) if d]
    return _find([CIFAR10_FILE], folders), folders


def load_cifar10(split: str = "train", data_dir: str | None = None, allow_download: bool = True) -> np.ndarray:
    """(N, 3, 32, 32) float32 in [-1, 1] from the official python tarball."""
    path, folders = _cifar10_path(data_dir)
    if path is None:
        if not allow_download:
            raise FileNotFoundError(f"{CIFAR10_FILE} not found in {', '.join(folders)}; get it from {CIFAR10_URL}")
        path = os.path.join(folders[0], CIFAR10_FILE)
        os.makedirs(folders[0], exist_ok=True)
        download(CIFAR10_URL, path, CIFAR10_MD5)
    got = md5sum(path)
    if got != CIFAR10_MD5:
        raise ValueError(f"{path} has md5 {got}, expected {CIFAR10_MD5}: the file is damaged or not the "
                         f"official CIFAR-10 python tarball. Delete it and download {CIFAR10_URL} again.")
    return read_cifar10_tarball(path, split)


def read_cifar10_tarball(path: str, split: str) -> np.ndarray:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    out = []
    with tarfile.open(path, "r:gz") as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        for name in names:
            if name not in members:
                raise ValueError(f"{path} has no {name}: not the CIFAR-10 python tarball")
            batch = restricted_loads(tar.extractfile(members[name]).read())
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{path}:{name}: expected data of shape (N, 3072), got {data.shape}")
            out.append(data.reshape(-1, 3, 32, 32))
    return np.concatenate(out).astype(np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------- image folders

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_imagefolder(folder: str, resolution: int = 64, n: int | None = None) -> np.ndarray:
    """Every image under folder (recursive), centre-cropped to a square and resized; (N, 3, R, R) in [-1, 1]."""
    from PIL import Image
    from .images import open_rgb
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = _imagefolder_files(folder)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) found under {folder} (subfolders included); "
                                "put image files there or check the path given to imagefolder:")
    files = files[:n] if n else files
    out = np.empty((len(files), 3, resolution, resolution), np.float32)
    for i, fn in enumerate(files):
        im = open_rgb(fn)                      # ValueError naming the file if damaged or a decompression bomb
        w, h = im.size
        side = min(w, h)
        im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        im = im.resize((resolution, resolution), Image.BICUBIC)
        out[i] = np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return out


def imagefolder_native_size(folder: str) -> int | None:
    """The smaller side (pixels) of the first image under folder (its header only), None without images."""
    from PIL import Image
    files = _imagefolder_files(folder) if os.path.isdir(folder) else []
    if not files:
        return None
    try:
        with Image.open(files[0]) as im:
            return min(im.size)
    except (OSError, ValueError, SyntaxError):
        return None                            # load_imagefolder names the damaged file


def _imagefolder_files(folder: str) -> list:
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTS))


# ----------------------------------------------------------------------------- entry point

def source_files(name: str, split: str = "train", data_dir: str | None = None) -> list | None:
    """The files an image dataset is decoded from, to key a cache of the decoded array on
    (their names, sizes and times) without decoding it. None for toys and points files
    (generated, or small and read directly) and where the files are not found (load_dataset
    then raises the error that names the fix)."""
    if name == "fashion-mnist":
        path = _fashion_mnist_path(split, data_dir)[0]
        return [path] if path else None
    if name == "cifar10":
        path = _cifar10_path(data_dir)[0]
        return [path] if path else None
    if name.startswith("imagefolder:"):
        folder = name.split(":", 1)[1]
        return (_imagefolder_files(folder) or None) if os.path.isdir(folder) else None
    return None


def load_dataset(name: str, split: str = "train", data_dir: str | None = None, resolution: int | None = None,
                 n: int | None = None, seed: int = 0) -> Dataset:
    """Load a dataset by name (see module docstring). n limits the number of samples."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name.startswith("toy:"):
        toy = name.split(":", 1)[1]
        data = make_toy(toy, n or 100_000, seed + TOY_SPLIT_SEED[split])
        return Dataset(name, data, "toy")
    if name.startswith("points:"):
        data = load_points(name.split(":", 1)[1], split)
        # d = 2 is drawn as scatter plots like the toys; other d are vectors without pictures
        return Dataset(name, data[:n] if n else data, "toy" if data.shape[1] == 2 else "points")
    if name == "fashion-mnist":
        data = load_fashion_mnist(split, data_dir)
    elif name == "cifar10":
        data = load_cifar10(split, data_dir)
    elif name.startswith("imagefolder:"):
        data = load_imagefolder(name.split(":", 1)[1], resolution or 64, n)
    else:
        raise ValueError(f"unknown dataset {name!r}: use toy:checkerboard, toy:moons, toy:8gaussians, toy:spirals, "
                         "points:PATH.npy, fashion-mnist, cifar10 or imagefolder:PATH")
    if resolution and data.shape[-1] != resolution:
        raise ValueError(f"{name} images are {data.shape[-1]}x{data.shape[-1]}; --resolution {resolution} "
                         "applies only to imagefolder data")
    return Dataset(name, data[:n] if n else data, "image")


class BatchIterator:
    """Endless shuffled batches; reshuffles every epoch; optional horizontal flips.

    Its whole state (epoch, position, seed) is a small dict, and the permutation
    of an epoch is a function of (seed, epoch), so a restored iterator continues
    with exactly the batches the interrupted run would have seen.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seed: int = 0, flip: bool = False):
        if batch_size > len(data):
            raise ValueError(f"batch size {batch_size} is larger than the dataset ({len(data)} samples)")
        self.data, self.batch_size, self.seed, self.flip = data, batch_size, seed, flip
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)
        self.shard = (0, batch_size)        # rows of every global batch this process keeps (distributed.py)

    def set_shard(self, lo: int, hi: int):
        """Keep only rows [lo, hi) of every batch: a data-parallel rank's part of the global batch.

        The global batch, its flips and the state dict do not change, so the ranks together
        see exactly the batches of one process, and a run resumes with any number of ranks.
        """
        if not 0 <= lo < hi <= self.batch_size:
            raise ValueError(f"shard [{lo}, {hi}) is not inside a batch of {self.batch_size}")
        self.shard = (lo, hi)

    def _permutation(self, epoch):
        return seeds.generator(self.seed, "epoch", epoch).permutation(len(self.data))

    def next(self) -> np.ndarray:
        if self.pos + self.batch_size > len(self.data):        # drop the ragged tail, start a new epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        idx = self._perm[self.pos:self.pos + self.batch_size]
        lo, hi = self.shard
        batch = self.data[idx[lo:hi]]                           # a rank reads only its rows
        if self.flip and batch.ndim == 4:
            mask = seeds.generator(self.seed, "flip", self.epoch, self.pos).random(len(idx))[lo:hi] < 0.5
            batch[mask] = batch[mask][..., ::-1]
        self.pos += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict):
        self.seed, self.epoch, self.pos = int(state["seed"]), int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation(self.epoch)
