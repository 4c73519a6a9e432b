"""Frechet Inception Distance (Heusel et al. 2017) as pytorch-fid computes it.

    mu = mean of the pool3 features,  sigma = covariance with N - 1
    FID = ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr sqrtm(s1 s2)

sqrtm is scipy's, in float64. If it is not finite, 1e-6 I is added to both
covariances and it is retried; an imaginary diagonal above 1e-3 raises; else
the real part is kept. Fewer samples than the feature dimension (2048) make
sigma singular: a warning is issued; FID is biased upward at small N
(use >= 10k, report 50k as the standard).

Images enter as they would be stored in PNG files: values in [-1, 1] are
clipped and rounded to 8 bits (v = round((x + 1) 127.5), then v / 255 in
[0, 1] for the network), so the FID of generated samples equals the FID of
the same samples written to PNGs and scored as a folder (pytorch-fid reads
PNGs). Dataset images are 8-bit already, so the rounding leaves them as
they are.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import scipy
from scipy import linalg

from . import backend
from .data import IMAGE_EXTS
from .recipes import data_root

# SciPy 1.16 rewrote sqrtm and deprecated its `disp` argument (removed in 1.18);
# before that, disp=False (pytorch-fid's call) is what silences its console message.
_SQRTM_TAKES_DISP = tuple(int(v) for v in scipy.__version__.split(".")[:2]) < (1, 16)


class FeatureStats:
    """Streaming mean and covariance in float64: feed batches, then .mu / .sigma.

    Sums are taken of f - shift, with shift the first batch's mean, so that
    sum (f - mu)(f - mu)^T = sum d d^T - n m m^T  (d = f - shift, m = mean of d)
    does not cancel catastrophically when the features' mean is large.

    The sums live on the device of the first batch: GPU features are summed on
    the GPU (the (dim, dim) outer-product sum is one float64 GEMM per batch) and
    come to the host once, when .mu/.sigma (or .shift/.sum/.outer) are read.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim            # fixed by the first batch when None
        self.n = 0
        self._shift = self._sum = self._outer = None      # (dim,), (dim,), (dim, dim) float64

    def update(self, feats):
        if not hasattr(feats, "ndim"):
            feats = np.asarray(feats)
        if self._sum is not None:                          # keep summing where the sums are
            feats = backend.to_device(feats, backend.array_module(self._sum))
        xp = backend.array_module(feats)
        f = feats.astype(xp.float64)                       # (B, dim)
        if f.ndim != 2:
            raise ValueError(f"features must be (batch, dim), got shape {tuple(f.shape)}")
        if self._shift is None:
            if self.dim is not None and f.shape[1] != self.dim:
                raise ValueError(f"features have {f.shape[1]} dimensions, expected {self.dim}")
            self.dim = f.shape[1]
            self._shift = f.mean(axis=0)
            self._sum = xp.zeros(self.dim)
            self._outer = xp.zeros((self.dim, self.dim))
        elif f.shape[1] != self.dim:
            raise ValueError(f"features have {f.shape[1]} dimensions, expected {self.dim}")
        d = f - self._shift
        self.n += f.shape[0]
        self._sum += d.sum(axis=0)
        self._outer += d.T @ d

    def _host(self, name):
        """The sums as NumPy arrays: the first read copies all three from the device (once)."""
        if self._sum is not None and not isinstance(self._sum, np.ndarray):
            self._shift, self._sum, self._outer = (backend.to_numpy(a) for a in (self._shift, self._sum, self._outer))
        return getattr(self, name)

    # shift, sum (of d) and outer (sum d d^T), on the host; merge_feature_stats sets them too
    shift = property(lambda self: self._host("_shift"), lambda self, v: setattr(self, "_shift", v))
    sum = property(lambda self: self._host("_sum"), lambda self, v: setattr(self, "_sum", v))
    outer = property(lambda self: self._host("_outer"), lambda self, v: setattr(self, "_outer", v))

    @property
    def mu(self):
        if self.n < 1:
            raise ValueError("no features were added")
        return self.shift + self.sum / self.n

    @property
    def sigma(self):
        if self.n < 2:
            raise ValueError("covariance needs at least 2 samples")
        m = self.sum / self.n
        # sum (f - mu)(f - mu)^T = sum d d^T - n m m^T, divided by n - 1
        return (self.outer - self.n * np.outer(m, m)) / (self.n - 1)


