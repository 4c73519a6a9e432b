"""Inception-v3 in the variant pytorch-fid uses for FID (forward only).

    images (N, 3, H, W) in [0, 1] -> pool3 features (N, 2048)

Input: bilinear resize to 299x299 (align_corners=False, no antialias), then
x = 2x - 1. Every unit is conv (no bias) -> BatchNorm (eps 0.001, running
statistics) -> ReLU; BatchNorm is folded into the conv at load time:
    W' = W * gamma / sqrt(var + eps),   b' = beta - mean * gamma / sqrt(var + eps)

Stem: Conv2d_1a 3->32 k3 s2; 2a 32->32 k3; 2b 32->64 k3 p1; maxpool k3 s2;
      3b 64->80 k1; 4a 80->192 k3; maxpool k3 s2.
Mixed_5b/5c/5d: block A (in, pool features) (192, 32), (256, 64), (288, 64)
Mixed_6a: block B;  Mixed_6b..6e: block C with c7 = 128, 160, 160, 192
Mixed_7a: block D;  Mixed_7b: block E (avg pool);  Mixed_7c: block E (max pool)
global average pool -> 2048 features.

pytorch-fid's differences from torchvision's Inception3 (docs/fid.md): the pool
branch of A, C and the first E is avg_pool k3 s1 p1 with count_include_pad=False;
the second E uses max_pool k3 s1 p1 there.
Branch order: A [1x1, 5x5, 3x3dbl, pool]; B [3x3, 3x3dbl, pool];
C [1x1, 7x7, 7x7dbl, pool]; D [3x3, 7x7x3, pool];
E [1x1, cat(3x3_2a, 3x3_2b), cat(3x3dbl_3a, 3x3dbl_3b), pool].
"""
from __future__ import annotations

import os

import numpy as np

from . import backend
from .conv import conv2d_forward
from .pool import avg_pool2d, max_pool2d
from .recipes import data_root
from .resize import resize_bilinear

WEIGHTS_PTH = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_PTH
WEIGHTS_H5 = "inception_fid.h5"
BN_EPS = 1e-3
FEATURE_DIM = 2048


def _spec(k, s=1, p=0):
    """(kernel (kh, kw), stride, padding (ph, pw)) from int-or-pair kernel and padding."""
    kh, kw = (k, k) if isinstance(k, int) else k
    ph, pw = (p, p) if isinstance(p, int) else p
    return (kh, kw), s, (ph, pw)


STEM = [("Conv2d_1a_3x3", _spec(3, 2)), ("Conv2d_2a_3x3", _spec(3)), ("Conv2d_2b_3x3", _spec(3, 1, 1)),
        ("maxpool", None), ("Conv2d_3b_1x1", _spec(1)), ("Conv2d_4a_3x3", _spec(3)), ("maxpool", None)]
BLOCKS = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
          ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
          ("Mixed_7a", "D"), ("Mixed_7b", "E1"), ("Mixed_7c", "E2")]


