#!/usr/bin/env python
"""The image experiment on a CPU: one fashion-mnist teacher (`small` U-Net),
the same student budget for ITVM, LFMD and ECD, flow-map MSE/PSNR at
N = 1, 2, 4, 8 against the teacher's Heun reference solution (next to the
teacher's own Euler N and Heun N/2), wall time per update.

    python experiments/distill_fashion.py run --losses itvm,lfmd,ecd     # one after another
    python experiments/distill_fashion.py run --losses itvm &             # or one process per loss
    python experiments/distill_fashion.py run --losses lfmd &
    python experiments/distill_fashion.py run --losses ecd &
    python experiments/distill_fashion.py report                          # table + comparison figure

Every run resumes where it stopped (`--resume`), and the teacher's solutions
(reference, Euler N, Heun N/2) are cached next to the teacher, so they are
computed once for all students. Cost on a CPU, per update of batch B, in
network passes of B images: ITVM 10 (2 student forward+backward, 1 EMA
forward, 3 teacher forwards), LFMD 10 (3 student forwards, up to 3
backwards, 1 teacher forward), ECD 5; the 64-step Heun reference is 128
passes per evaluation image. The teacher is trained first (fashion-mnist
recipe) if data/teachers/fashion-mnist-small has none.
"""
from __future__ import annotations

import glob
import json
import os

import click
import numpy as np

from runner import ROOT, DistillLossConfig, distill_and_collect, ensure_teacher, write_summary
from ttfm_np import evaluate as evaluation, images, sampling

STEPS_N = (1, 2, 4, 8)


@click.group(context_settings={"show_default": True})
def cli():
    pass


@cli.command()
@click.option("--losses", default="itvm,lfmd,ecd")
@click.option("--steps", type=click.IntRange(1), default=1000, help="student updates (same for every loss)")
@click.option("--batch-size", type=click.IntRange(1), default=8)
@click.option("--lr", type=float, default=2e-4)
@click.option("--warmup", type=click.IntRange(0), default=100, help="learning-rate warmup steps")
@click.option("--ema-decay", type=float, default=None,
              help="student EMA decay (default: each loss's student_ema_decay, else the recipe's)")
@click.option("--seed", type=int, default=0)
@click.option("--eval-n", type=click.IntRange(1), default=256, help="noise samples in the flow-map evaluation")
@click.option("--eval-n-ref", type=click.IntRange(1), default=64,
              help="Heun steps of the reference (256 is the default elsewhere; 64 keeps the CPU cost at "
                   "128 U-Net passes per image)")
@click.option("--out", default="runs/fashion")
def run(losses, steps, batch_size, lr, warmup, ema_decay, seed, eval_n, eval_n_ref, out):
    """Distil and evaluate each loss with its defaults (losses.DistillLossConfig: the measured best
    of experiments/study_toys.py, docs/results.md) and the same training budget; writes
    OUT/LOSS/summary.json."""
    teacher = ensure_teacher("fashion-mnist", seed)
    for loss in losses.split(","):
        result = distill_and_collect(
            os.path.join(out, loss), data="fashion-mnist", teacher=teacher, loss=DistillLossConfig(loss=loss),
            eval_n=eval_n, eval_n_ref=eval_n_ref, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
            ema_decay=ema_decay, seed=seed, ckpt_every=50)
        result.update(run_dir=os.path.join(out, loss), teacher=teacher, steps=steps, batch_size=batch_size, seed=seed, eval_n=eval_n,
                      eval_n_ref=eval_n_ref)
        write_summary(os.path.join(out, loss), [result])
        click.echo(f"{loss}: {result['seconds_per_update']:.2f} s/update")


def read_summaries(out):
    summaries = []
    for path in sorted(glob.glob(os.path.join(ROOT, out, "*", "summary.json"))):
        summaries += json.load(open(path))
    if not summaries:
        raise click.ClickException(f"no OUT/LOSS/summary.json under {out}: run `distill_fashion.py run` first")
    order = {"itvm": 0, "lfmd": 1, "ecd": 2, "meanflow": 3}
    return sorted(summaries, key=lambda s: order.get(s["loss"], 9))


