"""Run the project's CUDA kernels (ttfm_np/kernels/*.cu) on the CPU, for tests.

    mod = EmulatedModule(source, options=("-DSCALAR=float", "-ftz=true"))
    f = mod.get_function("adam_update")
    f((grid,), (block,), (p, g, m, v, np.int64(n), np.float32(0.1), ...))   # numpy arrays as device buffers

How: the source is compiled by the host g++ with cuda_emu.h in front (CUDA's
keywords, threadIdx/blockIdx, __syncthreads as a real barrier between
coroutine threads, the math intrinsics), plus one generated launcher per
`extern "C" __global__` kernel, into a shared library loaded with ctypes.
Every pointer type `T*` of the source is rewritten to emu::ptr<T>, a pointer
that knows its buffer's extent, so an out-of-bounds index is an error
instead of a silent read. Libraries are cached by a hash of everything that
goes into them (in $TTFM_EMU_BUILD_DIR, default <tmp>/ttfm_gpu_emulator-<uid>).

Checks made at every launch, before anything runs (a real GPU checks none of
the argument ones: a wrong dtype or a strided array is silently misread):
  * the argument count, every pointer argument a C-contiguous array of the
    kernel's element type (SCALAR resolved from -DSCALAR), writable unless const;
  * every scalar argument of exactly the C type (np.int32 for int, np.int64 for
    long long, np.float32/np.float64 for float/double/SCALAR): a Python int or
    float is refused, because CuPy would pass it as a 64-bit value;
  * launch limits: <= 1024 threads per block (z <= 64), grid y/z <= 65535,
    static + dynamic shared memory <= 48 KiB.
Floating point, like NVRTC as CuPy calls it: a*b+c is contracted into an FMA
(-ffp-contract=fast with -mfma) unless the option --fmad=false is given, and
float kernels run with subnormals flushed to zero when -ftz=true (CuPy always
appends -ftz=true). exp/sqrt are glibc's, not CUDA's (a few ulp apart).

Not emulated (no kernel here uses them; add them to cuda_emu.h when one does):
dynamic `extern __shared__` memory, warp intrinsics (__shfl*, __ballot*,
__syncwarp), cooperative groups, textures, streams. x86-64 Linux only (the
coroutine switch is 10 lines of x86-64 assembly).

Thread order: `thread_order("reverse")` / `thread_order("shuffle", seed)` (or
$TTFM_EMU_ORDER) visits threads and blocks in another order; a kernel whose
results change with the order has a race.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "cuda_emu.h")

MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2 ** 31 - 1, 65535, 65535)
MAX_SHARED_BYTES = 48 * 1024

C_TYPES = {"float": np.float32, "double": np.float64, "int": np.int32, "long long": np.int64,
           "unsigned int": np.uint32, "unsigned long long": np.uint64, "bool": np.bool_,
           "long": np.int64, "unsigned char": np.uint8}
_ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}
_order = [os.environ.get("TTFM_EMU_ORDER", "forward"), 0]

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')
_BASE = r"(?:unsigned\s+long\s+long|long\s+long|unsigned\s+int|unsigned\s+char|SCALAR|float|double|int|long|bool)"
_POINTER = re.compile(r"\b(const\s+)?(" + _BASE + r")\s*\*\s*(?:__restrict__\s*)?")


class EmulatorError(RuntimeError):
    """A kernel did something a GPU would not survive (out-of-bounds index, divergent barrier)."""


@contextlib.contextmanager
def thread_order(order: str, seed: int = 0):
    """Visit threads and blocks forward, reversed or shuffled inside the block."""
    if order not in _ORDERS:
        raise ValueError(f"thread order must be one of {', '.join(_ORDERS)}, not {order!r}")
    saved = list(_order)
    _order[:] = [order, seed]
    try:
        yield
    finally:
        _order[:] = saved


class Param:
    def __init__(self, text: str):
        text = re.sub(r"\s+", " ", text.replace("__restrict__", "")).strip()
        m = re.match(r"^(const )?(" + _BASE + r")\s*(\*)?\s*(\w+)$", text)
        if not m:
            raise ValueError(f"the emulator does not know the kernel parameter type of {text!r}")
        self.const, self.ctype, self.is_pointer, self.name = bool(m.group(1)), m.group(2), bool(m.group(3)), m.group(4)

    def c_decl(self):
        return ("const " if self.const else "") + self.ctype


def parse_kernels(source: str) -> dict:
    """{kernel name: [Param]} of every extern "C" __global__ kernel."""
    return {name: [Param(p) for p in params.split(",") if p.strip()] for name, params in _KERNEL.findall(source)}


def _parse_options(options):
    macros, fmad, ftz = {}, True, False
    for opt in options:
        if opt.startswith("-D"):
            k, _, v = opt[2:].partition("=")
            macros[k] = v or "1"
        elif opt in ("--fmad=false", "-fmad=false"):
            fmad = False
        elif opt in ("--fmad=true", "-fmad=true"):
            fmad = True
        elif opt in ("-ftz=true", "--ftz=true"):
            ftz = True
        elif opt in ("-ftz=false", "--ftz=false"):
            ftz = False
        elif opt.startswith(("-std=", "--std=", "-arch", "--gpu-architecture")):
            pass
        elif opt in ("--prec-div=true", "-prec-div=true", "--prec-sqrt=true", "-prec-sqrt=true"):
            pass                     # IEEE division and sqrt: what the host compiler does anyway
        elif opt.startswith(("--prec-", "-prec-", "--use_fast_math", "-use_fast_math")):
            raise ValueError(f"the emulator does not emulate {opt!r} (approximate division/sqrt); "
                             "the project compiles with --prec-div=true --prec-sqrt=true (ttfm_np/cuda.py)")
        else:
            raise ValueError(f"the emulator does not know the compile option {opt!r}")
    return macros, fmad, ftz


def _cpu_has_fma():
    try:
        with open("/proc/cpuinfo") as f:
            return " fma " in f.read().replace("\n", " ")
    except OSError:
        return False


def build_dir():
    d = os.environ.get("TTFM_EMU_BUILD_DIR") or os.path.join(tempfile.gettempdir(), f"ttfm_gpu_emulator-{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    return d


def _wrapper(source, kernels, coroutines):
    rewritten = _POINTER.sub(lambda m: f"emu::ptr<{m.group(1) or ''}{m.group(2)}> ", source)
    out = [f'#include "{HEADER}"', "#line 1 \"kernel.cu\"", rewritten, ""]
    for name, params in kernels.items():
        args = []
        for i, p in enumerate(params):
            if p.is_pointer:
                args.append(f'emu::ptr<{p.c_decl()}>(({p.c_decl()}*)args[{i}], sizes[{i}], "{p.name}")')
            else:
                args.append(f"*({p.c_decl()}*)args[{i}]")
        out.append(f'extern "C" int emu_launch_{name}(const long long* cfg, void** args, const long long* sizes) {{\n'
                   f"    std::function<void()> body = [&]() {{ {name}({', '.join(args)}); }};\n"
                   f"    return emu::launch(cfg, {'true' if coroutines else 'false'}, body);\n}}")
    return "\n".join(out) + "\n"


def _compile(code: str, flags: list) -> str:
    """Shared library of `code` (C++), cached by the hash of code, header, flags and compiler."""
    with open(HEADER) as f:
        header = f.read()
    version = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([code, header, " ".join(flags), version]).encode()).hexdigest()[:24]
    lib = os.path.join(build_dir(), f"kernel-{key}.so")
    if os.path.exists(lib):
        return lib
    src = lib[:-3] + f".{os.getpid()}.cpp"
    with open(src, "w") as f:
        f.write(code)
    tmp = lib + f".{os.getpid()}.tmp"
    cmd = ["g++", "-std=c++17", "-O2", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-fno-strict-aliasing",
           "-Wno-unused-function", *flags, src, "-o", tmp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"the emulator could not compile the kernel source:\n{' '.join(cmd)}\n{res.stderr}")
    os.replace(tmp, lib)                                       # atomic: concurrent test runs see a whole file
    os.remove(src)
    return lib


class EmulatedModule:
    """Stands in for cupy.RawModule: compiles `code` with `options` for the CPU."""

    def __init__(self, code: str, options=()):
        self.code, self.options = code, tuple(options)
        macros, self.fmad, ftz = _parse_options(self.options)
        scalar = macros.get("SCALAR", "float")
        if scalar not in ("float", "double"):
            raise ValueError(f"-DSCALAR={scalar}: the kernels are written for float or double")
        self.scalar_dtype = np.dtype(C_TYPES[scalar])
        self.ftz = ftz and scalar == "float"                 # CUDA's -ftz touches float32 arithmetic only
        self.kernels = parse_kernels(code)
        self.coroutines = "__syncthreads" in code
        flags = [f"-D{k}={v}" for k, v in macros.items()]
        flags += ["-mfma", "-ffp-contract=fast"] if (self.fmad and _cpu_has_fma()) else ["-ffp-contract=off"]
        self.lib = ctypes.CDLL(_compile(_wrapper(code, self.kernels, self.coroutines), flags))
        self.lib.emu_error_message.restype = ctypes.c_char_p
        self.lib.emu_static_shared_bytes.restype = ctypes.c_longlong
        self.static_shared = int(self.lib.emu_static_shared_bytes())    # every __shared__ array of the file

    def get_function(self, name: str):
        if name not in self.kernels:
            raise AttributeError(f"no extern \"C\" __global__ kernel {name!r} in the module "
                                 f"(it has {', '.join(self.kernels) or 'none'})")
        return EmulatedFunction(self, name)


def _dims(what, dims, limits):
    if isinstance(dims, (int, np.integer)):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not 1 <= len(dims) <= 3 \
            or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise ValueError(f"{what} must be a tuple of 1 to 3 ints, got {dims!r}")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    for d, lim, axis in zip(dims, limits, "xyz"):
        if not 1 <= d <= lim:
            raise ValueError(f"{what}.{axis} = {d} is outside the CUDA limit 1..{lim} "
                             "(a zero-size launch is an error too: skip the launch instead)")
    return dims


class EmulatedFunction:
    """Stands in for a cupy RawFunction: f(grid, block, args, shared_mem=0)."""

    def __init__(self, module: EmulatedModule, name: str):
        self.module, self.name, self.params = module, name, module.kernels[name]
        self._fn = getattr(module.lib, f"emu_launch_{name}")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]

    def _dtype(self, ctype):
        return self.module.scalar_dtype if ctype == "SCALAR" else np.dtype(C_TYPES[re.sub(r"\s+", " ", ctype)])

    def __call__(self, grid, block, args, shared_mem: int = 0, execute: bool = True):
        """Check the launch, then run it (execute=False: check only)."""
        where = f"kernel {self.name}"
        gx = _dims(f"{where}: grid", grid, MAX_GRID)
        bx = _dims(f"{where}: block", block, MAX_BLOCK)
        if bx[0] * bx[1] * bx[2] > MAX_THREADS_PER_BLOCK:
            raise ValueError(f"{where}: {bx[0] * bx[1] * bx[2]} threads per block, the limit is {MAX_THREADS_PER_BLOCK}")
        if shared_mem < 0 or shared_mem + self.module.static_shared > MAX_SHARED_BYTES:
            raise ValueError(f"{where}: {self.module.static_shared} B static + {shared_mem} B dynamic shared "
                             f"memory exceeds {MAX_SHARED_BYTES} B per block")
        if not isinstance(args, tuple):
            raise TypeError(f"{where}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.params):
            raise TypeError(f"{where}: {len(args)} arguments for {len(self.params)} parameters "
                            f"({', '.join(p.name for p in self.params)})")
        ptrs, sizes, keep = [], [], []
        for p, a in zip(self.params, args):
            want = self._dtype(p.ctype)
            if p.is_pointer:
                if not isinstance(a, np.ndarray):
                    raise TypeError(f"{where}: parameter {p.name} ({p.c_decl()}*) needs a device array, "
                                    f"got {type(a).__name__}")
                if a.dtype != want:
                    raise TypeError(f"{where}: parameter {p.name} is {p.c_decl()}* ({want}) but the array is {a.dtype}; "
                                    f"cast it first (.astype({want.name}))")
                if not a.flags.c_contiguous:
                    raise ValueError(f"{where}: parameter {p.name} gets a non-contiguous array (shape {a.shape}, "
                                     "strides {a.strides}); the kernel reads it as dense: pass ascontiguousarray(...)")
                if not p.const and not a.flags.writeable:
                    raise ValueError(f"{where}: parameter {p.name} is written but the array is read-only")
                ptrs.append(a.ctypes.data if a.size else None)
                sizes.append(a.size)
            else:
                if type(a) is not want.type:
                    raise TypeError(f"{where}: parameter {p.name} is {p.ctype} ({want}); pass {want.type.__name__}(...), "
                                    f"not {type(a).__name__} (CuPy would pass a Python scalar as a 64-bit value)")
                buf = np.array([a], dtype=want)
                keep.append(buf)
                ptrs.append(buf.ctypes.data)
                sizes.append(1)
        if not execute:
            return
        order, seed = _order
        if order not in _ORDERS:
            raise ValueError(f"TTFM_EMU_ORDER must be one of {', '.join(_ORDERS)}, not {order!r}")
        cfg = np.array([*gx, *bx, _ORDERS[order], seed, int(self.module.ftz)], dtype=np.int64)
        argv = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        size_arr = np.array(sizes or [0], dtype=np.int64)
        code = self._fn(cfg.ctypes.data, ctypes.cast(argv, ctypes.c_void_p), size_arr.ctypes.data)
        if code:
            raise EmulatorError(f"{where}: {self.module.lib.emu_error_message().decode()}")
