#!/usr/bin/env python
"""Time the two sigmoid formulas and the SiLU backward on this CPU's NumPy SIMD level.

    python benchmarks/sigmoid_forms.py
    NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" python benchmarks/sigmoid_forms.py   # AVX2 loops

ttfm_np/activations.py picks SIGMOID_FORM at import from the SIMD level NumPy
reports (np.show_runtime's 'found'): these are the measurements behind that choice
(docs/benchmarks.md). Both forms and both SiLU backwards run interleaved, --rounds
times, on one (rows, cols) float32 array (the MLP's hidden activation by default);
printed: median and range in ms of each.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ttfm_np import activations  # noqa: E402
import numpy as np  # noqa: E402

import unet_step  # noqa: E402  (simd_levels)


@click.command(context_settings={"show_default": True})
@click.option("--rows", type=click.IntRange(1), default=4096)
@click.option("--cols", type=click.IntRange(1), default=256)
@click.option("--rounds", type=click.IntRange(1), default=15)
def main(rows, cols, rounds):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
    dy = rng.standard_normal((rows, cols)).astype(np.float32)
    _, cache = activations.silu_forward(x)

    def recompute_backward():        # the backward before the cache kept s: a second sigmoid
        s = activations.sigmoid(x)
        return dy * (s * (1.0 + x * (1.0 - s)))

    cases = {
        "sigmoid, tanh form": lambda: activations.sigmoid(x, "tanh"),
        "sigmoid, exp form": lambda: activations.sigmoid(x, "exp"),
        "SiLU forward (chosen form)": lambda: activations.silu_forward(x),
        "SiLU backward, s from the cache": lambda: activations.silu_backward(dy, cache),
        "SiLU backward, s recomputed": recompute_backward,
    }
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(10):
                fn()
            times[name].append((time.perf_counter() - t0) / 10 * 1e3)
    click.echo(f"{rows}x{cols} float32; {unet_step.simd_levels()}")
    for name, v in times.items():
        click.echo(f"  {name:34s} {statistics.median(v):6.2f} ms  [{min(v):.2f}, {max(v):.2f}]")


if __name__ == "__main__":
    main()
