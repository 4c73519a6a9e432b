"""A U-Net's blocks of samples on worker processes instead of worker threads.

model.py runs a U-Net's forward and backward on the CPU per block of samples, one block per worker
(model._sample_blocks; every layer works per sample, so the blocks' outputs are the batch's and the
parameter gradients are the blocks' sums). With threads (parallel.run_blocks, the default) every
NumPy call of one worker takes Python's GIL back after its loop, and the other worker may hold it:
measured on a 2-core AMD EPYC Zen 4 (2026-12-06), a 36 KB add takes 1.3 us alone and 3.1-3.4 us while
a second thread does the same, and the small U-Net's step (batch 32) on two worker threads took
1.88-2.04 s where two processes, each running a batch of 16 at the same time, took 1.73-1.89 s. On a
busy host a worker descheduled while it holds the GIL also stalls the other one. Processes share no GIL.

On by default on POSIX systems; set_enabled(False), or the environment variable TTFM_BLOCK_PROCESSES=0
(read at import), goes back to threads. Only U-Nets on NumPy with two or more workers use it (the
MLP's blocks are too short for the transfers; CuPy arrays are never split). Measured, the small U-Net
step (batch 32, 2 workers, forward + backward, alternated in one process): threads 2.19 s, processes
1.86 s (medians of 5 rounds, 2-core AMD EPYC Zen 4, 2026-12-06); the children cost ~45 MB each at rest.

How a call runs (block 0 stays in this process, block i >= 1 goes to child process i - 1):
  * the children are started once (`python -c` over a socket pair, see _Child) and kept; a child
    that died between calls is started again; they ignore SIGINT (Ctrl-C is this process's to handle);
  * the parameters travel through shared memory: copied at every forward into one buffer per
    parameter layout (names, shapes, dtypes): a memcpy, ~4 ms for the small U-Net's 25 MB; a forward
    that keeps a cache copies them out again in the child, so that its cache never sees a later
    call's parameters;
  * a child keeps its block's cache under a token; the backward sends du's rows and the token, the
    child writes its block's parameter gradients into the same shared buffer and returns dx's rows;
    the gradients are added in block order, the same sum as the threads';
  * a cache dropped without a backward is dropped in the child too: a finalizer queues its token and
    the next message carries it;
  * the child runs this process's OpenBLAS kernel set (OPENBLAS_CORETYPE), and every message carries
    this process's switches (precision mode, 3x3 algorithm, chunk sizes, sigmoid form), which the
    child applies first: it computes as this process would (bit for bit, measured);
  * an error in a child comes back as BlockProcessError with the child's traceback.
"""
from __future__ import annotations

import atexit
import collections
import itertools
import mmap
import os
import signal
import socket
import subprocess
import sys
import traceback
import weakref
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Connection
from typing import NamedTuple

import numpy as np

from . import activations, backend, blas, conv, parallel, precision, winograd

ENV = "TTFM_BLOCK_PROCESSES"
_enabled = os.name == "posix" and os.environ.get(ENV, "1") not in ("", "0")   # pass_fds: POSIX only
_children: list = []                          # _Child per extra block, started on first use
_buffers: dict = {}                           # parameter layout -> _SharedParams
_tokens = itertools.count(1)
_pending_drops: collections.deque = collections.deque()   # (child index, token) of caches dropped unused


class BlockProcessError(RuntimeError):
    """A block worker process failed (its traceback is in the message) or exited."""


def set_enabled(on: bool) -> bool:
    """Run U-Net blocks on worker processes (True) or threads (False); returns the previous setting."""
    global _enabled
    if on and os.name != "posix":
        raise OSError("block worker processes need a POSIX system (they inherit a socket by pass_fds)")
    previous, _enabled = _enabled, bool(on)
    return previous


def enabled() -> bool:
    return _enabled


def applies(cfg) -> bool:
    """Whether a model of cfg runs its blocks of samples here (U-Nets; an MLP's blocks are too short
    for the transfers). model._sample_blocks decides whether there are blocks at all."""
    return _enabled and getattr(cfg, "kind", "mlp") != "mlp"


# A child at rest (interpreter, NumPy, ttfm_np): 41-45 MB measured (VmHWM after a tiny U-Net pass); with slack.
CHILD_BASE_BYTES = 64 * 2**20


def memory_overhead(cfg, param_bytes: int, workers: int, on_numpy: bool = True) -> int:
    """Bytes the worker processes add to a U-Net run with `workers` blocks (0 where none run): per child
    its interpreter and its private copy of the parameters, plus the shared buffer of parameters and
    gradients. The activations are the same as with threads, only divided among the processes."""
    if not (applies(cfg) and on_numpy and workers > 1):
        return 0
    return (workers - 1) * (CHILD_BASE_BYTES + 2 * param_bytes) + 2 * param_bytes