def _block_units(kind, cin, width):
    """{branch name: (out, in, kh, kw)} of one mixed block; width = pool features (A) or c7 (C)."""
    if kind == "A":
        return {"branch1x1": (64, cin, 1, 1), "branch5x5_1": (48, cin, 1, 1), "branch5x5_2": (64, 48, 5, 5),
                "branch3x3dbl_1": (64, cin, 1, 1), "branch3x3dbl_2": (96, 64, 3, 3),
                "branch3x3dbl_3": (96, 96, 3, 3), "branch_pool": (width, cin, 1, 1)}
    if kind == "B":
        return {"branch3x3": (384, cin, 3, 3), "branch3x3dbl_1": (64, cin, 1, 1),
                "branch3x3dbl_2": (96, 64, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3)}
    if kind == "C":
        c7 = width
        return {"branch1x1": (192, cin, 1, 1), "branch7x7_1": (c7, cin, 1, 1), "branch7x7_2": (c7, c7, 1, 7),
                "branch7x7_3": (192, c7, 7, 1), "branch7x7dbl_1": (c7, cin, 1, 1), "branch7x7dbl_2": (c7, c7, 7, 1),
                "branch7x7dbl_3": (c7, c7, 1, 7), "branch7x7dbl_4": (c7, c7, 7, 1),
                "branch7x7dbl_5": (192, c7, 1, 7), "branch_pool": (192, cin, 1, 1)}
    if kind == "D":
        return {"branch3x3_1": (192, cin, 1, 1), "branch3x3_2": (320, 192, 3, 3), "branch7x7x3_1": (192, cin, 1, 1),
                "branch7x7x3_2": (192, 192, 1, 7), "branch7x7x3_3": (192, 192, 7, 1),
                "branch7x7x3_4": (192, 192, 3, 3)}
    return {"branch1x1": (320, cin, 1, 1), "branch3x3_1": (384, cin, 1, 1), "branch3x3_2a": (384, 384, 1, 3),
            "branch3x3_2b": (384, 384, 3, 1), "branch3x3dbl_1": (448, cin, 1, 1), "branch3x3dbl_2": (384, 448, 3, 3),
            "branch3x3dbl_3a": (384, 384, 1, 3), "branch3x3dbl_3b": (384, 384, 3, 1), "branch_pool": (192, cin, 1, 1)}


# (in channels, pool features / c7) of each mixed block (pytorch-fid's FIDInception*)
BLOCK_WIDTHS = {"Mixed_5b": (192, 32), "Mixed_5c": (256, 64), "Mixed_5d": (288, 64), "Mixed_6a": (288, None),
                "Mixed_6b": (768, 128), "Mixed_6c": (768, 160), "Mixed_6d": (768, 160), "Mixed_6e": (768, 192),
                "Mixed_7a": (768, None), "Mixed_7b": (1280, None), "Mixed_7c": (2048, None)}


def unit_shapes() -> dict:
    """{unit name: conv weight shape (out, in, kh, kw)} of all 94 conv units, in forward order."""
    shapes = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (64, 32, 3, 3),
              "Conv2d_3b_1x1": (80, 64, 1, 1), "Conv2d_4a_3x3": (192, 80, 3, 3)}
    for block, kind in BLOCKS:
        cin, width = BLOCK_WIDTHS[block]
        for branch, shape in _block_units(kind[0], cin, width).items():
            shapes[f"{block}.{branch}"] = shape
    return shapes


def fold_batchnorm(state_dict) -> dict:
    """{unit: (W', b')} float32 from a pytorch-fid state dict (conv.weight + bn.*), checked against the
    architecture; other entries (fc, num_batches_tracked) are ignored.

        W' = W * gamma / sqrt(var + eps),   b' = beta - mean * gamma / sqrt(var + eps)   (in float64)
    """
    units = {}
    missing = [u for u in unit_shapes() if f"{u}.conv.weight" not in state_dict]
    if missing:
        raise ValueError(f"Inception weights are missing {len(missing)} of 94 conv units, e.g. "
                         f"{', '.join(missing[:4])} (is this pytorch-fid's {WEIGHTS_PTH}?)")
    for unit, shape in unit_shapes().items():
        W = np.asarray(state_dict[f"{unit}.conv.weight"], np.float64)
        if W.shape != shape:
            raise ValueError(f"Inception weights: {unit}.conv.weight has shape {W.shape}, the FID Inception-v3 "
                             f"needs {shape} (is this pytorch-fid's {WEIGHTS_PTH}?)")
        try:
            g, b = state_dict[f"{unit}.bn.weight"], state_dict[f"{unit}.bn.bias"]
            m, v = state_dict[f"{unit}.bn.running_mean"], state_dict[f"{unit}.bn.running_var"]
        except KeyError as exc:
            raise ValueError(f"Inception weights: {unit} has a conv but no BatchNorm entry {exc}") from None
        scale = np.asarray(g, np.float64) / np.sqrt(np.asarray(v, np.float64) + BN_EPS)       # (out,)
        units[unit] = ((W * scale[:, None, None, None]).astype(np.float32),
                       (np.asarray(b, np.float64) - np.asarray(m, np.float64) * scale).astype(np.float32))
    return units


