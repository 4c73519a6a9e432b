"""A CuPy stand-in for tests on machines without a GPU (never used outside tests/).

tests/conftest.py puts tests/cupy_standin first on sys.path when no real GPU is
present (or when TTFM_CUPY_STANDIN=1), so `import cupy` in the library gets
this package and every CuPy branch of ttfm_np runs on the CPU:

* `ndarray` is a device array backed by a NumPy array. Like CuPy it refuses
  implicit mixing with host arrays: np.asarray(device_array) raises, an
  operation that mixes a device array with a numpy.ndarray raises, and only
  asarray/asnumpy/.get()/.set() move data between host and device.
* exactly the part of CuPy's API the library uses (module functions, ufuncs,
  ndarray methods, random.default_rng, cuda.Device/runtime, the memory pool);
  anything else raises AttributeError, so new CuPy calls get noticed here.
* RawModule / get_function run the kernel source on the CUDA emulator
  (tests/gpu_emulator), with CuPy's compile options (-ftz=true appended).
* counters (`cupy._standin.counters`): kernel launches (RawModule kernels;
  the NumPy-backed array operations are not counted), host->device and
  device->host copies and bytes, host syncs (float()/int()/bool()/.item()/
  .get()/.tolist()/asnumpy()/synchronize()), live and peak device bytes
  (every buffer a device array owns, freed when its last view dies).

What it cannot tell: speed, cuBLAS/TF32 rounding, CUDA's exp/sqrt ulps, and
random numbers (cupy.random here is NumPy's PCG64, not CuPy's XORWOW/Philox).
"""
from __future__ import annotations

import builtins as _builtins
import os as _os
import sys as _sys
import weakref

if _os.environ.get("TTFM_CUPY_STANDIN") != "1" and "pytest" not in _sys.modules:
    raise ImportError("tests/cupy_standin is the test suite's CuPy stand-in, not CuPy: it is only imported under "
                      "pytest or with TTFM_CUPY_STANDIN=1. Remove tests/cupy_standin from sys.path/PYTHONPATH "
                      "and install CuPy (pip install -e .[gpu]).")

import numpy as _np

from . import _standin
from ._standin import counters

__version__ = "14.0.0+standin"

# scalar types are NumPy's, as in CuPy
float16, float32, float64 = _np.float16, _np.float32, _np.float64
int8, int16, int32, int64 = _np.int8, _np.int16, _np.int32, _np.int64
uint8, uint32, uint64, bool_ = _np.uint8, _np.uint32, _np.uint64, _np.bool_
newaxis, pi, inf, nan = None, _np.pi, _np.inf, _np.nan
dtype = _np.dtype

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")


# --------------------------------------------------------------------------- device memory accounting

def _root(a):
    while isinstance(a.base, _np.ndarray):
        a = a.base
    return a


def _free(key, nbytes):
    _standin.live.pop(key, None)
    counters["live_bytes"] -= nbytes


def _track(a):
    """Count the buffer behind a (once, whatever the number of views) until it is freed."""
    root = _root(a)
    key = id(root)
    if key not in _standin.live:
        _standin.live[key] = root.nbytes
        counters["live_bytes"] += root.nbytes
        counters["peak_bytes"] = _builtins.max(counters["peak_bytes"], counters["live_bytes"])
        counters["allocations"] += 1
        weakref.finalize(root, _free, key, root.nbytes)