# ----------------------------------------------------------------------------- shared parameters

class _SharedParams:
    """One shared-memory buffer per parameter layout: the parameters, then as many bytes for their gradients."""

    def __init__(self, layout):
        self.layout = layout                                  # ((name, shape, dtype str), ...)
        self.shm = shared_memory.SharedMemory(create=True, size=max(1, 2 * _nbytes(layout)))
        self.params, self.grads = _views(self.shm, layout)

    def close(self):
        self.shm.close()
        self.shm.unlink()


def _nbytes(layout) -> int:
    return sum(int(np.prod(shape)) * np.dtype(dt).itemsize for _, shape, dt in layout)


def _views(shm, layout):
    """({name: parameter view}, {name: gradient view}) into a buffer laid out as _SharedParams
    (shm: a SharedMemory or an mmap)."""
    buffer = shm.buf if isinstance(shm, shared_memory.SharedMemory) else shm
    params, grads, offset, total = {}, {}, 0, _nbytes(layout)
    for name, shape, dt in layout:
        params[name] = np.ndarray(shape, dtype=dt, buffer=buffer, offset=offset)
        grads[name] = np.ndarray(shape, dtype=dt, buffer=buffer, offset=total + offset)
        offset += int(np.prod(shape)) * np.dtype(dt).itemsize
    return params, grads


def _layout(params) -> tuple:
    return tuple((name, tuple(a.shape), a.dtype.str) for name, a in params.items())


def _shared_params(params) -> _SharedParams:
    """The shared buffer for params' layout, holding a copy of params' current values."""
    layout = _layout(params)
    buf = _buffers.get(layout)
    if buf is None:
        buf = _buffers[layout] = _SharedParams(layout)
    for name, a in params.items():
        buf.params[name][...] = a
    return buf


# ----------------------------------------------------------------------------- children

class _Child:
    """A worker process: `python -c` running _serve_fd on one end of a socket pair (not multiprocessing's
    spawn, which would run the caller's main script again in the child: scripts without an
    `if __name__ == "__main__"` guard would start processes recursively)."""

    def __init__(self):
        parent_sock, child_sock = socket.socketpair()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        kernels = blas.kernel_set()          # the child's OpenBLAS runs this process's kernels (blas.py: the choice
        if kernels != "unknown":             # is made once, at load, and depends on whether numpy came first)
            env[blas.CORETYPE_ENV] = kernels
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", f"from ttfm_np.block_processes import _serve_fd; _serve_fd({child_sock.fileno()})"],
                pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            parent_sock.close()
            raise BlockProcessError(f"could not start a block worker process ({sys.executable!r}: {exc}); "
                                    f"{ENV}=0 runs a U-Net's blocks on threads instead") from exc
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.pending = 0                     # replies not read yet (a call interrupted by Ctrl-C leaves one)

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, message):
        try:
            self.conn.send(message)
        except (BrokenPipeError, EOFError, OSError) as exc:
            raise BlockProcessError(f"a block worker process (pid {self.process.pid}) exited: {exc}") from exc
        self.pending += 1

    def discard_stale_replies(self):
        """Read and drop the replies of calls that were interrupted before they read them."""
        while self.pending:
            try:
                self.receive()
            except BlockProcessError:
                pass

    def receive(self):
        try:
            status, payload = self.conn.recv()
            self.pending -= 1
        except (EOFError, OSError) as exc:
            raise BlockProcessError(f"a block worker process (pid {self.process.pid}) exited during a call "
                                    f"(exit code {self.process.poll()}; its error, if any, is on stderr above); it is "
                                    f"started again at the next call, and {ENV}=0 runs the blocks on threads") from exc
        if status == "error":
            raise BlockProcessError(f"a block worker process failed:\n{payload}")
        return payload

    def stop(self):
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, EOFError, OSError):
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()


def _ensure_children(n: int) -> list:
    """n live children (a child that died between calls is replaced), none with a reply left unread."""
    for i, child in enumerate(_children):
        if not child.alive():
            child.conn.close()
            child.process.wait()
            _children[i] = _Child()
        else:
            child.discard_stale_replies()
    while len(_children) < n:
        _children.append(_Child())
    return _children[:n]


def shutdown():
    """Stop the children and free the shared buffers (also run at exit)."""
    while _children:
        _children.pop().stop()
    while _buffers:
        _buffers.popitem()[1].close()
    _pending_drops.clear()


