"""cupy.random of the stand-in: default_rng -> a Generator whose draws land on the device.

The numbers are NumPy's PCG64, not CuPy's (XORWOW/Philox): the stand-in cannot
tell whether a GPU run replays a CPU run; only that draws are made on the device.
"""
import numpy as _np

from . import _wrap, _standin


class Generator:
    def __init__(self, seed=None):
        self._g = _np.random.default_rng(seed)

    def _draw(self, method, size, dtype, **kw):
        _standin.check_available("nvrtc")
        out = getattr(self._g, method)(size=size, **kw)
        return _wrap(_np.asarray(out).astype(dtype, copy=False))

    def standard_normal(self, size=None, dtype=_np.float64, out=None):
        return self._draw("standard_normal", size, dtype)

    def random(self, size=None, dtype=_np.float64, out=None):
        return self._draw("random", size, dtype)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=_np.float64):
        return self._draw("uniform", size, dtype, low=low, high=high)

    def normal(self, loc=0.0, scale=1.0, size=None, dtype=_np.float64):
        return self._draw("normal", size, dtype, loc=loc, scale=scale)

    def integers(self, low, high=None, size=None, dtype=_np.int64, endpoint=False):
        return self._draw("integers", size, dtype, low=low, high=high, endpoint=endpoint)


def default_rng(seed=None):
    return Generator(seed)