class ndarray:
    """A device array: a NumPy array that only CuPy-style operations may touch."""
    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 1000

    def __init__(self, shape, dtype=float, order="C"):
        self._a = _np.empty(shape, dtype=dtype, order=order)
        _track(self._a)

    # ---- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))
    data = property(lambda self: _MemoryPointer(self._a))
    device = property(lambda self: cuda.Device(0))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(r) for r in self._a)

    # ---- no implicit host conversion
    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        impl = _UFUNCS.get(ufunc.__name__)
        if impl is None or method != "__call__":
            return NotImplemented
        return impl(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        impl = _FUNCTIONS.get(func.__name__)
        if impl is None:
            return NotImplemented
        return impl(*args, **kwargs)

    # ---- device -> host (each one a host sync)
    def get(self, stream=None, order="C", out=None):
        _standin.to_host(self._a.nbytes)
        return _np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, _np.ndarray):
            raise TypeError(f"set() takes a numpy.ndarray, got {type(arr).__name__}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set(): shape/dtype {arr.shape}/{arr.dtype} differ from {self.shape}/{self.dtype}")
        _standin.to_device(arr.nbytes)
        self._a[...] = arr

    def item(self):
        _standin.to_host(self._a.itemsize)
        return self._a.item()

    def tolist(self):
        _standin.to_host(self._a.nbytes)
        return self._a.tolist()

    def __float__(self):
        _standin.to_host(self._a.itemsize)
        return float(self._a)

    def __int__(self):
        _standin.to_host(self._a.itemsize)
        return int(self._a)

    def __bool__(self):
        _standin.to_host(self._a.itemsize)
        return bool(self._a)

    def __repr__(self):
        _standin.to_host(self._a.nbytes)
        return "standin." + repr(self._a)

    __str__ = __repr__

    # ---- methods (NumPy's, results on the device)
    def reshape(self, *shape, order="C"):
        return _wrap(self._a.reshape(*shape, order=order))

    def transpose(self, *axes):
        return _wrap(self._a.transpose(*axes))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        r = self._a.astype(dtype, order=order, copy=copy)
        return self if r is self._a else _wrap(r)

    def copy(self, order="C"):
        return _wrap(self._a.copy(order=order))

    def view(self, dtype=None):
        return _wrap(self._a.view() if dtype is None else self._a.view(dtype))

    def fill(self, value):
        self._a.fill(_scalar(value))

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap_key(key)])

    def __setitem__(self, key, value):
        self._a[_unwrap_key(key)] = _unwrap(value)

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        raise TypeError("device arrays are not pickled here; move them to the host with .get() first")

    __hash__ = None


def _method(name):
    def f(self, *args, **kwargs):
        return _wrap(getattr(self._a, name)(*_unwrap(args), **_unwrap(kwargs)))
    f.__name__ = name
    return f


for _name in ("ravel", "flatten", "squeeze", "swapaxes", "sum", "mean", "max", "min", "std", "var", "any",
              "all", "argmax", "argmin", "cumsum", "prod", "dot", "clip", "repeat", "conj", "round"):
    setattr(ndarray, _name, _method(_name))


class _MemoryPointer:
    def __init__(self, a):
        self.ptr = a.ctypes.data


# --------------------------------------------------------------------------- wrapping / unwrapping

def _wrap(r):
    """NumPy results -> device arrays (scalars become 0-d arrays, as CuPy returns)."""
    if isinstance(r, _np.ndarray):
        out = ndarray.__new__(ndarray)
        out._a = r
        _track(r)
        return out
    if isinstance(r, _np.generic):
        return _wrap(_np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(x) for x in r)
    if isinstance(r, list):
        return [_wrap(x) for x in r]
    return r