def random_weights(seed: int = 0) -> dict:
    """A state dict with pytorch-fid's key names and random values, for tests and benchmarks.

    He-normal convolutions keep the signal alive through the ~50 layers; BatchNorm statistics
    and affine parameters are random too, so BatchNorm folding is exercised.
    """
    rng = np.random.default_rng(seed)
    sd = {}
    for unit, (o, i, kh, kw) in unit_shapes().items():
        sd[f"{unit}.conv.weight"] = (rng.standard_normal((o, i, kh, kw)) * np.sqrt(2.0 / (i * kh * kw))).astype(np.float32)
        sd[f"{unit}.bn.weight"] = rng.uniform(0.8, 1.2, o).astype(np.float32)
        sd[f"{unit}.bn.bias"] = rng.uniform(-0.1, 0.1, o).astype(np.float32)
        sd[f"{unit}.bn.running_mean"] = rng.uniform(-0.1, 0.1, o).astype(np.float32)
        sd[f"{unit}.bn.running_var"] = rng.uniform(0.8, 1.2, o).astype(np.float32)
        sd[f"{unit}.bn.num_batches_tracked"] = np.array(0, np.int64)
    sd["fc.weight"] = (rng.standard_normal((1008, FEATURE_DIM)) * 0.01).astype(np.float32)
    sd["fc.bias"] = np.zeros(1008, np.float32)
    return sd


