#!/usr/bin/env python
"""The image experiment on a CPU: one fashion-mnist teacher (`small` U-Net),
the same student budget for ITVM, LFMD and ECD, flow-map MSE/PSNR at
N = 1, 2, 4, 8 against the teacher's Heun reference solution, wall time per update.

    python experiments/distill_fashion.py                    # writes runs/fashion/summary.json
    python experiments/distill_fashion.py --steps 100 --losses itvm --out runs/fashion-quick

Costly on a CPU: one ITVM update of the small U-Net at batch 32 is about
2 student forward+backward + 3 forwards (~7-10 s on 2 cores), and the Heun
reference solution costs 2 U-Net passes per step (64 steps by default here, 256 elsewhere). The teacher is
trained first (fashion-mnist recipe) if data/teachers/fashion-mnist-small has none.
"""
from __future__ import annotations

import os

import click

from runner import DistillLossConfig, distill_and_collect, ensure_teacher, write_summary


@click.command(context_settings={"show_default": True})
@click.option("--losses", default="itvm,lfmd,ecd")
@click.option("--steps", type=click.IntRange(1), default=1000, help="student updates (same for every loss)")
@click.option("--batch-size", type=click.IntRange(1), default=32)
@click.option("--lr", type=float, default=2e-4)
@click.option("--warmup", type=click.IntRange(0), default=20, help="learning-rate warmup steps")
@click.option("--ema-decay", type=float, default=None,
              help="student EMA decay (default: each loss's student_ema_decay, else the recipe's)")
@click.option("--seed", type=int, default=0)
@click.option("--eval-n", type=int, default=256, help="noise samples in the flow-map evaluation")
@click.option("--eval-n-ref", type=int, default=64, help="Heun steps of the reference (256 is the default elsewhere; "
              "64 keeps the CPU cost of 128 U-Net passes per image manageable)")
@click.option("--out", default="runs/fashion")
def main(losses, steps, batch_size, lr, warmup, ema_decay, seed, eval_n, eval_n_ref, out):
    """Every loss runs with its defaults in losses.DistillLossConfig (the measured best of
    experiments/study_toys.py, docs/results.md) and the same training budget."""
    teacher = ensure_teacher("fashion-mnist", seed)
    summary = []
    for loss in losses.split(","):
        summary.append(distill_and_collect(
            os.path.join(out, loss), data="fashion-mnist", teacher=teacher, loss=DistillLossConfig(loss=loss),
            eval_n=eval_n, eval_n_ref=eval_n_ref, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
            ema_decay=ema_decay, seed=seed, ckpt_every=50))
    write_summary(out, summary)
    for s in summary:
        r = {row["method"]: row for row in s["rows"]}
        cells = "  ".join(f"N={n}: psnr {r[f'student {n}-step']['psnr']:.2f}" for n in (1, 2, 4, 8)
                          if f"student {n}-step" in r)
        click.echo(f"{s['loss']:5s} {s['seconds_per_update']:6.2f} s/update  {cells}")


if __name__ == "__main__":
    main()