def markdown_table(summaries):
    """MSE (PSNR) against the reference per method and N, the teacher's rows once."""
    lines = ["| method | s/update | " + " | ".join(f"N={n}" for n in STEPS_N) + " |",
             "|---|---|" + "---|" * len(STEPS_N)]

    def cell(row):
        return f"{row['mse']:.2e} ({row['psnr']:.1f} dB)" if row else "-"

    for s in summaries:
        rows = {r["method"]: r for r in s["rows"]}
        lines.append(f"| {s['loss']} | {s['seconds_per_update']:.2f} | "
                     + " | ".join(cell(rows.get(f"student {n}-step")) for n in STEPS_N) + " |")
    rows = {r["method"]: r for r in summaries[0]["rows"]}
    lines.append("| teacher Euler N | - | " + " | ".join(cell(rows.get(f"teacher euler {n}")) for n in STEPS_N) + " |")
    lines.append("| teacher Heun N/2 | - | - | "
                 + " | ".join(cell(rows.get(f"teacher heun {n // 2}")) for n in STEPS_N[1:]) + " |")
    return "\n".join(lines)


def comparison_figure(summaries, path, n_images=10, seed=12345):
    """Rows: the teacher's reference, then per N in (1, 2) the teacher's Euler N and every student's
    N-step samples, all from the same noise; columns: n_images noise draws."""
    teacher = sampling.load_model(summaries[0]["teacher"], role="teacher")
    z = teacher.noise(n_images, seed=seed)
    students = {s["loss"]: sampling.load_model(os.path.join(ROOT, s["run_dir"]), role="student") for s in summaries}
    rows = [teacher.generate(z, summaries[0]["eval_n_ref"], "heun")]
    labels = [f"teacher Heun {summaries[0]['eval_n_ref']}"]
    for n in (1, 2):
        rows.append(teacher.generate(z, n, "euler"))
        labels.append(f"teacher Euler {n}")
        for loss, student in students.items():
            rows.append(student.generate(z, n))
            labels.append(f"{loss} {n}-step")
    images.save_image_grid(np.concatenate(rows), path, nrow=n_images, upscale=2)
    return labels


def paired_differences(summaries, ns=(1, 2)):
    """Evaluation noise of one seed's table: on the same eval_n noise draws as the runs' evaluation,
    the per-sample MSE to the (cached) reference of each student, and for every baseline
    d_i = MSE_baseline,i - MSE_itvm,i: mean +- standard error over the samples (paired, so the
    spread of sample difficulty cancels). It says how sure the ranking is for these weights;
    it does not measure seed-to-seed variation."""
    first = summaries[0]
    teacher = sampling.load_model(first["teacher"], role="teacher")
    z = teacher.noise(first["eval_n"], seed=0)                  # pipeline.evaluate_models' noise (eval seed 0)
    x_ref = evaluation.reference_solution(teacher, z, first["eval_n_ref"],
                                          os.path.join(os.path.dirname(teacher.path), "reference_cache"))
    per_sample = {}
    for s in summaries:
        student = sampling.load_model(os.path.join(ROOT, s["run_dir"]), role="student")
        rows = {r["method"]: r for r in s["rows"]}
        for n in ns:
            err = ((student.generate(z, n) - x_ref) ** 2).reshape(len(z), -1).mean(axis=1).astype(np.float64)
            # the same numbers as the run's own table (a check that the noise and reference match)
            assert abs(err.mean() - rows[f"student {n}-step"]["mse"]) <= 1e-4 * err.mean(), (s["loss"], n)
            per_sample[s["loss"], n] = err
    lines = ["| N | baseline | MSE baseline - MSE ITVM (mean +- SE over samples) | z | ITVM lower on |",
             "|---|---|---|---|---|"]
    for n in ns:
        for base in [s["loss"] for s in summaries if s["loss"] != "itvm"]:
            d = per_sample[base, n] - per_sample["itvm", n]
            se = d.std(ddof=1) / np.sqrt(len(d))
            lines.append(f"| {n} | {base} | {d.mean():+.2e} +- {se:.1e} | {d.mean() / se:+.1f} | "
                         f"{(d > 0).mean() * 100:.0f} % of samples |")
    return "\n".join(lines)


@cli.command()
@click.option("--out", default="runs/fashion")
@click.option("--figure", default="docs/img/fashion_students.png", help="comparison figure (PNG)")
@click.option("--paired/--no-paired", default=True, help="per-sample paired differences at N = 1, 2 "
              "(3 student passes per evaluation sample)")
def report(out, figure, paired):
    """The markdown table of every OUT/LOSS/summary.json, paired differences and the comparison figure."""
    summaries = read_summaries(out)
    click.echo(markdown_table(summaries))
    if paired:
        click.echo("\n" + paired_differences(summaries))
    labels = comparison_figure(summaries, os.path.join(ROOT, figure))
    click.echo(f"\n{figure}: rows top to bottom: " + ", ".join(labels))
    for s in summaries:
        click.echo(f"$ {s['command']}")


if __name__ == "__main__":
    cli()