class InceptionV3FID:
    """Feature extractor: `features(images_0_1)` -> (N, 2048) float64 NumPy."""

    def __init__(self, units: dict, xp=None, dtype=np.float32):
        """units: {unit name: (W' (out, in, kh, kw), b' (out,))} with BatchNorm folded (fold_batchnorm)."""
        xp = xp or backend.get_xp()
        self.xp, self.dtype = xp, np.dtype(dtype)
        for name, shape in unit_shapes().items():
            if name not in units:
                raise ValueError(f"Inception weights have no unit {name}: convert the weights again "
                                 f"(`python cli.py convert-inception {WEIGHTS_PTH}`)")
            if tuple(units[name][0].shape) != shape or tuple(units[name][1].shape) != shape[:1]:
                raise ValueError(f"Inception unit {name} has weight/bias shapes {units[name][0].shape}/"
                                 f"{units[name][1].shape}, the architecture needs {shape}/{shape[:1]}")
        self.units = {k: (xp.asarray(np.asarray(units[k][0]).astype(dtype)), xp.asarray(np.asarray(units[k][1]).astype(dtype)))
                      for k in unit_shapes()}

    # -- building blocks ---------------------------------------------------
    def unit(self, name, x, k=1, s=1, p=0):
        """conv (BN folded) -> ReLU: x (N, in, H, W) -> (N, out, Ho, Wo). k, p: int or (h, w)."""
        W, b = self.units[name]
        y, _ = conv2d_forward(x, W, b, s, _spec(k, s, p)[2])
        return self.xp.maximum(y, 0, out=y)

    def block_a(self, n, x):
        b1 = self.unit(f"{n}.branch1x1", x)
        b5 = self.unit(f"{n}.branch5x5_2", self.unit(f"{n}.branch5x5_1", x), 5, 1, 2)
        b3 = self.unit(f"{n}.branch3x3dbl_1", x)
        b3 = self.unit(f"{n}.branch3x3dbl_3", self.unit(f"{n}.branch3x3dbl_2", b3, 3, 1, 1), 3, 1, 1)
        bp = self.unit(f"{n}.branch_pool", avg_pool2d(x, 3, 1, 1))
        return self.xp.concatenate([b1, b5, b3, bp], axis=1)

    def block_b(self, n, x):
        b3 = self.unit(f"{n}.branch3x3", x, 3, 2)
        bd = self.unit(f"{n}.branch3x3dbl_1", x)
        bd = self.unit(f"{n}.branch3x3dbl_3", self.unit(f"{n}.branch3x3dbl_2", bd, 3, 1, 1), 3, 2)
        return self.xp.concatenate([b3, bd, max_pool2d(x, 3, 2)], axis=1)

    def block_c(self, n, x):
        b1 = self.unit(f"{n}.branch1x1", x)
        b7 = self.unit(f"{n}.branch7x7_1", x)
        b7 = self.unit(f"{n}.branch7x7_2", b7, (1, 7), 1, (0, 3))
        b7 = self.unit(f"{n}.branch7x7_3", b7, (7, 1), 1, (3, 0))
        bd = self.unit(f"{n}.branch7x7dbl_1", x)
        bd = self.unit(f"{n}.branch7x7dbl_2", bd, (7, 1), 1, (3, 0))
        bd = self.unit(f"{n}.branch7x7dbl_3", bd, (1, 7), 1, (0, 3))
        bd = self.unit(f"{n}.branch7x7dbl_4", bd, (7, 1), 1, (3, 0))
        bd = self.unit(f"{n}.branch7x7dbl_5", bd, (1, 7), 1, (0, 3))
        bp = self.unit(f"{n}.branch_pool", avg_pool2d(x, 3, 1, 1))
        return self.xp.concatenate([b1, b7, bd, bp], axis=1)

    def block_d(self, n, x):
        b3 = self.unit(f"{n}.branch3x3_2", self.unit(f"{n}.branch3x3_1", x), 3, 2)
        b7 = self.unit(f"{n}.branch7x7x3_1", x)
        b7 = self.unit(f"{n}.branch7x7x3_2", b7, (1, 7), 1, (0, 3))
        b7 = self.unit(f"{n}.branch7x7x3_3", b7, (7, 1), 1, (3, 0))
        b7 = self.unit(f"{n}.branch7x7x3_4", b7, 3, 2)
        return self.xp.concatenate([b3, b7, max_pool2d(x, 3, 2)], axis=1)

    def block_e(self, n, x, pool):
        xp = self.xp
        b1 = self.unit(f"{n}.branch1x1", x)
        b3 = self.unit(f"{n}.branch3x3_1", x)
        b3 = xp.concatenate([self.unit(f"{n}.branch3x3_2a", b3, (1, 3), 1, (0, 1)),
                             self.unit(f"{n}.branch3x3_2b", b3, (3, 1), 1, (1, 0))], axis=1)
        bd = self.unit(f"{n}.branch3x3dbl_2", self.unit(f"{n}.branch3x3dbl_1", x), 3, 1, 1)
        bd = xp.concatenate([self.unit(f"{n}.branch3x3dbl_3a", bd, (1, 3), 1, (0, 1)),
                             self.unit(f"{n}.branch3x3dbl_3b", bd, (3, 1), 1, (1, 0))], axis=1)
        pooled = avg_pool2d(x, 3, 1, 1) if pool == "avg" else max_pool2d(x, 3, 1, 1)
        bp = self.unit(f"{n}.branch_pool", pooled)
        return xp.concatenate([b1, b3, bd, bp], axis=1)

    # -- the network -------------------------------------------------------
    def features(self, images, chunk: int = 32):
        """images (N, 3, H, W) in [0, 1] (numpy or device array) -> (N, 2048) float64 NumPy.

        Run `chunk` images at a time: the stem's im2col matrices take ~25 MB per image.
        """
        return backend.to_numpy(self.device_features(images, chunk))

    def device_features(self, images, chunk: int = 32):
        """Like features, but the (N, 2048) float64 result stays on the network's device (FID sums it there)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception takes RGB images (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if images.shape[0] > chunk:
            return self.xp.concatenate([self.device_features(images[i:i + chunk], chunk)
                                        for i in range(0, images.shape[0], chunk)])
        xp = self.xp
        x = backend.to_device(images, xp).astype(self.dtype, copy=False)
        x = resize_bilinear(x, 299, 299) * 2 - 1                       # (N, 3, 299, 299) in [-1, 1]
        for name, spec in STEM:
            if spec is None:
                x = max_pool2d(x, 3, 2)
            else:
                (kh, kw), s, p = spec
                x = self.unit(name, x, (kh, kw), s, p)
        for name, kind in BLOCKS:
            if kind == "A":
                x = self.block_a(name, x)
            elif kind == "B":
                x = self.block_b(name, x)
            elif kind == "C":
                x = self.block_c(name, x)
            elif kind == "D":
                x = self.block_d(name, x)
            else:
                x = self.block_e(name, x, "avg" if kind == "E1" else "max")
        pooled = x.mean(axis=(2, 3))                                   # (N, 2048) pool3
        return pooled.astype(xp.float64)


# ----------------------------------------------------------------------------- weights files

def convert_weights(pth_path: str, h5_path: str | None = None) -> str:
    """Read the pytorch-fid .pth (no torch needed), fold BatchNorm, write HDF5 once."""
    from .torch_reader import load_torch_file
    h5_path = h5_path or os.path.join(data_root(), WEIGHTS_H5)
    not_it = f"{pth_path} is not pytorch-fid's Inception weights file {WEIGHTS_PTH}"
    fix = f"download it from {WEIGHTS_URL}"
    if not os.path.isfile(pth_path):
        raise FileNotFoundError(f"{pth_path} does not exist; pytorch-fid's weights file {WEIGHTS_PTH} is "
                                f"published at {WEIGHTS_URL}")
    try:
        state_dict = load_torch_file(pth_path)     # ValueError for an empty, damaged or refused file
        if not isinstance(state_dict, dict):
            raise ValueError(f"it holds a {type(state_dict).__name__}, not a state dict")
        units = fold_batchnorm(state_dict)
    except ValueError as exc:
        raise ValueError(f"{not_it}: {exc}; {fix}") from None
    return save_units(units, h5_path, source=os.path.basename(pth_path))


def save_units(units: dict, h5_path: str, source: str = "") -> str:
    """Folded units {name: (W', b')} -> HDF5 groups name/weight, name/bias (written atomically)."""
    import h5py
    from . import atomic

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["source"] = source
            for name, (W, b) in units.items():
                f[f"{name}/weight"] = W
                f[f"{name}/bias"] = b
    return atomic.save_with(h5_path, write)         # temp file, fsync, rename: a failed write keeps the old file


def load_inception(h5_path: str | None = None, xp=None) -> InceptionV3FID:
    """The FID Inception from data/inception_fid.h5 (converting the .pth in data/ if only that exists)."""
    import h5py
    h5_path = h5_path or os.path.join(data_root(), WEIGHTS_H5)
    if not os.path.exists(h5_path):
        pth = os.path.join(data_root(), WEIGHTS_PTH)
        if not os.path.exists(pth):
            raise FileNotFoundError(
                f"FID needs the Inception weights {WEIGHTS_PTH} (published by pytorch-fid at {WEIGHTS_URL}). "
                f"Download it into {data_root()}/ and run `python cli.py convert-inception {os.path.join('data', WEIGHTS_PTH)}`.")
        convert_weights(pth, h5_path)
    with h5py.File(h5_path, "r") as f:
        units = {name: (f[name]["weight"][()], f[name]["bias"][()]) for name in _unit_names(f)}
    return InceptionV3FID(units, xp)


def _unit_names(f):
    names = []
    f.visit(lambda n: names.append(n[: -len("/weight")]) if n.endswith("/weight") else None)
    return names
