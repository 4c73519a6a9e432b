"""Array backend: NumPy on the CPU, CuPy on an NVIDIA GPU.

All model code is written once against an array module ``xp`` that is either
``numpy`` or ``cupy``. Layer functions never look at a global: they ask the
arrays they were given (``array_module(x)``), the way ``cupy.get_array_module``
does, so the same function serves both devices. The global choice made here is
only used where new arrays are *created* (parameter initialisation, data
batches, noise).

Choosing the device:

* ``select_device("cpu")``  -> numpy
* ``select_device("gpu")``  -> cupy, or a ``BackendError`` that says why not
  (never a silent CPU run)
* ``select_device("auto")`` -> cupy only when a GPU is really usable (CuPy
  imports, a device exists, NVRTC compiles a kernel, the project's kernels
  and cuBLAS run), numpy otherwise - with a warning naming the cause when
  CuPy is installed (a GPU was meant to be used) but something is missing.

The default comes from the environment variable ``TTFM_DEVICE`` (cpu, gpu,
auto), and is ``auto`` when unset.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

DEVICE_CHOICES = ("cpu", "gpu", "auto")


class BackendError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do."""


_cupy_module = None      # the cupy module once it imported and a GPU answered
_cupy_problem = None     # why cupy is not usable (str), once we have tried
_cupy_imported = False   # cupy itself imported (so a GPU was meant to be used)
_gpu_present = False     # ... and it reported a CUDA device (whether or not the rest then worked)
_current_xp = None       # the module chosen by select_device


_CTK_FIX = ("Install CuPy together with its CUDA libraries: `pip install -e .[gpu]` (CUDA 12, installs "
            "cupy-cuda12x[ctk]) or `pip install -e .[gpu13]` (CUDA 13), or a CUDA toolkit matching the driver.")


def _probe_steps(cupy):
    """(what, check, fix) in the order CuPy needs them; each check raises if that part is missing."""
    def driver():
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device found")

    def nvrtc():                       # an elementwise kernel: CuPy compiles it with NVRTC at first use
        if float((cupy.arange(4, dtype=cupy.float32) * 2).sum()) != 12.0:
            raise RuntimeError("a test kernel computed a wrong sum")

    def project_kernels():             # kernels/ema.cu through cupy.RawModule, as training runs it
        from . import cuda
        e, p = cupy.zeros(3, dtype=cupy.float32), cupy.ones(3, dtype=cupy.float32)
        cuda.launch_1d(cuda.get_kernel("ema", "ema_update", e.dtype), 3,
                       (e, p, np.int64(3), np.float32(0.5), np.float32(0.5)))
        if float(e.sum()) != 1.5:
            raise RuntimeError("the EMA kernel computed a wrong result")

    def cublas():
        a = cupy.ones((2, 2), dtype=cupy.float32)
        if float((a @ a).sum()) != 8.0:
            raise RuntimeError("a 2x2 matrix product was wrong")

    return (("the GPU (CUDA driver)", driver,
             "Check `nvidia-smi` and the NVIDIA driver, or run with --device cpu."),
            ("NVRTC, CUDA's runtime compiler (CuPy compiles every kernel with it)", nvrtc, _CTK_FIX),
            ("this project's CUDA kernels (ttfm_np/kernels/*.cu via cupy.RawModule)", project_kernels,
             "The compiler log above names the line; " + _CTK_FIX),
            ("cuBLAS (every matrix product)", cublas, _CTK_FIX))


def _probe_cupy():
    """Import cupy and check, one by one, what the library needs of it; remember the outcome.

    Each step names its own cause: a missing NVRTC or cuBLAS (CuPy installed without its
    [ctk] libraries, with only the NVIDIA driver present) is not blamed on the driver.
    """
    global _cupy_module, _cupy_problem, _cupy_imported, _gpu_present
    if _cupy_module is not None or _cupy_problem is not None:
        return _cupy_module
    try:
        import cupy  # noqa: WPS433 (optional dependency)
    except Exception as exc:  # ImportError, or a broken CUDA install
        _cupy_problem = (f"CuPy is not importable ({exc.__class__.__name__}: {exc}). "
                         "Install it with `pip install -e .[gpu]` (CUDA 12) or "
                         "`pip install -e .[gpu13]` (CUDA 13).")
        return None
    _cupy_imported = True
    steps = _probe_steps(cupy)
    for what, check, fix in steps:
        try:
            check()
        except Exception as exc:
            _cupy_problem = (f"CuPy imported, but {what} is not usable ({exc.__class__.__name__}: {exc}). {fix}")
            return None
        if check is steps[0][1]:
            _gpu_present = True        # the driver answered with a device: what fails after this is a defect
    _cupy_module = cupy
    return cupy