def _forget_in_forked_child():
    """A fork()ed process does not own its parent's children and buffers: forget them, unstopped."""
    _children.clear()
    _buffers.clear()
    _pending_drops.clear()


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_forked_child)


def _drops_for(index: int) -> list:
    """Tokens of caches dropped unused that child `index` holds (the rest stay queued)."""
    mine, keep = [], []
    while True:
        try:
            i, token = _pending_drops.popleft()
        except IndexError:
            break
        (mine if i == index else keep).append((i, token))
    _pending_drops.extend(keep)
    return [token for _, token in mine]


def _ask_all(kind: str) -> list:
    """Send a message without payload to every live child; their replies, in child order."""
    out = []
    for i, child in enumerate(_children):
        if child.alive():
            child.discard_stale_replies()
            child.send((kind, _drops_for(i)))
            out.append(child.receive())
    return out


def status() -> list:
    """Per live child: {"pid", "caches" (held), "peak_rss" (bytes, VmHWM), "settings" (_settings as
    last applied), "kernels" (its OpenBLAS kernel set)}; benchmarks add the children's memory."""
    return _ask_all("status")


def reset_peak_rss():
    """Reset each child's peak resident set size (as benchmarks/unet_step.py does for this process)."""
    _ask_all("reset_rss")


# ----------------------------------------------------------------------------- forward / backward

def _settings() -> dict:
    """This process's switches that change what a block computes; every message carries them, so that
    the children compute as this process does (e.g. --precision tf32, --conv3x3 im2col)."""
    return {"precision": precision.get_mode(), "conv3x3": conv.CONV3X3,
            "winograd_min_pixels": conv.WINOGRAD_MIN_PIXELS, "conv_chunk_bytes": conv._CHUNK_BYTES,
            "winograd_chunk_bytes": winograd.CHUNK_BYTES, "winograd_cache_v": winograd.CACHE_V,
            "sigmoid_form": activations.SIGMOID_FORM}


def _apply_settings(settings: dict):
    precision.set_mode(settings["precision"])
    conv.set_conv3x3_algorithm(settings["conv3x3"])
    conv.WINOGRAD_MIN_PIXELS = settings["winograd_min_pixels"]
    conv._CHUNK_BYTES = settings["conv_chunk_bytes"]
    winograd.CHUNK_BYTES = settings["winograd_chunk_bytes"]
    winograd.CACHE_V = settings["winograd_cache_v"]
    activations.SIGMOID_FORM = settings["sigmoid_form"]


class BlockCache(NamedTuple):
    """What model_forward keeps when the blocks ran on processes: block 0's cache here, the token
    under which each child keeps its block's cache, and the object whose finalizer frees them."""
    blocks: list
    local: object
    token: int
    guard: object


class _Guard:
    """Lives as long as the BlockCache; when collected, the children's caches are queued for dropping."""


def forward(family_forward, params, cfg, x, s, t, dropout_seed, need_grad, blocks):
    """The U-Net forward on blocks of samples: block 0 here (family_forward), the others on the children.
    -> (u, BlockCache or None)."""
    children = _ensure_children(len(blocks) - 1)
    shared = _shared_params(params)
    token, settings = next(_tokens), _settings()
    for i, (child, (lo, hi)) in enumerate(zip(children, blocks[1:])):
        child.send(("forward", _drops_for(i), settings, token, family_forward, shared.shm.name, shared.layout, cfg,
                    x[lo:hi], parallel.rows(s, lo, hi), parallel.rows(t, lo, hi), dropout_seed, need_grad))
    lo, hi = blocks[0]
    try:
        with parallel.one_blas_thread():
            u0, cache0 = family_forward(params, cfg, x[lo:hi], parallel.rows(s, lo, hi), parallel.rows(t, lo, hi),
                                        dropout_seed, need_grad)
    except BaseException:
        _drain(children)                        # the children's replies are read (protocol in step), this error raised
        raise
    parts = _receive_all(children)
    u = np.concatenate([u0] + parts)
    if not need_grad:
        return u, None
    guard = _Guard()
    for i in range(len(children)):
        weakref.finalize(guard, _pending_drops.append, (i, token))
    return u, BlockCache(list(blocks), cache0, token, guard)


