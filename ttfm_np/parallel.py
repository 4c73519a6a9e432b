"""Split a batch over CPU threads for the NumPy passes that OpenBLAS does not thread.

Why: with two BLAS threads a matrix product runs on both cores, but NumPy's ufuncs,
slice copies and reductions (im2col, the Winograd transforms, GroupNorm, SiLU) run
on one. PyTorch splits those over its threads too, so at two threads the U-Net step
of ttfm_np fell behind it (docs/benchmarks.md). NumPy releases the GIL inside its
loops, so plain Python threads that each take a contiguous block of samples run
those passes side by side. (Every NumPy call still takes the GIL back after its
loop; a U-Net's whole per-block passes therefore run on worker processes instead,
ttfm_np/block_processes.py, with the same blocks.)

    parts = run_split(lambda lo, hi: work(x[lo:hi]), n=len(x))     # one call per worker, in order

Rules that keep the results reproducible and the machine sane:
  * static split: worker k always gets the same contiguous rows (split_range), and
    run_split returns the results in row order, so a sum over parts is taken in a
    fixed order: the same bits for the same worker count on every run;
  * while the workers run, OpenBLAS is asked for one thread (each worker's products
    then run on its own core instead of fighting over both), and the previous count
    is restored afterwards;
  * only the main thread splits; a call from any other thread (a worker itself, or
    the thread ranks of ttfm_np/distributed.py) runs serially, so splits never nest;
  * the worker count is OpenBLAS's thread count, so OPENBLAS_NUM_THREADS=1 (and
    blas.single_threaded_small_gemms, which the 2-D models run under) means serial.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import blas

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_forced: int | None = None          # set_workers(): tests and benchmarks pin the count


def set_workers(n: int | None) -> None:
    """Pin the worker count (None: follow OpenBLAS's thread count again)."""
    global _forced
    if n is not None and int(n) < 1:
        raise ValueError(f"parallel.set_workers({n}): the worker count must be >= 1 (or None)")
    _forced = None if n is None else int(n)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS reports one (a container or
    `taskset` may allow fewer than os.cpu_count(), which counts the whole machine), else the CPU count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def workers() -> int:
    """How many threads run_split uses now: 1 outside the main thread, else the pinned count or
    OpenBLAS's thread count (1 where NumPy bundles no OpenBLAS), at most the usable CPUs."""
    if threading.current_thread() is not threading.main_thread():
        return 1
    n = _forced if _forced is not None else (blas.get_threads() or 1)
    return max(1, min(n, usable_cpus()))


def split_range(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous (lo, hi) blocks covering range(n), the first n % parts one row longer; no empty block."""
    if n <= 0:
        return []
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for k in range(parts):
        hi = lo + base + (1 if k < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def sum_split(fn, n: int, min_rows: int = 1) -> tuple:
    """run_split(fn, n) where every block returns a tuple of partial sums (arrays or None): the
    tuples added field by field in block order, so the result is the same for a given worker count."""
    parts = run_split(fn, n, min_rows)
    total = list(parts[0])
    for part in parts[1:]:
        total = [None if a is None else a + b for a, b in zip(total, part)]
    return tuple(total)


def chunk_range(n: int, per_row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """[(lo, hi), ...] covering range(n), each about chunk_bytes of buffer (at least one row): the
    cache-sized chunks a worker's block is processed in (conv.py's im2col, winograd.py's tiles)."""
    step = max(1, chunk_bytes // max(1, per_row_bytes))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _forget_pool_in_child():
    """After os.fork the child has the pool object but none of its threads: start a new one there."""
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size < size:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=size, thread_name_prefix="ttfm-split"), size
    return _pool


def run_split(fn, n: int, min_rows: int = 1) -> list:
    """[fn(lo, hi) for each block of split_range(n, workers)], the blocks run on separate threads.

    min_rows: blocks smaller than this are not worth a thread; fewer workers are used then.
    The calling thread runs the first block itself. An exception in any block is raised here
    (after every block has finished, so no worker still writes into shared output)."""
    k = min(workers(), max(1, n // max(1, min_rows)))
    return run_blocks(fn, split_range(n, k))


def run_blocks(fn, blocks) -> list:
    """[fn(lo, hi) for (lo, hi) in blocks], the blocks on separate threads (run_split's engine; a caller
    that must reuse the blocks of an earlier split, such as a backward, passes them here)."""
    if len(blocks) <= 1:
        return [fn(lo, hi) for lo, hi in blocks]
    with one_blas_thread():              # one BLAS thread per worker: the workers are the parallelism
        futures = [_executor(len(blocks) - 1).submit(fn, lo, hi) for lo, hi in blocks[1:]]
        first_error, results = None, []
        try:
            results.append(fn(*blocks[0]))
        except BaseException as exc:     # noqa: BLE001 (re-raised below, after the workers are done)
            first_error = exc
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as exc:  # noqa: BLE001
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return results


@contextlib.contextmanager
def one_blas_thread():
    """OpenBLAS on one thread inside the block (the previous count restored after): while blocks of
    samples run side by side, each worker's products run on its own core."""
    previous = blas.get_threads()
    if previous is not None and previous > 1:
        blas.set_threads(1)
    try:
        yield
    finally:
        if previous is not None and previous > 1:
            blas.set_threads(previous)


def rows(a, lo, hi):
    """Rows lo..hi-1 of a per-sample array (a block's share); a number or None stays as it is."""
    return a if a is None or np.ndim(a) == 0 else a[lo:hi]


def add_dicts(parts) -> dict:
    """The dicts (e.g. the blocks' parameter gradients) added key by key, in list order: the same
    sum for the same blocks."""
    total = dict(parts[0])
    for part in parts[1:]:
        total = {k: total[k] + part[k] for k in total}
    return total