def gpu_available() -> bool:
    """True when CuPy imports and a CUDA device really runs a kernel."""
    return _probe_cupy() is not None


def gpu_problem() -> str | None:
    """Why the GPU cannot be used (None when it can). Used in skip reasons."""
    _probe_cupy()
    return _cupy_problem


def gpu_broken() -> str | None:
    """Why a GPU that IS present cannot be used: CuPy imported and a CUDA device answered, but a
    later step (NVRTC, the project's kernels, cuBLAS) failed. None when the GPU works, and None
    when there is no GPU or no CuPy at all (nothing is broken then, it is just absent).

    tests/conftest.py fails every `gpu` test on such a machine instead of skipping it: a broken
    kernel file must not look like a machine without a GPU.
    """
    _probe_cupy()
    return _cupy_problem if (_gpu_present and _cupy_module is None) else None


def select_device(name: str | None = None):
    """Choose numpy or cupy for newly created arrays and return the module.

    name: "cpu", "gpu" or "auto"; None reads $TTFM_DEVICE (default "auto").
    """
    global _current_xp
    if name is None:
        name = os.environ.get("TTFM_DEVICE", "auto")
    name = name.strip().lower()
    if name not in DEVICE_CHOICES:
        raise BackendError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)} "
                           "(flag --device or environment variable TTFM_DEVICE)")
    if name == "cpu":
        tune_cpu_allocator()
        _current_xp = np
    elif name == "gpu":
        cupy = _probe_cupy()
        if cupy is None:
            raise BackendError(f"--device gpu was requested but {_cupy_problem}")
        _current_xp = cupy
    else:
        cupy = _probe_cupy()
        _current_xp = cupy if cupy is not None else np
        if _current_xp is np:
            if _cupy_imported:         # CuPy is installed, so a GPU was expected: say why it is not used
                warnings.warn(f"--device auto runs on the CPU: {_cupy_problem}", RuntimeWarning, stacklevel=2)
            tune_cpu_allocator()
    return _current_xp


def get_xp():
    """The module chosen by select_device (selected from $TTFM_DEVICE on first use)."""
    if _current_xp is None:
        return select_device(None)
    return _current_xp


def device_name(xp=None) -> str:
    xp = get_xp() if xp is None else xp
    return "gpu" if is_cupy(xp) else "cpu"


def is_cupy(xp) -> bool:
    return xp is not np and getattr(xp, "__name__", "") == "cupy"


def array_module(*arrays):
    """numpy or cupy, decided by the arrays themselves (like cupy.get_array_module)."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            return _probe_cupy() or __import__("cupy")
    return np


def to_numpy(a):
    """A NumPy copy (or view) of a numpy/cupy array or a Python scalar."""
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def to_device(a, xp):
    """Move an array to the device of module xp (no copy when already there)."""
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)



_allocator_tuned = False


def tune_cpu_allocator():
    """Keep freed large arrays in the process heap instead of returning them to the OS.

    glibc serves allocations above 128 KiB-32 MiB with mmap and gives them back
    on free, so every training step page-faults its ~1 GB of activations in
    again; measured here on the `small` U-Net step this costs ~45% of the
    forward time. Raising the mmap and trim thresholds (mallopt) makes freed
    blocks reusable. Linux/glibc only; elsewhere a no-op.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 31)
    except (OSError, AttributeError):
        pass


def _proc_status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def reset_peak_resident_memory() -> int:
    """Reset this process's peak resident set size (VmHWM) to the current one and return that (bytes).

    Writing 5 to /proc/self/clear_refs does it (Linux; elsewhere nothing is reset), so
    peak_resident_memory() afterwards sees only what follows: how benchmarks measure a step's memory.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _proc_status_kib("VmRSS") * 1024


def peak_resident_memory() -> int:
    """This process's peak resident set size (VmHWM, bytes) since it started or the last reset; 0 without /proc."""
    return _proc_status_kib("VmHWM") * 1024
