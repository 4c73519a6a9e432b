#!/usr/bin/env python
"""Toy teachers: train one flow-matching MLP per 2-D toy with a given recipe, then
judge its samples (64 Heun steps) against 4000 held-out points with sliced-W2, the
2-D histogram total variation and a narrow-kernel MMD (metrics.py), each next to its
two-sample floor (two independent held-out sets), and save a scatter PNG.

    python experiments/toy_teachers.py --toys spirals --steps 4000 --hidden 256 --depth 4 --out runs/teachers-a

Writes OUT/<toy>/ (the training run: checkpoint.h5, metrics.jsonl; study_toys.py --teachers OUT
uses these checkpoints), OUT/<toy>.png and appends one JSON line per toy to OUT/teachers.jsonl
(recipe, s/step, metrics). The network is the `mlp` preset unless --hidden/--depth say otherwise
(this script builds the config itself, so it can try sizes the presets do not have).
Set OPENBLAS_NUM_THREADS=1 when the cores are shared: a 2-D MLP is too small for threaded BLAS,
and its threads spin against the other processes (10x slower per step on a loaded 2-core machine).
"""
from __future__ import annotations

import json
import os
import sys
import time

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ttfm_np import data as D, flow, metrics, model, train  # noqa: E402
from ttfm_np.images import save_scatter  # noqa: E402
from ttfm_np.objectives import FlowMatchingObjective  # noqa: E402


def judge(velocity, toy, n=4000, steps=64, seed=0):
    ref = D.load_dataset(f"toy:{toy}", split="test", n=n).data
    ref2 = D.make_toy(toy, n, 777)                                    # a second independent set: the floor
    z = np.random.default_rng(seed).standard_normal((n, 2)).astype(np.float32)
    x = flow.solve_ode(velocity, z, n_steps=steps, method="heun")
    x = np.asarray(x, np.float64)
    row = dict(sw2=metrics.sliced_w2(x, ref), tv=metrics.hist2d_tv(x, ref), mmd=metrics.mmd_rbf(x, ref, max_points=2000),
               floor_sw2=metrics.sliced_w2(ref2, ref), floor_tv=metrics.hist2d_tv(ref2, ref),
               floor_mmd=metrics.mmd_rbf(ref2, ref, max_points=2000))
    return x, ref, row


@click.command()
@click.option("--toys", default="checkerboard,moons,8gaussians,spirals")
@click.option("--steps", default=4000)
@click.option("--batch-size", default=512)
@click.option("--lr", default=2e-3)
@click.option("--warmup", default=100)
@click.option("--ema-decay", default=0.995)
@click.option("--hidden", default=256)
@click.option("--depth", default=4)
@click.option("--seed", default=0)
@click.option("--out", default="runs/toy-teachers")
def main(toys, steps, batch_size, lr, warmup, ema_decay, hidden, depth, seed, out):
    os.makedirs(out, exist_ok=True)
    for toy in toys.split(","):
        ds = D.load_dataset(f"toy:{toy}")
        cfg = model.make_config("mlp", ds.shape, hidden=hidden, depth=depth)
        tcfg = train.TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
                                 seed=seed, log_every=max(1, steps // 20), ckpt_every=steps, sample_every=0)
        it = D.BatchIterator(ds.data, batch_size, seed=seed)
        obj = FlowMatchingObjective(cfg, sample_kind="toy", heldout=ds.data[:1000])
        t0 = time.time()
        _, ema, _ = train.train_loop(os.path.join(out, toy), model_cfg=cfg, init_params=model.init_model(cfg, seed),
                                     objective=obj, data_iter=it, tcfg=tcfg, progress=False,
                                     run_config=dict(task="teacher", data=f"toy:{toy}", time_sampling="uniform"))
        sec = (time.time() - t0) / steps
        x, ref, row = judge(lambda x, t: model.model_forward(ema, cfg, x, t)[0], toy)
        save_scatter(x[:2000], os.path.join(out, f"{toy}.png"), reference=ref[:2000],
                     title=f"{toy} teacher heun64 tv {row['tv']:.3f} (floor {row['floor_tv']:.3f})")
        rec = dict(toy=toy, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
                   hidden=hidden, depth=depth, seed=seed, s_per_step=sec, **row)
        with open(os.path.join(out, "teachers.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        click.echo(json.dumps(rec))


if __name__ == "__main__":
    main()
