"""Shared harness of the kernel studies in dev/ (in the manner of llm.c's dev/cuda).

A study registers numbered versions of one kernel with @version(n, "what it tries").
`run_study(...)` validates EVERY registered version against the float64 NumPy
reference on fresh random inputs, then times the selected one (or all):

    python dev/conv2d.py            # validate all versions, time all
    python dev/conv2d.py 2          # validate all, time version 2
    python dev/conv2d.py --quick    # small sizes, no timing loop worth reading (CI runs this)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ttfm_np import backend  # noqa: E402

# The library runs with freed arrays kept in the heap (backend.tune_cpu_allocator,
# called by select_device("cpu")); time the studies under the same allocator.
backend.tune_cpu_allocator()


class Registry:
    def __init__(self):
        self.versions = {}

    def version(self, number: int, description: str):
        def wrap(fn):
            if number in self.versions:
                raise ValueError(f"version {number} registered twice")
            fn.description = description
            self.versions[number] = fn
            return fn
        return wrap


def max_rel_error(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def time_fn(fn, repeats: int) -> float:
    fn()                                             # warm-up (allocations, caches)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_study(name, registry: Registry, make_inputs, reference, tol: float, flops=None, argv=None):
    """make_inputs(quick, rng) -> inputs; reference(inputs) -> tuple of float64 outputs;
    each version(inputs) -> tuple of outputs in the same order. Returns {version: seconds}."""
    ap = argparse.ArgumentParser(description=f"{name} kernel study")
    ap.add_argument("version", nargs="?", type=int, default=None, help="version to time (default: all)")
    ap.add_argument("--quick", action="store_true", help="small sizes, one timing repeat (CI)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.version is not None and args.version not in registry.versions:
        ap.error(f"no version {args.version}; registered: {sorted(registry.versions)}")
    rng = np.random.default_rng(0)
    inputs = make_inputs(args.quick, rng)
    ref = reference(inputs)
    for v, fn in sorted(registry.versions.items()):
        outs = fn(inputs)
        errs = [max_rel_error(o, r) for o, r in zip(outs, ref)]
        status = "ok" if max(errs) < tol else "FAILED"
        print(f"{name} v{v} [{fn.description}]: max rel error {max(errs):.2e} {status}")
        if status != "ok":
            raise SystemExit(f"{name} v{v} does not match the reference (tolerance {tol})")
    times = {}
    for v in ([args.version] if args.version is not None else sorted(registry.versions)):
        fn = registry.versions[v]
        times[v] = time_fn(lambda: fn(inputs), 1 if args.quick else args.repeats)
        extra = f", {flops(inputs) / times[v] / 1e9:.1f} GFLOP/s" if flops else ""
        print(f"{name} v{v}: {times[v] * 1e3:.2f} ms{extra}")
    return times
