"""Frechet Inception Distance (Heusel et al. 2017) as pytorch-fid computes it.

    mu = mean of the pool3 features,  sigma = covariance with N - 1
    FID = ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr sqrtm(s1 s2)

sqrtm is scipy's, in float64. If it is not finite, 1e-6 I is added to both
covariances and it is retried; an imaginary diagonal above 1e-3 raises; else
the real part is kept. Fewer samples than the feature dimension (2048) make
sigma singular: a warning is issued; FID is biased upward at small N
(use >= 10k, report 50k as the standard).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from scipy import linalg

from .recipes import DATA_DIR


class FeatureStats:
    """Streaming mean and covariance in float64: feed batches, then .mu / .sigma."""

    def __init__(self, dim: int = 2048):
        self.n = 0
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def update(self, feats):
        f = np.asarray(feats, np.float64)
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    @property
    def mu(self):
        return self.sum / self.n

    @property
    def sigma(self):
        if self.n < 2:
            raise ValueError("covariance needs at least 2 samples")
        mu = self.mu
        # sum (f - mu)(f - mu)^T = sum f f^T - n mu mu^T, divided by n - 1
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics have different shapes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm(s1 s2) is singular; adding {eps} I to both covariances")
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g}; "
                             "the statistics are numerically broken (too few samples?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def warn_if_few(n: int, dim: int = 2048):
    if n < dim:
        warnings.warn(f"FID from {n} samples (< {dim} feature dimensions): the covariance is singular and FID "
                      "is biased upward; use >= 10,000 samples (50,000 is the standard)")


def save_stats(path: str, mu, sigma, n: int, source: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, n=n, source=source)
    os.replace(tmp, path)


def load_stats(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"FID statistics {path} not found: create them with `python cli.py fid-stats --data ...`")
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} is not an FID statistics file (needs mu and sigma)")
        return f["mu"], f["sigma"], int(f["n"]) if "n" in f else None


def default_stats_path(data: str, split: str) -> str:
    from .recipes import slug
    return os.path.join(DATA_DIR, "fid_stats", f"{slug(data)}-{split}.npz")


def stats_of_images(model, batches, progress_label: str | None = None, n_batches: int | None = None):
    """FeatureStats over an iterable of image batches in [-1, 1] (NCHW; 1 channel is repeated to RGB).

    Batches are consumed lazily (samples are generated as features are taken).
    """
    import click
    stats = FeatureStats()
    with click.progressbar(batches, length=n_batches, label=progress_label or "features",
                           file=None if progress_label else open(os.devnull, "w")) as bar:
        for x in bar:
            x = np.asarray(x)
            if x.shape[1] == 1:
                x = np.repeat(x, 3, axis=1)
            stats.update(model.features((x + 1.0) / 2.0))
    return stats


def load_png_folder(folder: str) -> np.ndarray:
    """All PNG/JPG images in a folder as (N, 3, H, W) in [-1, 1] (same size required)."""
    from PIL import Image
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    if not files:
        raise FileNotFoundError(f"no PNG/JPG images in {folder}")
    arrs = []
    for f in files:
        with Image.open(os.path.join(folder, f)) as im:
            arrs.append(np.asarray(im.convert("RGB"), np.float32).transpose(2, 0, 1) / 127.5 - 1)
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise ValueError(f"images in {folder} have different sizes {sorted(shapes)}")
    return np.stack(arrs)
