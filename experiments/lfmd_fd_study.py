#!/usr/bin/env python
"""How large may LFMD's finite-difference step h be?

LFMD needs d/dt phi(x, s, t). We take it by a central difference
(phi(t + h) - phi(t - h)) / 2h. Two errors compete:

  truncation   the student sees t through sinusoidal features sin/cos(scale * t * w_i)
               (w_0 = 1, so the top angular frequency is `scale` = cfg.time_scale,
               1000 by default). For one such feature the central difference returns
               the derivative times sin(scale h) / (scale h) ~ 1 - (scale h)^2 / 6:
               h = 1e-3 damps the top frequency by sin(1) = 0.84, h = 1e-4 by 0.17 %.
  cancellation phi(t + h) - phi(t - h) in floating point loses ~ eps |phi| / h:
               float32 eps = 6e-8, so h = 1e-4 costs ~ 1e-3 relative, h = 1e-5 ~ 1e-2.

This script measures both on warm-started students (a tiny U-Net and the 2-D MLP;
W_d and the weights slightly perturbed away from the warm start, where phi is
linear in t and every h would be exact). For each h in float32 and float64 it
reports the relative error of the LFMD loss and of its parameter gradient against
a float64 reference with h_ref = 1e-6 (its own error is estimated by comparing
with h_ref = 2e-6 and printed).

    python experiments/lfmd_fd_study.py                     # prints the table, writes runs/lfmd_fd_study.json

(The reference here is itself a finite difference; experiments/lfmd_fd_vs_jvp.py measures the
default step against the exact derivative, --lfmd-derivative jvp, on more students and pairs.)
"""
from __future__ import annotations

import json
import os
import sys

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ttfm_np import flow, losses, model, params as P, ttfm, unet  # noqa: E402

STEPS = (1e-2, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
H_REF = 1e-6


def warm_student(kind: str, seed: int = 0, perturb: float = 0.05):
    """(student, teacher) in float64: a random teacher of realistic scale, the
    student warm-started from it, then every weight (W_d included) moved by a
    relative perturbation, like a student some updates into training."""
    if kind == "mlp":
        cfg = model.make_config("mlp", (2,))
    else:
        cfg = unet.preset_config("tiny", in_channels=1, resolution=8, attn_resolutions=(4,))
    tp = P.astype(model.init_model(cfg, seed), np.float64)
    # zero-initialised output layers would make v = 0; give every tensor random values of its init scale
    rnd = P.randomize(tp, seed=seed + 10, std=1.0)
    tp = {k: (v + 0.3 * rnd[k] * (np.abs(v).mean() + 0.05)) for k, v in tp.items()}
    sp, scfg = ttfm.student_from_teacher(tp, cfg)
    rnd = P.randomize(sp, seed=seed + 20, std=1.0)
    sp = {k: v + perturb * rnd[k] * (np.abs(v).mean() + 0.05) for k, v in sp.items()}
    return (sp, scfg), (tp, cfg)


def batch(kind, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (2,) if kind == "mlp" else (1, 8, 8)
    x0, x1 = rng.standard_normal((n,) + shape), rng.standard_normal((n,) + shape)
    a, b = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    s, t = np.minimum(a, b), np.maximum(a, b)
    t[0] = 1.0                                             # one pair ending at t = 1 (one-sided stencil)
    x_s = flow.bcast(1 - s, x0) * x0 + flow.bcast(s, x1) * x1
    return x_s, s, t


def lfmd(student, teacher, x_s, s, t, h, dtype):
    """LFMD loss and flattened gradient (float64 numpy) at step h, everything cast to dtype."""
    cast = lambda pc: (P.astype(pc[0], dtype), pc[1])
    st, te = cast(student), cast(teacher)
    opts = losses.DistillLossConfig(loss="lfmd", fd_step=h, lfmd_derivative="fd")
    loss, grads, _ = losses.lfmd_loss(st, st, te, x_s.astype(dtype), s.astype(dtype), t.astype(dtype), opts)
    g = np.concatenate([np.asarray(grads[k], np.float64).ravel() for k in sorted(grads)])
    return float(loss), g


def study(kinds=("unet", "mlp"), n=16, steps=STEPS, seed=0):
    rows = []
    for kind in kinds:
        student, teacher = warm_student(kind, seed)
        x_s, s, t = batch(kind, n, seed)
        ref_l, ref_g = lfmd(student, teacher, x_s, s, t, H_REF, np.float64)
        chk_l, chk_g = lfmd(student, teacher, x_s, s, t, 2 * H_REF, np.float64)
        ref_err = dict(loss=abs(chk_l - ref_l) / abs(ref_l),
                       grad=float(np.linalg.norm(chk_g - ref_g) / np.linalg.norm(ref_g)))
        click.echo(f"{kind}: reference loss {ref_l:.6g} (float64, h = {H_REF:g}); "
                   f"h_ref vs 2 h_ref: loss {ref_err['loss']:.1e}, grad {ref_err['grad']:.1e}")
        for dtype in (np.float32, np.float64):
            for h in steps:
                l, g = lfmd(student, teacher, x_s, s, t, h, dtype)
                row = dict(model=kind, dtype=np.dtype(dtype).name, h=h, scale_h=student[1].time_scale * h,
                           loss=l, loss_rel_err=abs(l - ref_l) / abs(ref_l),
                           grad_rel_err=float(np.linalg.norm(g - ref_g) / np.linalg.norm(ref_g)),
                           ref_loss=ref_l, ref_self_err=ref_err)
                rows.append(row)
                click.echo(f"  {row['dtype']:7s} h={h:7.0e} scale*h={row['scale_h']:6.3f}  "
                           f"loss rel err {row['loss_rel_err']:.2e}  grad rel err {row['grad_rel_err']:.2e}")
    return rows


@click.command()
@click.option("--n", default=16, help="batch size of the probe")
@click.option("--seed", default=0)
@click.option("--out", default="runs/lfmd_fd_study.json")
def main(n, seed, out):
    rows = study(n=n, seed=seed)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