def _unwrap(x):
    """Device arrays -> their NumPy buffers; a host array here is CuPy's TypeError."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} (a host numpy array given to a device operation: "
                        "move it with cupy.asarray first)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _unwrap_key(key):
    """Indices may be device arrays, ints, slices, or host index arrays/lists (as CuPy accepts)."""
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, tuple):
        return tuple(k._a if isinstance(k, ndarray) else k for k in key)
    return key


def _scalar(v):
    if isinstance(v, _np.ndarray):
        raise TypeError(f"Unsupported type {type(v)}")
    return v._a if isinstance(v, ndarray) else v


# --------------------------------------------------------------------------- ufuncs and functions

def _device_op(name, np_func):
    def f(*args, **kwargs):
        _standin.check_available("nvrtc")
        return _wrap(np_func(*_unwrap(args), **_unwrap(kwargs)))
    f.__name__ = name
    f.__qualname__ = name
    return f


def _blas_op(name, np_func):
    def f(*args, **kwargs):
        _standin.check_available("cublas")
        args, kwargs = _unwrap(args), _unwrap(kwargs)
        if not _standin.compute and name in ("matmul", "tensordot"):
            return _wrap(_product_placeholder(name, *args, **kwargs))
        return _wrap(np_func(*args, **kwargs))
    f.__name__ = name
    return f


def _product_placeholder(name, a, b, axes=2, out=None):
    """The result array of a GEMM, allocated but not computed (allocations-only mode)."""
    dtype = _np.result_type(a, b)
    if name == "tensordot":
        ax_a, ax_b = (axes if isinstance(axes, (tuple, list)) else (list(range(-axes, 0)), list(range(axes))))
        ax_a = [ax_a] if isinstance(ax_a, int) else ax_a
        ax_b = [ax_b] if isinstance(ax_b, int) else ax_b
        keep_a = [d for i, d in enumerate(a.shape) if i not in [x % a.ndim for x in ax_a]]
        keep_b = [d for i, d in enumerate(b.shape) if i not in [x % b.ndim for x in ax_b]]
        shape = tuple(keep_a + keep_b)
    else:
        if a.ndim < 2 or b.ndim < 2:
            return _np.matmul(a, b)                       # vectors: small, computed
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not fit")
        shape = _np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    if out is not None:
        return out
    return _np.zeros(shape, dtype)


_UFUNC_NAMES = ("add subtract multiply divide true_divide floor_divide negative positive power square sqrt exp "
                "expm1 log log1p tanh sin cos abs absolute fabs sign maximum minimum fmax fmin isfinite isnan isinf "
                "rint floor ceil greater greater_equal less less_equal equal not_equal logical_and logical_or "
                "logical_not remainder reciprocal").split()
_UFUNCS = {n: _device_op(n, getattr(_np, n)) for n in _UFUNC_NAMES}
_UFUNCS.update({n: _blas_op(n, getattr(_np, n)) for n in ("matmul",)})
globals().update(_UFUNCS)

_FUNCTION_NAMES = ("concatenate stack where broadcast_to clip repeat sum mean amax amin max min prod cumsum "
                   "reshape transpose ravel squeeze expand_dims moveaxis swapaxes zeros_like ones_like empty_like "
                   "full_like copy einsum outer count_nonzero any all allclose array_equal sort argmax argmin "
                   "linspace tile pad flip diag trace std var round around isclose cov").split()
_FUNCTIONS = {n: _device_op(n, getattr(_np, n)) for n in _FUNCTION_NAMES}
_FUNCTIONS.update({n: _blas_op(n, getattr(_np, n)) for n in ("dot", "vdot", "tensordot", "inner")})
_FUNCTIONS.update(_UFUNCS)
globals().update(_FUNCTIONS)


def _creator(name):
    np_func = getattr(_np, name)

    def f(*args, **kwargs):
        return _wrap(np_func(*args, **kwargs))
    f.__name__ = name
    return f


empty, zeros, ones, full, arange, eye = (_creator(n) for n in ("empty", "zeros", "ones", "full", "arange", "eye"))
_FUNCTIONS.update(empty=empty, zeros=zeros, ones=ones, full=full, arange=arange, eye=eye)


def asarray(a, dtype=None, order=None):
    """Host data (numpy array, list, scalar) is copied to the device; a device array is returned as it is."""
    if isinstance(a, ndarray):
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = _np.array(a, dtype=dtype, order=order or "K", copy=True)
    _standin.to_device(host.nbytes)
    return _wrap(host)


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        return a.astype(dtype or a.dtype, order=order, copy=copy)
    return asarray(a, dtype, order if order in ("C", "F") else None)


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"Unsupported type {type(a)} (cupy.ascontiguousarray takes a device array)")
    r = _np.ascontiguousarray(a._a, dtype=dtype)
    return a if r is a._a else _wrap(r)


def asnumpy(a, stream=None, order="C", out=None):
    if isinstance(a, ndarray):
        return a.get(order=order)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    return __import__(__name__) if _builtins.any(isinstance(a, ndarray) for a in args) else _np


_FUNCTIONS.update(asarray=asarray, array=array, ascontiguousarray=ascontiguousarray)


class _Pool:
    """cupy.get_default_memory_pool(): here used_bytes = live device bytes, total_bytes = peak since free_all_blocks."""

    def __init__(self):
        self._limit = 0

    def used_bytes(self):
        return counters["live_bytes"]

    def total_bytes(self):
        return counters["pool_peak_bytes"] if counters["pool_peak_bytes"] else counters["peak_bytes"]

    def free_bytes(self):
        return self.total_bytes() - self.used_bytes()

    def free_all_blocks(self):
        _standin.reset_peak()

    def set_limit(self, size=None, fraction=None):
        self._limit = size or 0

    def get_limit(self):
        return self._limit


_pool, _pinned_pool = _Pool(), _Pool()


def get_default_memory_pool():
    return _pool


def get_default_pinned_memory_pool():
    return _pinned_pool


class RawModule:
    """cupy.RawModule(code=..., options=...): compiled for the CPU by tests/gpu_emulator."""

    def __init__(self, code=None, options=(), backend="nvrtc", name_expressions=None, path=None, jitify=False):
        _standin.check_available("nvrtc")
        if code is None:
            raise ValueError("the stand-in RawModule takes code=..., not path=")
        self._module = _standin.emulated_module(code, tuple(options) + ("-ftz=true",))   # CuPy appends -ftz=true

    def get_function(self, name):
        return _RawFunction(self._module.get_function(name))


class _RawFunction:
    def __init__(self, fn):
        self._fn = fn
        self.kernel_name = fn.name

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if not isinstance(args, tuple):
            raise TypeError(f"kernel arguments must be a tuple, got {type(args).__name__}")
        host = [i for i, a in enumerate(args) if isinstance(a, _np.ndarray)]
        if host:
            raise TypeError(f"Unsupported type {type(args[host[0]])} (argument {host[0]} of kernel "
                            f"{self.kernel_name} is a host numpy array)")
        counters["launches"] += 1
        counters["launches_by_kernel"][self.kernel_name] = counters["launches_by_kernel"].get(self.kernel_name, 0) + 1
        self._fn(grid, block, tuple(a._a if isinstance(a, ndarray) else a for a in args), shared_mem,
                 execute=_standin.compute)


from . import cuda, random  # noqa: E402  (submodules use the names above)


# --------------------------------------------------------------------------- operators

def _binary(name, reflected=False):
    def f(self, other):
        if isinstance(other, _np.ndarray):
            raise TypeError(f"Unsupported type {type(other)} (a host numpy array mixed with a device array)")
        return _UFUNCS[name](other, self) if reflected else _UFUNCS[name](self, other)
    return f


def _inplace(name):
    def f(self, other):
        _UFUNCS[name](self, other, out=self)
        return self
    return f


for _op, _uf in (("add", "add"), ("sub", "subtract"), ("mul", "multiply"), ("truediv", "true_divide"),
                 ("floordiv", "floor_divide"), ("pow", "power"), ("mod", "remainder"), ("matmul", "matmul")):
    setattr(ndarray, f"__{_op}__", _binary(_uf))
    setattr(ndarray, f"__r{_op}__", _binary(_uf, reflected=True))
    if _op != "matmul":
        setattr(ndarray, f"__i{_op}__", _inplace(_uf))
for _op, _uf in (("lt", "less"), ("le", "less_equal"), ("gt", "greater"), ("ge", "greater_equal"),
                 ("eq", "equal"), ("ne", "not_equal"), ("and", "logical_and"), ("or", "logical_or")):
    setattr(ndarray, f"__{_op}__", _binary(_uf))
ndarray.__neg__ = lambda self: _UFUNCS["negative"](self)
ndarray.__pos__ = lambda self: self
ndarray.__abs__ = lambda self: _UFUNCS["absolute"](self)
ndarray.__invert__ = lambda self: _UFUNCS["logical_not"](self)