def backward(family_backward, du, cache: BlockCache):
    """-> dx (like x), grads: block 0's backward here, the others' in the children; gradients added in block order."""
    n = len(cache.blocks) - 1
    for child in _children[:n]:
        if child.alive():
            child.discard_stale_replies()
    if len(_children) < n or not all(child.alive() for child in _children[:n]):
        _ensure_children(n)                     # replaced for the next forward; this cache died with the child
        raise BlockProcessError("a block worker process exited after this forward, and its block's cache with "
                                "it: run the forward again (the worker is started again)")
    children, settings = _children[:n], _settings()
    for i, (child, (lo, hi)) in enumerate(zip(children, cache.blocks[1:])):
        child.send(("backward", _drops_for(i), settings, cache.token, family_backward, du[lo:hi]))
    lo, hi = cache.blocks[0]
    try:
        with parallel.one_blas_thread():
            dx0, grads0 = family_backward(du[lo:hi], cache.local)
    except BaseException:
        _drain(children)
        raise
    parts = _receive_all(children)
    # the children's gradients from the shared buffer (add_dicts makes new arrays: the buffer is reused)
    grads = parallel.add_dicts([grads0] + [{**_buffers[layout].grads, **other} for _, layout, other in parts])
    return np.concatenate([dx0] + [p[0] for p in parts]), grads


def _drain(children):
    """Read every child's reply after this process's own block failed; their errors are dropped (this one is raised)."""
    for child in children:
        try:
            child.receive()
        except BlockProcessError:
            pass


def _receive_all(children) -> list:
    """Every child's reply, in block order; the first error is raised after all replies are read."""
    out, first_error = [], None
    for child in children:
        try:
            out.append(child.receive())
        except BlockProcessError as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return out


# ----------------------------------------------------------------------------- the child's loop

def _serve_fd(fd: int):
    """The child's entry point (see _Child): serve the parent on the connection at file descriptor fd."""
    _serve(Connection(fd))


def _attach(name: str, nbytes: int):
    """The parent's shared buffer `name` as a writable buffer. Linux: mapped from /dev/shm directly, so
    this process starts no resource tracker of its own (one would unlink the parent's buffer at exit)."""
    path = os.path.join("/dev/shm", name.lstrip("/"))
    if os.path.exists(path):
        fd = os.open(path, os.O_RDWR)
        try:
            return mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
    shm = shared_memory.SharedMemory(name=name)
    resource_tracker.unregister(shm._name, "shared_memory")   # the parent created it and unlinks it
    return shm


def _serve(conn):
    """A child: run forward/backward messages on its block until "stop" (or the parent is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # Ctrl-C is the parent's to handle
    backend.select_device("cpu")
    blas.set_threads(1)
    attached: dict = {}                                   # shared-memory name -> (shm, params views, grads views)
    caches: dict = {}                                     # token -> (cache, shared buffer name, layout)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):                       # the parent is gone
            return
        kind = message[0]
        if kind == "stop":
            return
        for token in message[1]:                          # caches the parent dropped unused
            caches.pop(token, None)
        try:
            if kind == "forward":
                # the network's forward arrives as a function reference (pickled by name, e.g. unet.unet_forward)
                _, _, settings, token, family_forward, shm_name, layout, cfg, x, s, t, dropout_seed, need_grad = message
                _apply_settings(settings)
                if shm_name not in attached:
                    shm = _attach(shm_name, 2 * _nbytes(layout))
                    attached[shm_name] = (shm, *_views(shm, layout))
                _, shared, _ = attached[shm_name]
                # a kept cache holds the parameters it was made with: private copies (a later call may overwrite
                # the buffer); without one, nothing outlives this call and the shared views do
                params = {k: v.copy() for k, v in shared.items()} if need_grad else shared
                u, cache = family_forward(params, cfg, x, s, t, dropout_seed, need_grad)
                if need_grad:
                    caches[token] = (cache, shm_name, layout)
                conn.send(("ok", u))
            elif kind == "backward":
                _, _, settings, token, family_backward, du = message
                _apply_settings(settings)
                if token not in caches:
                    raise KeyError(f"no cache for token {token}: its forward ran with need_grad=False, "
                                   "or its backward already ran")
                cache, shm_name, layout = caches.pop(token)
                dx, grads = family_backward(du, cache)
                _, _, grad_views = attached[shm_name]
                other = {}                                # a gradient of another dtype than its parameter's
                for k, g in grads.items():
                    if g.dtype == grad_views[k].dtype and g.shape == grad_views[k].shape:
                        grad_views[k][...] = g
                    else:
                        other[k] = g
                conn.send(("ok", (dx, layout, other)))
            elif kind == "status":
                conn.send(("ok", {"pid": os.getpid(), "caches": len(caches), "peak_rss": backend.peak_resident_memory(),
                                  "settings": _settings(), "kernels": blas.kernel_set()}))
            elif kind == "reset_rss":
                backend.reset_peak_resident_memory()
                conn.send(("ok", None))
            else:
                raise ValueError(f"unknown message {kind!r}")
        except Exception:                                 # noqa: BLE001 (sent back, raised in the parent)
            conn.send(("error", traceback.format_exc()))

