"""Matrix-product precision: fp32, or TF32 (TensorFloat-32) inputs with fp32 accumulation.

Every GEMM of a linear layer, a convolution and an attention block goes
through `matmul` / `tensordot` here, so one switch decides how they round:

* ``fp32`` (default): plain float32 products (``a @ b``), nothing changed.
* ``tf32``: each float32 input is rounded to TF32 -- float32's 8 exponent
  bits, but only 10 of its 23 mantissa bits -- before the product; the
  products and the sums stay float32:

      C = round_tf32(A) @ round_tf32(B)          (fp32 accumulation)

  On an NVIDIA GPU (CuPy) this is what cuBLAS does with compute type
  CUBLAS_COMPUTE_32F_FAST_TF32 on the tensor cores (about 7x the fp32 peak
  of an H100); `apply` sets it through CuPy's
  ``cupy._core._routines_linalg.set_compute_type(float32, COMPUTE_TYPE_TF32)``
  (the setting ``CUPY_TF32=1`` would make at import). On the CPU (NumPy) and
  on the tests' CuPy stand-in the rounding is emulated exactly as written
  above: round to nearest, ties to even, on the float32 bit pattern, then an
  ordinary float32 product. (cuBLAS does not document how its tensor cores
  round fp32 to TF32; truncation would double the input error, 2^-10 instead
  of 2^-11 relative. The GPU check measures it.)

Only float32 products change: float64 (gradient checks) is never rounded.
Parameters, gradients, Adam and the EMA stay float32 ("master weights");
only what enters a GEMM is rounded.

    with precision.using("tf32"):        # train.train_loop does this with --precision
        y = precision.matmul(a, b)
"""
from __future__ import annotations

import contextlib

import numpy as np

from . import backend

MODES = ("fp32", "tf32")
_mode = "fp32"                # the current mode (set by `using` / `set_mode`)
_cupy_applied = {}            # id(cupy module) -> mode last given to cuBLAS
_cupy_last = None             # that cupy module (set_mode gives cuBLAS the new mode at once)

# float32 = sign | 8 exponent bits | 23 mantissa bits; TF32 keeps the top 10 mantissa bits
_DROPPED_BITS = 13
_STEP = np.uint32(1 << _DROPPED_BITS)         # one TF32 ulp in units of the float32 bit pattern
_HALF = np.uint32(1 << (_DROPPED_BITS - 1))   # half of it: the rounding threshold
_EXP_ONE = np.uint32(1 << 23)                 # the exponent field starts at bit 23
_EXP_ALL = np.uint32(255)                     # exponent 255: inf or NaN

# CuPy's compute types (cupy/_core/_routines_linalg.pxd: COMPUTE_TYPE_DEFAULT = 1, COMPUTE_TYPE_TF32 = 7)
_CUPY_COMPUTE_TYPE = {"fp32": "COMPUTE_TYPE_DEFAULT", "tf32": "COMPUTE_TYPE_TF32"}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown precision {mode!r}: choose fp32 or tf32 (option --precision)")
    return mode


def get_mode() -> str:
    return _mode


def set_mode(mode: str) -> str:
    """Set the GEMM precision; returns the previous mode."""
    global _mode
    previous, _mode = _mode, check_mode(mode)
    if _cupy_last is not None:           # cuBLAS's setting is global: follow the mode now, not at the next GEMM
        apply(_cupy_last, _mode)
    return previous


@contextlib.contextmanager
def using(mode: str):
    """Run a block with GEMM precision `mode` (the previous one is restored after)."""
    previous = set_mode(mode)
    try:
        yield
    finally:
        set_mode(previous)


def round_tf32(x):
    """float32 array -> the nearest TF32 values (ties to even), still float32. inf/NaN unchanged.

    On the bit pattern u (uint32): the 13 low mantissa bits are dropped, rounding
    up when they exceed half a TF32 ulp, or equal it and the kept last bit is odd:

        low = u mod 2^13,   u' = u - low + 2^13 [low > 2^12  or  (low = 2^12 and bit 13 of u = 1)]

    A carry out of the mantissa raises the exponent, as rounding should (the
    largest float32 rounds to inf). Written with integer arithmetic only (no
    bitwise operators), so it runs on NumPy, CuPy and the tests' stand-in alike.
    """
    xp = backend.array_module(x)
    if x.dtype != np.float32:
        raise TypeError(f"round_tf32 rounds float32 arrays, not {x.dtype}")
    u = xp.ascontiguousarray(x).view(xp.uint32)
    low = u % _STEP
    odd = (u // _STEP) % np.uint32(2) == np.uint32(1)
    up = (low > _HALF) | ((low == _HALF) & odd)
    rounded = (u - low) + up.astype(xp.uint32) * _STEP
    finite = (u // _EXP_ONE) % np.uint32(256) != _EXP_ALL
    return xp.where(finite, rounded, u).view(xp.float32).reshape(x.shape)


def _emulates(xp) -> bool:
    """True where TF32 is emulated by rounding (NumPy, the tests' CuPy stand-in), False on real CuPy."""
    return xp is np or getattr(xp, "_standin", None) is not None


def apply(xp, mode: str | None = None):
    """Give cuBLAS the compute type of `mode` (default: the current mode) for float32 GEMMs.

    Real CuPy only (a no-op for NumPy and the stand-in, which emulate). Raises
    backend.BackendError when this CuPy has no way to set it.
    """
    global _cupy_last
    mode = check_mode(mode or _mode)
    if _emulates(xp) or _cupy_applied.get(id(xp)) == mode:
        return
    try:
        from cupy._core import _routines_linalg as linalg    # noqa: WPS433 (CuPy internals, stable since v9)
        linalg.set_compute_type(np.float32, getattr(linalg, _CUPY_COMPUTE_TYPE[mode]))
    except (ImportError, AttributeError) as exc:
        raise backend.BackendError(
            f"--precision {mode}: this CuPy ({getattr(xp, '__version__', '?')}) does not expose "
            f"cupy._core._routines_linalg.set_compute_type ({exc}); use --precision fp32 or CuPy >= 9") from exc
    _cupy_applied[id(xp)] = mode
    _cupy_last = xp


def _tf32_operands(xp, *arrays):
    """The arrays as the current mode's GEMM sees them (rounded on NumPy/stand-in in tf32 mode)."""
    if _mode == "fp32" or any(a.dtype != np.float32 for a in arrays):
        return arrays
    if _emulates(xp):
        return tuple(round_tf32(a) for a in arrays)
    return arrays


def matmul(a, b):
    """a @ b in the current precision (fp32: exactly a @ b)."""
    xp = backend.array_module(a, b)
    if _mode == "fp32" and not _cupy_applied:
        return a @ b                               # the common case: no extra work at all
    if not _emulates(xp):
        apply(xp)
    a, b = _tf32_operands(xp, a, b)
    return xp.matmul(a, b)


def tensordot(a, b, axes):
    """xp.tensordot(a, b, axes) in the current precision."""
    xp = backend.array_module(a, b)
    if _mode != "fp32" or _cupy_applied:
        if not _emulates(xp):
            apply(xp)
        a, b = _tf32_operands(xp, a, b)
    return xp.tensordot(a, b, axes=axes)
