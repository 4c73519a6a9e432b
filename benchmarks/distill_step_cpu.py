#!/usr/bin/env python
"""CPU cost of one training update per objective: loss + gradients + clip + Adam + EMA.

    OPENBLAS_NUM_THREADS=1 python benchmarks/distill_step_cpu.py                       # fashion-mnist shape, batch 8
    python benchmarks/distill_step_cpu.py --shape 3,32,32 --batch 32 --objectives itvm,teacher
    python benchmarks/distill_step_cpu.py --objectives lfmd:fd,lfmd:jvp --rounds 5      # --lfmd-derivative

Random weights of the preset (the cost does not depend on their values), random data in
[-1, 1], each objective with its defaults (losses.DistillLossConfig); prints the median
of --iters updates after one warm-up update. The timed step is gpu_check.time_ours (the
GPU check's step) on NumPy. docs/results.md quotes it for the fashion-mnist study's budget.
"""
from __future__ import annotations

import os
import sys

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import time_ours  # noqa: E402  (also puts the repository on sys.path)


@click.command(context_settings={"show_default": True})
@click.option("--objectives", "kinds", default="itvm,lfmd,ecd,teacher")
@click.option("--preset", default="small")
@click.option("--shape", default="1,32,32", help="C,H,W of one sample")
@click.option("--batch", type=click.IntRange(1), default=8)
@click.option("--iters", type=click.IntRange(1), default=3)
@click.option("--rounds", type=click.IntRange(1), default=1,
              help="time the objectives in turn this many times (interleaved, so that a busy machine's load "
                   "falls on all of them alike) and print each objective's median over the rounds")
def main(kinds, preset, shape, batch, iters, rounds):
    shape = tuple(int(v) for v in shape.split(","))
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    times = {kind: [] for kind in kinds.split(",")}
    for r in range(rounds):
        for kind in times:
            sec, _ = time_ours(kind, preset, batch, warmup=1, iters=iters, xp=np, shape=shape)
            times[kind].append(sec)
            click.echo(f"{kind:8s} {sec:7.3f} s/update  ({preset}, {shape}, batch {batch}, "
                       f"OPENBLAS_NUM_THREADS={threads}{f', round {r + 1}' if rounds > 1 else ''})")
    if rounds > 1:
        first = next(iter(times))
        for kind, ts in times.items():
            ratio = np.median(np.array(ts) / np.array(times[first]))
            click.echo(f"median {kind:8s} {np.median(ts):7.3f} s/update, {ratio:.2f} x {first} (median of the rounds' ratios)")


if __name__ == "__main__":
    main()
