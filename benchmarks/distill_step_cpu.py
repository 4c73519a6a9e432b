#!/usr/bin/env python
"""CPU cost of one training update per objective: loss + gradients + clip + Adam + EMA.

    OPENBLAS_NUM_THREADS=1 python benchmarks/distill_step_cpu.py                       # fashion-mnist shape, batch 8
    python benchmarks/distill_step_cpu.py --shape 3,32,32 --batch 32 --objectives itvm,teacher

Random weights of the preset (the cost does not depend on their values), random data in
[-1, 1], each objective with its defaults (losses.DistillLossConfig); prints the median
of --iters updates after one warm-up update. docs/results.md quotes it for the
fashion-mnist study's budget.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ttfm_np import losses, model, objectives, optim, ttfm  # noqa: E402


def time_update(kind, preset, shape, batch, iters):
    tcfg = model.make_config(preset, shape)
    host = model.init_model(tcfg, 0)
    if kind == "teacher":
        objective, params = objectives.FlowMatchingObjective(tcfg), host
    else:
        params, scfg = ttfm.student_from_teacher(host, tcfg)
        objective = objectives.DistillObjective(scfg, (host, tcfg), losses.DistillLossConfig(loss=kind))
    params = {k: v.copy() for k, v in params.items()}
    ema = {k: v.copy() for k, v in params.items()}
    state = optim.adam_init(params)
    x1 = np.random.default_rng(0).uniform(-1, 1, (batch,) + shape).astype(np.float32)
    times = []
    for i in range(1 + iters):
        t0 = time.perf_counter()
        _, grads, _ = objective.loss_and_grads(params, ema, x1, np.random.default_rng(i), i)
        optim.clip_grad_norm(grads, 1.0)
        optim.adam_step(params, grads, state, 1e-4)
        optim.ema_update(ema, params, 0.99)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


@click.command(context_settings={"show_default": True})
@click.option("--objectives", "kinds", default="itvm,lfmd,ecd,teacher")
@click.option("--preset", default="small")
@click.option("--shape", default="1,32,32", help="C,H,W of one sample")
@click.option("--batch", type=click.IntRange(1), default=8)
@click.option("--iters", type=click.IntRange(1), default=3)
def main(kinds, preset, shape, batch, iters):
    shape = tuple(int(v) for v in shape.split(","))
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    for kind in kinds.split(","):
        sec = time_update(kind, preset, shape, batch, iters)
        click.echo(f"{kind:8s} {sec:6.2f} s/update  ({preset}, {shape}, batch {batch}, OPENBLAS_NUM_THREADS={threads})")


if __name__ == "__main__":
    main()
