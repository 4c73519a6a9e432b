"""PNG output people can look at: image grids and 2-D scatter plots (pillow only)."""
from __future__ import annotations

import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import atomic, backend


def to_uint8(images):
    """NCHW floats in [-1, 1] -> NHWC uint8 in [0, 255] (clipped)."""
    x = backend.to_numpy(images).astype(np.float64)
    x = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def image_grid(images, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """A grid of NCHW images in [-1, 1] (C = 1 or 3) as one pillow image."""
    x = to_uint8(images)
    n, h, w, c = x.shape
    if c not in (1, 3):
        raise ValueError(f"image grids need 1 or 3 channels, got {c}")
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")


def save_image_grid(images, path: str, nrow: int | None = None, upscale: int = 1):
    img = image_grid(images, nrow)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    save_image(img, path)


def plane(points):
    """(N, d) points -> (N, 2) coordinates to draw, and a note: d = 2 as they are; d > 2 the first two
    coordinates (a projection); d = 1 the values along the horizontal axis."""
    p = backend.to_numpy(points).reshape(len(points), -1)
    d = p.shape[1]
    if d == 2:
        return p, ""
    if d == 1:
        return np.concatenate([p, np.zeros_like(p)], axis=1), " (1-D: values on the x axis)"
    return p[:, :2], f" (coordinates 1-2 of {d})"


def scatter_image(points, reference=None, size: int = 512, extent: float = 4.5, title: str | None = None):
    """Points as dots on a white square ([-extent, extent]^2); reference points in grey.

    Points of d != 2 are drawn through plane() (the first two coordinates), which the title says.
    """
    points, note = plane(points)
    reference = None if reference is None else plane(reference)[0]
    title = (title + note) if title and note else title
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def to_px(p):
        p = backend.to_numpy(p).astype(np.float64)
        return (p + extent) / (2 * extent) * (size - 1)

    mid = (size - 1) / 2
    draw.line([(0, mid), (size, mid)], fill=(225, 225, 225))
    draw.line([(mid, 0), (mid, size)], fill=(225, 225, 225))
    for pts, colour in ((reference, (170, 170, 170)), (points, (20, 70, 200))):
        if pts is None:
            continue
        px = to_px(pts)
        for x, y in px:
            y = size - 1 - y                                  # image rows grow downward
            draw.rectangle([x - 1, y - 1, x + 1, y + 1], fill=colour)
    if title:
        # a label readable at 100 %: about 1/18 of the panel, never below 14 px
        draw.text((8, 6), title, fill=(0, 0, 0), font=label_font(max(14, size // 18)))
    return img


def label_font(px: int):
    """A scalable font of about px pixels (pillow's bundled one), or the tiny bitmap font if unavailable."""
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError):            # pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def save_scatter(points, path: str, reference=None, title: str | None = None):
    save_image(scatter_image(points, reference, title=title), path)


def line_plot(xs, ys, title: str = "", size=(640, 360), log_y: bool = False, smooth: int = 1) -> Image.Image:
    """A minimal line plot (raw values in light grey, a moving average of `smooth` points in blue)."""
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if log_y:
        ys = np.log10(np.maximum(ys, 1e-30))
    avg = np.convolve(ys, np.ones(smooth) / smooth, mode="valid") if smooth > 1 and len(ys) >= smooth else ys
    ax = xs[len(xs) - len(avg):]
    W, H = size
    L, R, T, B = 60, 15, 25, 35
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1e-12)
    lo, hi = np.percentile(ys, 1), np.percentile(ys, 99.5)
    hi = max(hi, lo + 1e-12)
    px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    py = lambda y: T + (hi - np.clip(y, lo, hi)) / (hi - lo) * (H - T - B)
    d.rectangle([L, T, W - R, H - B], outline=(120, 120, 120))
    for frac in (0.0, 0.5, 1.0):
        yv = lo + frac * (hi - lo)
        label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
        d.text((4, py(yv) - 6), label, fill=(0, 0, 0))
        xv = x0 + frac * (x1 - x0)
        d.text((px(xv) - 10, H - B + 6), f"{xv:.0f}", fill=(0, 0, 0))
    d.line([(px(x), py(y)) for x, y in zip(xs, ys)], fill=(200, 200, 200), width=1)
    d.line([(px(x), py(y)) for x, y in zip(ax, avg)], fill=(20, 70, 200), width=2)
    d.text((L, 5), title, fill=(0, 0, 0))
    return img


def save_panels(images, path: str):
    """Place several pillow images side by side (e.g. one per step count)."""
    w = sum(im.width for im in images) + 4 * (len(images) - 1)
    h = max(im.height for im in images)
    canvas = Image.new("RGB", (w, h), "white")
    x = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (x, 0))
        x += im.width + 4
    save_image(canvas, path)


def save_image(img: Image.Image, path: str):
    """Write a pillow image atomically (atomic.py), creating the folder; the format follows the file name."""
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"cannot tell an image format from the file name {path!r}: end it in .png")
    atomic.save_with(path, lambda tmp: img.save(tmp, format=fmt))


# ----------------------------------------------------------------------------- reading image files

def open_rgb(path: str) -> Image.Image:
    """An image file as a decoded RGB pillow image; ValueError naming the file when it cannot be read.

    Pillow refuses images whose header claims more than 2 * Image.MAX_IMAGE_PIXELS
    pixels (DecompressionBombError) and only warns between 1x and 2x; both are
    errors here: a data set of small images should never need a 100-megapixel
    decode (a damaged or hostile header, e.g. a PNG that inflates to gigabytes).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert("RGB")       # convert decodes every pixel: truncated data fails here
    except FileNotFoundError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{path} is refused as a possible decompression bomb ({exc}); remove the file, or shrink "
                         "it if it really is such a large image") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise ValueError(f"{path} is not a readable image ({exc.__class__.__name__}: {exc}); remove or replace "
                         "the file") from None
