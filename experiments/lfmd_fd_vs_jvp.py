#!/usr/bin/env python
"""How wrong is LFMD's finite difference? Measured against the exact derivative (--lfmd-derivative jvp).

For each student and batch, the LFMD loss and its parameter gradient (semi-gradient, the default)
are computed with

    reference  the exact d/dt phi (forward-mode jvp + reverse over forward) in float64
    fd         the finite difference with the default step h = 0.1 / time_scale (1e-4), float64 and float32
    fd h=1e-3  the step the project used before issue 11 (float64)
    jvp f32    the exact derivative in float32 (its rounding error, for scale)

and the relative error |L - L_ref| / L_ref and ||g - g_ref|| / ||g_ref|| is reported, separately for
pairs with t <= 1 - h (the central stencil) and t > 1 - h (the one-sided stencil; half of these at t = 1).

Students (float64 weights):
  perturbed-unet / perturbed-mlp   experiments/lfmd_fd_study.warm_student: a random teacher, the student
                                   warm-started from it and every weight moved ~5 % (seeds 0 and 1)
  toy-<loss>-<updates>             a toy teacher (--data, the `mlp` preset, --teacher-steps updates of the
                                   toy recipe's batch and learning rate) and students warm-started from it
                                   and distilled with the toy distill recipe for a few hundred updates

    python experiments/lfmd_fd_vs_jvp.py                 # ~12 min on the 2-core CPU under load; runs/lfmd_fd_vs_jvp/
"""
from __future__ import annotations

import json
import os
import sys

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lfmd_fd_study import warm_student  # noqa: E402
from ttfm_np import data as datasets, flow, losses, params as P, pipeline, sampling  # noqa: E402


def lfmd(student, teacher, x_s, s, t, dtype, derivative, h=None):
    """(loss, flattened gradient in float64) of LFMD with everything cast to dtype."""
    cast = lambda pc: (P.astype(pc[0], dtype), pc[1])
    st, te = cast(student), cast(teacher)
    opts = losses.DistillLossConfig(loss="lfmd", lfmd_derivative=derivative, fd_step=h).validate()
    loss, grads, _ = losses.lfmd_loss(st, None, te, x_s.astype(dtype), s.astype(dtype), t.astype(dtype), opts)
    return float(loss), np.concatenate([np.asarray(grads[k], np.float64).ravel() for k in sorted(grads)])


def pairs(rng, n, h, edge: bool):
    """(s, t): interior pairs with t <= 1 - h (min/max of two uniforms, redrawn above), or edge pairs
    with t in (1 - h, 1] (half exactly at t = 1), s uniform below t."""
    if edge:
        t = np.where(np.arange(n) % 2 == 0, 1.0, 1.0 - h * rng.uniform(0, 1, n))
        return rng.uniform(0, 1, n) * t, t
    a, b = rng.uniform(0, 1 - h, n), rng.uniform(0, 1 - h, n)
    return np.minimum(a, b), np.maximum(a, b)


def measure(name, student, teacher, x1_pool, n, batches, seed):
    rows = []
    h = losses.LFMD_SCALE_H / student[1].time_scale
    for edge in (False, True):
        for b in range(batches):
            rng = np.random.default_rng([seed, b, int(edge)])
            x1 = x1_pool[rng.integers(0, len(x1_pool), n)]
            x0 = rng.standard_normal(x1.shape)
            s, t = pairs(rng, n, h, edge)
            x_s = flow.interpolate(x0, x1, s)
            ref_l, ref_g = lfmd(student, teacher, x_s, s, t, np.float64, "jvp")
            for label, dtype, derivative, step in (("fd f64", np.float64, "fd", None), ("fd f32", np.float32, "fd", None),
                                                   ("fd h=1e-3 f64", np.float64, "fd", 1e-3),
                                                   ("jvp f32", np.float32, "jvp", None)):
                l, g = lfmd(student, teacher, x_s, s, t, dtype, derivative, step)
                rows.append(dict(student=name, pairs="t > 1 - h" if edge else "t <= 1 - h", batch=b, method=label,
                                 loss_rel_err=abs(l - ref_l) / abs(ref_l),
                                 grad_rel_err=float(np.linalg.norm(g - ref_g) / np.linalg.norm(ref_g)),
                                 ref_loss=ref_l))
    return rows


def toy_students(data, teacher_steps, updates, out):
    """A toy teacher and students warm-started from it (pipeline runs, reused when finished)."""
    tdir = os.path.join(out, f"teacher-{teacher_steps}")
    pipeline.train_teacher(data, model_name="mlp", out=tdir, steps=teacher_steps, resume=True, progress=False)
    students = {}
    for loss in ("itvm", "lfmd"):
        sdir = os.path.join(out, f"student-{loss}-{updates}")
        pipeline.distill(data, teacher=tdir, loss=losses.DistillLossConfig(loss=loss), out=sdir, steps=updates,
                         resume=True, evaluate=False, progress=False)
        students[f"toy-{loss}-{updates}"] = sdir
    load = lambda path: (lambda m: (m.params, m.cfg))(sampling.load_model(path, weights="ema", dtype="float64"))
    return load(tdir), {k: load(v) for k, v in students.items()}


def summarise(rows):
    """{(student, pairs, method): (min, max) of loss and gradient errors over the batches}."""
    table = {}
    for r in rows:
        key = (r["student"], r["pairs"], r["method"])
        lo = table.setdefault(key, [np.inf, 0.0, np.inf, 0.0])
        lo[0], lo[1] = min(lo[0], r["loss_rel_err"]), max(lo[1], r["loss_rel_err"])
        lo[2], lo[3] = min(lo[2], r["grad_rel_err"]), max(lo[3], r["grad_rel_err"])
    return table


@click.command()
@click.option("--data", default="toy:checkerboard")
@click.option("--teacher-steps", default=3000, help="toy teacher updates (the full recipe has 12000)")
@click.option("--updates", default=300, help="distillation updates of the toy students")
@click.option("--n", default=256, help="pairs per batch")
@click.option("--batches", default=3, help="batches per student and pair kind")
@click.option("--out", default="runs/lfmd_fd_vs_jvp")
def main(data, teacher_steps, updates, n, batches, out):
    os.makedirs(out, exist_ok=True)
    rows = []
    x1_toy = datasets.make_toy(data.split(":", 1)[1], 20000, seed=1)
    teacher, trained = toy_students(data, teacher_steps, updates, out)
    for name, student in trained.items():
        rows += measure(name, student, teacher, x1_toy, n, batches, seed=0)
    for kind in ("mlp", "unet"):
        for seed in (0, 1):
            student, teacher_p = warm_student(kind, seed)
            pool = (np.random.default_rng(seed).standard_normal((4096, 2)) if kind == "mlp" else
                    np.random.default_rng(seed).standard_normal((512, 1, 8, 8)))
            rows += measure(f"perturbed-{kind}-{seed}", student, teacher_p, pool, n if kind == "mlp" else 16,
                            batches, seed)
    with open(os.path.join(out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    click.echo("| student | pairs | method | loss rel. error (min-max) | gradient rel. error (min-max) |")
    click.echo("|---|---|---|---|---|")
    for (student, kind, method), (l0, l1, g0, g1) in summarise(rows).items():
        click.echo(f"| {student} | {kind} | {method} | {l0:.1e} - {l1:.1e} | {g0:.1e} - {g1:.1e} |")
    click.echo(f"wrote {os.path.join(out, 'rows.json')}")


if __name__ == "__main__":
    main()