def merge_feature_stats(comm, stats: FeatureStats) -> FeatureStats:
    """FeatureStats over the union of every rank's features, on every rank (float64 sums).

    comm: a communicator of ttfm_np.distributed (allreduce_sum, allgather_object); with one
    rank the stats come back unchanged.
    Rank r holds n_r, shift c_r, S_r = sum d, O_r = sum d d^T with d = f - c_r.
    Re-centred on a common shift c (the n-weighted mean of the shifts), d' = d + delta,
    delta = c_r - c:
        S'_r = S_r + n_r delta
        O'_r = O_r + S_r delta^T + delta S_r^T + n_r delta delta^T
    and the sums over r are the statistics of all features (exact algebra).
    A rank without features contributes zeros.
    """
    if comm.size == 1:
        return stats
    dims = [d for d in comm.allgather_object(stats.dim if stats.n > 0 else None) if d is not None]
    if not dims:
        raise ValueError("no features were added on any rank")
    if len(set(dims)) != 1:
        raise ValueError(f"ranks hold features of different dimensions {sorted(set(dims))}")
    dim = dims[0]
    # c = sum_r n_r c_r / sum_r n_r   (one all-reduce of dim + 1 numbers)
    head = np.zeros(dim + 1)
    if stats.n > 0:
        head[:dim], head[dim] = stats.n * stats.shift, stats.n
    comm.allreduce_sum(head)
    shift = head[:dim] / head[dim]
    # [n, S', O'] in one buffer of 1 + dim + dim^2 float64 (32 MiB for Inception's 2048)
    buf = np.zeros(1 + dim + dim * dim)
    if stats.n > 0:
        delta = stats.shift - shift
        s = stats.sum + stats.n * delta
        o = stats.outer + np.outer(stats.sum, delta) + np.outer(delta, stats.sum) + stats.n * np.outer(delta, delta)
        buf[0], buf[1:1 + dim], buf[1 + dim:] = stats.n, s, o.reshape(-1)
    comm.allreduce_sum(buf)
    merged = FeatureStats(dim)
    merged.n = int(round(buf[0]))
    merged.shift, merged.sum, merged.outer = shift, buf[1:1 + dim].copy(), buf[1 + dim:].reshape(dim, dim).copy()
    return merged


def _sqrtm(a):
    """scipy.linalg.sqrtm(a), without its singular-matrix message (the caller checks the result)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        if _SQRTM_TAKES_DISP:
            return linalg.sqrtm(a, disp=False)[0]
        return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr s1 + tr s2 - 2 tr sqrtm(s1 s2), in float64 (pytorch-fid's recipe)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"statistics have different shapes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # product of (near-)singular covariances: shift both away from singularity
        warnings.warn(f"FID: sqrtm(s1 s2) is not finite (singular product); adding {eps} I to both covariances")
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        # s1 s2 is similar to the PSD s1^1/2 s2 s1^1/2, so its square root is real up to rounding
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm(s1 s2) has an imaginary component of size "
                             f"{np.max(np.abs(covmean.imag)):.3g}; the statistics are numerically broken "
                             "(too few samples for the 2048 features? use >= 10,000)")
        covmean = covmean.real
    if not np.isfinite(covmean).all():
        raise ValueError("FID: sqrtm(s1 s2) is not finite even after the 1e-6 I offset; "
                         "check the statistics for NaN/inf")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def warn_if_few(n: int, dim: int = 2048):
    if n < dim:
        warnings.warn(f"FID from {n} samples (< {dim} feature dimensions): the covariance is singular and FID "
                      "is biased upward; use >= 10,000 samples (50,000 is the standard)")


# ----------------------------------------------------------------------------- statistics files

def save_stats(path: str, mu, sigma, n: int, source: str):
    """mu (D,), sigma (D, D), sample count and a description, as .npz (written atomically)."""
    from . import atomic
    with atomic.write(path, "wb") as f:          # temp file, fsync, rename: a failed write keeps the old file
        np.savez(f, mu=mu, sigma=sigma, n=n, source=source)


def load_stats(path: str):
    """(mu, sigma, n) from a file of save_stats (or pytorch-fid's --save-stats .npz, which has no n)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"FID statistics {path} not found: create them with `python cli.py fid-stats --data ...`")
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} is not an FID statistics file (needs mu and sigma)")
        return f["mu"], f["sigma"], int(f["n"]) if "n" in f else None


