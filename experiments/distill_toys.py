#!/usr/bin/env python
"""The project's main experiment on 2-D data: one teacher per toy, the same
student budget for every loss (ITVM, LFMD, ECD), flow-map error and sliced-W2
at N = 1, 2, 4, 8 steps, and wall time per update.

    python experiments/distill_toys.py                       # checkerboard + moons, writes runs/toys/summary.json
    python experiments/distill_toys.py --toys moons --steps 500 --out runs/toys-quick

Every number comes from `cli.py` commands that this script prints before it runs them.
"""
from __future__ import annotations

import os
import sys

import click

from runner import ROOT, distill_and_collect, run, write_summary


@click.command(context_settings={"show_default": True})
@click.option("--toys", default="checkerboard,moons", help="comma-separated toy names")
@click.option("--losses", default="itvm,lfmd,ecd")
@click.option("--steps", type=click.IntRange(1), default=2000, help="student updates (same for every loss)")
@click.option("--batch-size", type=click.IntRange(1), default=512)
@click.option("--lr", type=float, default=1e-3)
@click.option("--ema-decay", type=float, default=0.99)
@click.option("--seed", type=int, default=0)
@click.option("--eval-n", type=int, default=4000)
@click.option("--extra", default="", help="extra distill options, e.g. '--frac-t1 0.5 --delta 0.05'")
@click.option("--out", default="runs/toys", help="folder for the runs and summary.json")
def main(toys, losses, steps, batch_size, lr, ema_decay, seed, eval_n, extra, out):
    summary = []
    for toy in toys.split(","):
        data = f"toy:{toy}"
        teacher = os.path.join(ROOT, "data", "teachers", f"toy-{toy}-mlp", "checkpoint.h5")
        if not os.path.exists(teacher):
            run([sys.executable, "cli.py", "train", "--data", data, "--seed", str(seed)])
        for loss in losses.split(","):
            run_dir = os.path.join(out, f"{toy}-{loss}")
            cmd = [sys.executable, "cli.py", "distill", "--data", data, "--teacher", teacher, "--loss", loss,
                   "--steps", str(steps), "--batch-size", str(batch_size), "--lr", str(lr),
                   "--ema-decay", str(ema_decay), "--seed", str(seed), "--eval-n", str(eval_n),
                   "--out", run_dir, "--resume"] + extra.split()
            summary.append(distill_and_collect(cmd, run_dir, toy=toy, loss=loss))
    write_summary(out, summary)
    for s in summary:
        r = {row["method"]: row for row in s["rows"]}
        cells = "  ".join(f"N={n}: mse {r[f'student {n}-step']['mse']:.2e} sw2 {r[f'student {n}-step']['sw2']:.3f}"
                          for n in (1, 2, 4, 8) if f"student {n}-step" in r)
        click.echo(f"{s['toy']:12s} {s['loss']:5s} {s['seconds_per_update'] * 1000:7.1f} ms/update  {cells}")


if __name__ == "__main__":
    main()