def default_stats_path(data: str, split: str) -> str:
    """data/fid_stats/<dataset>-<split>.npz, where fid-stats writes and fid looks."""
    from .recipes import slug
    return os.path.join(data_root(), "fid_stats", f"{slug(data)}-{split}.npz")


# ----------------------------------------------------------------------------- features of images

def to_unit_range_8bit(x):
    """Images in [-1, 1] (N, C, H, W) -> RGB in [0, 1] as an 8-bit PNG would hold them (numpy or cupy).

    v = round(clip(x, -1, 1) * 127.5 + 127.5) in 0..255, returned as v / 255; one channel is repeated to RGB.
    """
    xp = backend.array_module(x)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"FID takes images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
    v = xp.rint(xp.clip(x, -1.0, 1.0) * 127.5 + 127.5)
    if x.shape[1] == 1:
        v = xp.repeat(v, 3, axis=1)
    return (v / 255.0).astype(np.float32)


def stats_of_images(model, batches, progress_label: str | None = None, n_batches: int | None = None):
    """FeatureStats over an iterable of image batches in [-1, 1] (NCHW, numpy or cupy; 1 channel -> RGB).

    Batches are consumed lazily (samples are generated, or files read, as features are taken).
    A progress bar is drawn when progress_label is given.
    """
    from .progress import Progress
    stats = FeatureStats()
    # Inception's device_features keeps the (B, 2048) features on the GPU, where the sums are
    features = getattr(model, "device_features", None) or model.features
    if progress_label is None:
        for x in batches:
            stats.update(features(to_unit_range_8bit(x)))
        return stats
    for x in Progress.iterate(batches, progress_label, total=n_batches):
        stats.update(features(to_unit_range_8bit(x)))
    return stats


def png_files(folder: str) -> list:
    """The image files of a folder (extensions data.IMAGE_EXTS), sorted by name."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise FileNotFoundError(f"no PNG/JPG images in {folder} (looked for {', '.join(IMAGE_EXTS)})")
    return files


def read_images(files) -> np.ndarray:
    """Image files (all of one size) -> (N, 3, H, W) float32 in [-1, 1]."""
    from .images import open_rgb
    arrs = []
    for path in files:
        im = open_rgb(path)                    # ValueError naming the file if damaged or a decompression bomb
        arrs.append(np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1)
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)} (e.g. {files[0]}); "
                         "FID batches need one size: resize the folder first")
    return np.stack(arrs)


def iter_png_batches(files, batch_size: int):
    """Batches (B, 3, H, W) in [-1, 1] read from the files as they are needed (bounded memory)."""
    first_shape = None
    for i in range(0, len(files), batch_size):
        batch = read_images(files[i:i + batch_size])
        if first_shape is None:
            first_shape = batch.shape[1:]
        elif batch.shape[1:] != first_shape:
            raise ValueError(f"{files[i]} and the images before it have different sizes "
                             f"({batch.shape[1:]} vs {first_shape}); resize the folder first")
        yield batch

