#!/usr/bin/env python
"""The multi-seed toy study (issue 11): ITVM vs LFMD vs ECD with the same budget
and the same tuning effort, on the four 2-D toys.

Protocol
  1. tune   every loss gets a grid of the same size (GRIDS, 6 configurations each)
            over its own knobs and the time-pair sampling, run once per toy with the
            tuning seed (100, not one of the reported seeds);
  2. ablate every loss gets 3 post-hoc variations (ABLATIONS) with the same seed, so the
            tuning effort is 9 runs per loss per toy;
  3. select per loss, the setting with the best score = mean over the four toys
            of log10(MSE at N = 1) + log10(MSE at N = 2) (flow-map error to the
            teacher's 256-step Heun solution), over its grid and its variations;
  4. final  the selected setting of every loss with seeds 0, 1, 2 on every toy
            (`final` for a grid configuration, `final-ablate --loss L --index I` for a variation);
  5. report mean +- standard error over the seeds at N = 1, 2, 4, 8, next to the
            teacher's own Euler N and Heun N/2 on the same noise, and the cell-by-cell
            verdicts of ITVM against each baseline (`report`).

Every cell: the same teacher per toy (the default teacher of the toy recipe, or --teachers DIR),
a student warm-started from it and trained by pipeline.distill for STEPS updates of batch BATCH,
lr 1e-3, 50 warm-up steps; the EMA weights are evaluated on EVAL_N fixed noise samples (seed 0):
MSE to the teacher's 256-step Heun solution from the same noise, and sliced-W2 / 2-D histogram
total variation to held-out data. Results are JSON lines in
OUT/results.jsonl; a cell already there is skipped, so the script resumes.

    OPENBLAS_NUM_THREADS=1 python experiments/study_toys.py --out runs/study-toys tune
    OPENBLAS_NUM_THREADS=1 python experiments/study_toys.py --out runs/study-toys final
    python experiments/study_toys.py --out runs/study-toys report          # markdown tables
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ttfm_np import data as D, losses, metrics, pipeline, sampling  # noqa: E402

TOYS = ("checkerboard", "moons", "8gaussians", "spirals")
STEPS_N = (1, 2, 4, 8)
TUNE_SEED = 100
FINAL_SEEDS = (0, 1, 2)

# One grid per loss, the same size for each (equal tuning effort). Keys are DistillLossConfig
# fields (frac_t1 always given, so the grid does not depend on the current defaults), plus "ema_decay" (the training loop's EMA: ITVM/ECD take their targets from it, every
# loss is evaluated with it) and "lr" (the learning rate, else --lr).
GRIDS = {
    "itvm": [
        dict(delta_mode="absolute", delta=1 / 64, target_solver="euler", frac_t1=0.0),       # the old default
        dict(delta_mode="relative", kappa=0.25, target_solver="heun", frac_t1=0.0),
        dict(delta_mode="relative", kappa=0.5, target_solver="heun", frac_t1=0.0),
        dict(delta_mode="relative", kappa=0.25, target_solver="heun", frac_t1=0.5, ema_decay=0.95),
        dict(delta_mode="relative", kappa=0.5, target_solver="heun", frac_t1=0.5, ema_decay=0.95),
        dict(delta_mode="relative", kappa=0.5, target_solver="heun", frac_t1=0.5, ema_target=False),
    ],
    "lfmd": [   # the finite-difference LFMD these results were measured with (--lfmd-derivative fd)
        dict(frac_t1=0.0, lfmd_derivative="fd"),                                             # auto h = 1e-4
        dict(frac_t1=0.25, lfmd_derivative="fd"),
        dict(frac_t1=0.5, lfmd_derivative="fd"),
        dict(frac_t1=0.5, fd_step=3e-4, lfmd_derivative="fd"),
        dict(frac_t1=0.5, ema_decay=0.95, lfmd_derivative="fd"),
        dict(frac_t1=0.5, lfmd_teacher_grad=False, lfmd_derivative="fd"),
    ],
    # Exact LFMD (forward-mode d/dt phi, docs/method.md §5.3) and MeanFlow (§5.8): grids of the same
    # size, over their own knobs and the time-pair sampling. Not run yet (issue 20, item 5).
    "lfmd-jvp": [
        dict(frac_t1=0.0, lfmd_derivative="jvp"),
        dict(frac_t1=0.25, lfmd_derivative="jvp"),
        dict(frac_t1=0.5, lfmd_derivative="jvp"),
        dict(frac_t1=0.0, ema_decay=0.95, lfmd_derivative="jvp"),
        dict(frac_t1=0.0, lfmd_teacher_grad=True, lfmd_derivative="jvp"),
        dict(frac_t1=0.0, pairs="uniform-gap", lfmd_derivative="jvp"),
    ],
    # meanflow_p: the adaptive weight's power (1 = Geng et al.'s, 0 = plain squared error). With the toy
    # teachers' 1000-frequency time features MeanFlow's update is stable only at a small learning rate
    # (docs/results.md, "MeanFlow on the toys"), so half its grid is the learning rate ("lr" key).
    "meanflow": [
        dict(frac_t1=0.0, meanflow_p=1.0),
        dict(frac_t1=0.0, meanflow_p=0.5),
        dict(frac_t1=0.0, meanflow_p=0.0),
        dict(frac_t1=0.0, meanflow_p=0.0, lr=1e-4),
        dict(frac_t1=0.0, meanflow_p=0.0, lr=5e-5),
        dict(frac_t1=0.0, meanflow_p=0.5, lr=1e-4),
    ],
    "ecd": [
        dict(delta=1 / 64, frac_t1=0.0),
        dict(delta=1 / 16, frac_t1=0.0),
        dict(delta=1 / 64, frac_t1=0.0, ema_decay=0.95),
        dict(delta=1 / 16, frac_t1=0.0, ema_decay=0.95),
        dict(delta=1 / 16, frac_t1=0.5),
        dict(delta=1 / 16, frac_t1=0.5, ema_decay=0.95),
    ],
}
BASE_EMA = 0.99

# Post-hoc variations (stage "ablate"), the same number per loss, so that every loss gets
# 6 + 3 = 9 tuning runs per toy. Variations 0 and 1 change the loss's grid pick: ITVM's ask which
# ingredient of its setting does the work; the baselines' move the knobs whose best value sat at an
# edge of their grid. Variation 2 is the best of 0-1 (or the grid pick) with every gap sampled
# equally often (pairs="uniform-gap", the weighting of long jumps; docs/results.md). A variation is
# adopted (and rerun with the final seeds by `final-ablate`) when it beats the loss's best so far
# on the same score.
ABLATIONS = {
    "itvm": [
        dict(delta_mode="relative", kappa=0.25, target_solver="heun", frac_t1=0.5),                  # EMA 0.99
        dict(delta_mode="relative", kappa=0.25, target_solver="heun", frac_t1=0.0, ema_decay=0.95),  # no t = 1 pairs
        dict(delta_mode="relative", kappa=0.25, target_solver="heun", frac_t1=0.0, ema_decay=0.95,
             pairs="uniform-gap"),
    ],
    "lfmd": [   # of grid 5 (frac_t1 0.5, semi-gradient): fewer t = 1 pairs (grid 0 > 2 with the exact gradient)
        dict(frac_t1=0.0, lfmd_teacher_grad=False, lfmd_derivative="fd"),
        dict(frac_t1=0.25, lfmd_teacher_grad=False, lfmd_derivative="fd"),
        dict(frac_t1=0.0, lfmd_teacher_grad=False, pairs="uniform-gap", lfmd_derivative="fd"),
    ],
    # lfmd-jvp and MeanFlow: declared before any of their runs (not post hoc like the three above);
    # the EMA rate, fewer/more t = 1 pairs and uniform gaps are the knobs that moved the others.
    "lfmd-jvp": [
        dict(frac_t1=0.0, ema_decay=0.9, lfmd_derivative="jvp"),
        dict(frac_t1=0.1, lfmd_derivative="jvp"),
        dict(frac_t1=0.0, max_gap=0.5, lfmd_derivative="jvp"),
    ],
    "meanflow": [      # of grid 3 (p = 0, lr 1e-4), the one that learned on toy:checkerboard at 600 updates
        dict(frac_t1=0.0, meanflow_p=0.0, lr=1e-4, ema_decay=0.9),
        dict(frac_t1=0.1, meanflow_p=0.0, lr=1e-4),
        dict(frac_t1=0.0, meanflow_p=0.0, lr=1e-4, pairs="uniform-gap"),
    ],
    "ecd": [    # of grid 5 (Delta 1/16, frac_t1 0.5, EMA 0.95): the fastest EMA and largest Delta were edges
        dict(delta=1 / 16, frac_t1=0.5, ema_decay=0.9),
        dict(delta=1 / 8, frac_t1=0.5, ema_decay=0.95),
        dict(delta=1 / 16, frac_t1=0.5, ema_decay=0.9, pairs="uniform-gap"),
    ],
}


def cell_key(stage, toy, loss, cfg_id, seed):
    return f"{stage}/{toy}/{loss}/{cfg_id}/{seed}"


def read_results(out):
    path = os.path.join(out, "results.jsonl")
    if not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return {r["key"]: r for r in rows}


def append_result(out, row):
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- teacher and evaluation

def teacher_path(teachers, toy):
    """The toy's teacher checkpoint: teachers/<toy>/checkpoint.h5, or (teachers None) the default
    teacher of the toy recipe (recipes.TEACHER_RECIPES["toy"]), trained first when missing."""
    if teachers is None:
        return pipeline.ensure_teacher(f"toy:{toy}", progress=False)
    path = os.path.join(teachers, toy, "checkpoint.h5")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no teacher at {path}: run experiments/toy_teachers.py --out {teachers} first, "
                                "or leave --teachers out to use the default teachers")
    return path


class ToyEval:
    """Fixed noise, the teacher's reference solution and held-out data for one toy."""

    def __init__(self, teacher_ckpt, toy, n, n_ref=256):
        self.teacher_ckpt, self.toy = teacher_ckpt, toy
        self.teacher = sampling.load_model(teacher_ckpt, weights="ema", role="teacher")
        self.z = self.teacher.noise(n, seed=0)                       # the same noise for every method
        self.heldout = D.load_dataset(f"toy:{toy}", split="test", n=n).data.astype(np.float64)
        self.x_ref = self.teacher_solve(n_ref, "heun")

    def teacher_solve(self, n, method):
        return self.teacher.generate(self.z, n, method)

    def row(self, x):
        x = np.asarray(x, np.float64)
        return dict(mse=metrics.mse(x, self.x_ref), sw2=metrics.sliced_w2(x, self.heldout),
                    tv=metrics.hist2d_tv(x, self.heldout))

    def teacher_rows(self):
        rows = {"reference": self.row(self.x_ref)}
        for n in STEPS_N:
            rows[f"euler{n}"] = self.row(self.teacher_solve(n, "euler"))
            if n % 2 == 0:
                rows[f"heun{n // 2}"] = self.row(self.teacher_solve(n // 2, "heun"))
        return rows

    def student_rows(self, student_ckpt):
        student = sampling.load_model(student_ckpt, weights="ema", role="student")
        return {n: self.row(student.generate(self.z, n)) for n in STEPS_N}


# ----------------------------------------------------------------------------- one cell

STUDY_LOSS = {"lfmd-jvp": "lfmd"}         # study name -> losses.LOSSES name (the rest are the same)


def split_config(loss, cfg):
    kw = dict(cfg)
    ema_decay = kw.pop("ema_decay", BASE_EMA)
    kw.pop("lr", None)                                         # the cell's learning rate: run_cell
    opts = losses.DistillLossConfig(loss=STUDY_LOSS.get(loss, loss), **kw).validate()
    return opts, ema_decay


def run_cell(teacher_ckpt, toy, loss, cfg, seed, steps, batch, lr, run_dir):
    """Distil one student with pipeline.distill (warm start from the teacher, the training loop
    of the CLI); returns (its checkpoint, seconds per update)."""
    opts, ema_decay = split_config(loss, cfg)
    lr = cfg.get("lr", lr)                                     # a grid entry may set its own (MeanFlow's)
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)                                 # an interrupted cell starts over
    t0 = time.time()
    res = pipeline.distill(f"toy:{toy}", teacher=teacher_ckpt, loss=opts, out=run_dir, evaluate=False,
                           progress=False, steps=steps, batch_size=batch, lr=lr, warmup=50, ema_decay=ema_decay,
                           seed=seed, log_every=max(1, steps // 10), ckpt_every=steps, sample_every=0)
    return res.checkpoint, (time.time() - t0) / steps


def run_cells(cells, teachers, out, steps, batch, lr, eval_n):
    os.makedirs(out, exist_ok=True)
    done = read_results(out)
    evals = {}
    for stage, toy, loss, cfg_id, seed in cells:
        key = cell_key(stage, toy, loss, cfg_id, seed)
        if key in done:
            continue
        if toy not in evals:
            evals[toy] = ToyEval(teacher_path(teachers, toy), toy, eval_n)
            tkey = f"teacher/{toy}"
            if tkey not in done:
                append_result(out, dict(key=tkey, toy=toy, rows=evals[toy].teacher_rows()))
        cfg = (ABLATIONS if stage.endswith("ablate") else GRIDS)[loss][cfg_id]
        ckpt, spu = run_cell(evals[toy].teacher_ckpt, toy, loss, cfg, seed, steps, batch, lr,
                             os.path.join(out, "runs", key.replace("/", "-")))
        rows = evals[toy].student_rows(ckpt)
        row = dict(key=key, stage=stage, toy=toy, loss=loss, cfg_id=cfg_id, cfg=cfg, seed=seed, steps=steps,
                   batch=batch, lr=lr, eval_n=eval_n, s_per_update=spu, rows={str(n): r for n, r in rows.items()})
        append_result(out, row)
        click.echo(f"{key:32s} {spu * 1000:6.1f} ms/update  " +
                   "  ".join(f"N={n}: {r['mse']:.2e}" for n, r in rows.items()))


# ----------------------------------------------------------------------------- selection and report

def score(results, loss, cfg_id, stage="tune"):
    """mean over toys of log10 MSE(N=1) + log10 MSE(N=2); None if a toy is missing."""
    vals = []
    for toy in TOYS:
        r = [v for v in results.values() if v.get("stage") == stage and v["toy"] == toy and v["loss"] == loss
             and v["cfg_id"] == cfg_id]
        if not r:
            return None
        vals.append(math.log10(r[0]["rows"]["1"]["mse"]) + math.log10(r[0]["rows"]["2"]["mse"]))
    return float(np.mean(vals))


def best_configs(results, which=tuple(GRIDS)):
    best = {}
    for loss in which:
        grid = GRIDS[loss]
        scored = [(score(results, loss, i), i) for i in range(len(grid))]
        scored = [(s, i) for s, i in scored if s is not None]
        if not scored:
            raise click.ClickException(f"no complete tuning results for {loss}: run the tune stage first")
        best[loss] = min(scored)[1]
    return best


def mean_se(vals):
    vals = np.asarray(vals, np.float64)
    se = vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else float("nan")
    return float(vals.mean()), float(se)


def _cells(results, stage, loss, cfg_id, toy=None):
    return [v for v in results.values() if v.get("stage") == stage and v["loss"] == loss
            and v["cfg_id"] == cfg_id and (toy is None or v["toy"] == toy)]


def _tuning_rows(results, stage, configs):
    """One markdown row per (loss, configuration) of a tuning stage: the score and N=1 / N=2 per toy."""
    lines = []
    for loss, grid in configs.items():
        for i, cfg in enumerate(grid):
            s = score(results, loss, i, stage)
            cells = []
            for toy in TOYS:
                r = _cells(results, stage, loss, i, toy)
                cells.append(f"{r[0]['rows']['1']['mse']:.2e} / {r[0]['rows']['2']['mse']:.2e}" if r else "-")
            desc = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg.items()) or "defaults"
            label = {"tune": "grid", "ablate": "variation"}[stage]
            lines.append(f"| {loss} | {label} {i}: {desc} | " + (f"{s:.2f}" if s is not None else "-") + " | "
                         + " | ".join(cells) + " |")
    return lines


def report(results):
    lines = ["Tuning (seed 100): score = mean over toys of log10 MSE(N=1) + log10 MSE(N=2) (lower is better)\n",
             "| loss | config | score | " + " | ".join(f"{t} N=1 / N=2" for t in TOYS) + " |",
             "|---|---|---|" + "---|" * len(TOYS)]
    lines += _tuning_rows(results, "tune", GRIDS) + _tuning_rows(results, "ablate", ABLATIONS)
    lines.append("")
    # every (stage, loss, configuration) that has final-seed runs
    finals = sorted({(v["stage"], v["loss"], v["cfg_id"]) for v in results.values()
                     if v.get("stage") in ("final", "final_ablate")},
                    key=lambda k: (list(GRIDS).index(k[1]), k[0], k[2]))
    for metric in ("mse", "tv"):
        lines.append(f"Final (seeds {', '.join(map(str, FINAL_SEEDS))}): {metric}, mean +- standard error\n")
        lines.append("| toy | method | " + " | ".join(f"N={n}" for n in STEPS_N) + " |")
        lines.append("|---|---|" + "---|" * len(STEPS_N))
        for toy in TOYS:
            for stage, loss, cfg_id in finals:
                rs = _cells(results, stage, loss, cfg_id, toy)
                if not rs:
                    continue
                cells = []
                for n in STEPS_N:
                    m, se = mean_se([r["rows"][str(n)][metric] for r in rs])
                    cells.append(f"{m:.2e} +- {se:.1e}" if metric == "mse" else f"{m:.3f} +- {se:.3f}")
                label = f"{loss} ({'grid' if stage == 'final' else 'variation'} {cfg_id}, {len(rs)} seeds)"
                lines.append(f"| {toy} | {label} | " + " | ".join(cells) + " |")
            t = results.get(f"teacher/{toy}")
            if t:
                rows = t["rows"]
                fmt = (lambda r: f"{r[metric]:.2e}") if metric == "mse" else (lambda r: f"{r[metric]:.3f}")
                lines.append(f"| {toy} | teacher Euler N | " + " | ".join(fmt(rows[f'euler{n}']) for n in STEPS_N) + " |")
                lines.append(f"| {toy} | teacher Heun N/2 | - | " +
                             " | ".join(fmt(rows[f'heun{n // 2}']) for n in STEPS_N[1:]) + " |")
                if metric == "tv":
                    lines.append(f"| {toy} | teacher Heun 256 (reference) | {fmt(rows['reference'])} | | | |")
        lines.append("")
    return "\n".join(lines)


def selected(results, loss):
    """The loss's setting with the best tuning score over its grid and its two variations:
    (final stage, cfg_id) whose seeds 0-2 are the loss's reported result."""
    scored = [(score(results, loss, i, "tune"), "final", i) for i in range(len(GRIDS[loss]))]
    scored += [(score(results, loss, i, "ablate"), "final_ablate", i) for i in range(len(ABLATIONS[loss]))]
    best = min((v for v in scored if v[0] is not None), default=None)
    return None if best is None else best[1:]


def verdicts(results, ns=(1, 2)):
    """Cell by cell: ITVM's selected setting against each baseline's (flow-map MSE, seeds 0-2);
    z = (baseline - ITVM) / sqrt(SE_ITVM^2 + SE_baseline^2); a win or loss where |z| > 2."""
    picks = {loss: selected(results, loss) for loss in GRIDS}
    picks = {loss: p for loss, p in picks.items()                         # tuned, with final-seed runs
             if p is not None and _cells(results, p[0], loss, p[1])}
    baselines = [loss for loss in picks if loss != "itvm"]
    names = {"final": "grid", "final_ablate": "variation"}
    lines = ["Selected settings: " + ", ".join(f"{loss} {names[st]} {i}" for loss, (st, i) in picks.items()) + "\n",
             "| toy | N | ITVM | " + " | ".join(f"{b.upper()} | z | verdict vs {b.upper()}" for b in baselines) + " |",
             "|---|---|---|" + "---|---|---|" * len(baselines)]
    for toy in TOYS:
        for n in ns:
            stats = {}
            for loss, (stage, i) in picks.items():
                stats[loss] = mean_se([r["rows"][str(n)]["mse"] for r in _cells(results, stage, loss, i, toy)])
            m0, se0 = stats["itvm"]
            row = f"| {toy} | {n} | {m0:.2e} +- {se0:.1e} |"
            for base in baselines:
                m, se = stats[base]
                z = (m - m0) / math.sqrt(se0 ** 2 + se ** 2)
                verdict = "**ITVM beats**" if z > 2 else "**ITVM loses**" if z < -2 else \
                    f"within noise ({'ITVM' if z > 0 else base.upper()} lower)"
                row += f" {m:.2e} +- {se:.1e} | {z:+.1f} | {verdict} |"
            lines.append(row)
    return "\n".join(lines)


@click.group(context_settings={"show_default": True})
@click.option("--teachers", default=None, help="folder with <toy>/checkpoint.h5 (experiments/toy_teachers.py); "
              "default: the default teachers of the toy recipe (trained when missing)")
@click.option("--out", default="runs/study-toys")
@click.option("--toys", default=",".join(TOYS))
@click.option("--steps", default=600, help="student updates per cell (the same for every loss; 600 of batch 256 "
              "is the quick toy recipe of the no-argument `cli.py distill`)")
@click.option("--batch-size", default=256)
@click.option("--lr", default=1e-3)
@click.option("--eval-n", default=2000)
@click.pass_context
def cli(ctx, teachers, out, toys, steps, batch_size, lr, eval_n):
    ctx.obj = dict(teachers=teachers, out=out, toys=toys.split(","), steps=steps, batch=batch_size, lr=lr,
                   eval_n=eval_n)


def run_stage(o, cells):
    """run_cells with the group's options (teachers, out, budget, evaluation size)."""
    run_cells(cells, o["teachers"], o["out"], o["steps"], o["batch"], o["lr"], o["eval_n"])


def tuning_cells(o, stage, configs, which):
    """Every configuration of `configs` (GRIDS or ABLATIONS) of the chosen losses, per toy, tuning seed."""
    return [(stage, toy, loss, i, TUNE_SEED) for toy in o["toys"] for loss in which.split(",")
            for i in range(len(configs[loss]))]


@cli.command()
@click.option("--losses", "which", default="itvm,lfmd,ecd", help=f"any of {','.join(GRIDS)}")
@click.pass_obj
def tune(o, which):
    run_stage(o, tuning_cells(o, "tune", GRIDS, which))


@cli.command()
@click.option("--losses", "which", default="itvm,lfmd,ecd", help="a loss can start once its own tuning is complete")
@click.pass_obj
def final(o, which):
    best = best_configs(read_results(o["out"]), which.split(","))
    click.echo(f"selected configurations: {best}")
    run_stage(o, [("final", toy, loss, best[loss], seed) for toy in o["toys"] for loss in best for seed in FINAL_SEEDS])


GAPS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


def gap_errors(teacher_ckpt, student_ckpt, toy, n=1000):
    """How far the student's map is right away from the diagonal: for s = 0 and t = g, the MSE
    of one student jump phi(z, 0, g) against the teacher's 128-step Heun solution from 0 to g."""
    tm = sampling.load_model(teacher_ckpt, weights="ema", role="teacher")
    sm = sampling.load_model(student_ckpt, weights="ema", role="student")
    z = tm.noise(n, seed=0)
    out = {}
    for g in GAPS:
        ref = tm.generate(z, 128, "heun", grid=list(np.linspace(0.0, g, 129)))
        out[f"{g:g}"] = metrics.mse(sm.generate(z, 1, grid=[0.0, g]), ref)
    return out


@cli.command()
@click.option("--stage", default="tune")
@click.pass_obj
def gaps(o, stage):
    """Per cell of a stage: one-jump error at gaps 1/16 .. 1 (reads the cells' checkpoints)."""
    results = read_results(o["out"])
    click.echo("| toy | loss | cfg | seed | " + " | ".join(f"g={g:g}" for g in GAPS) + " |")
    click.echo("|---|---|---|---|" + "---|" * len(GAPS))
    for key, r in sorted(results.items()):
        if r.get("stage") != stage or r["toy"] not in o["toys"]:
            continue
        ckpt = os.path.join(o["out"], "runs", key.replace("/", "-"), "checkpoint.h5")
        errs = gap_errors(teacher_path(o["teachers"], r["toy"]), ckpt, r["toy"])
        click.echo(f"| {r['toy']} | {r['loss']} | {r['cfg_id']} | {r['seed']} | " +
                   " | ".join(f"{errs[f'{g:g}']:.2e}" for g in GAPS) + " |")


@cli.command()
@click.option("--losses", "which", default="itvm,lfmd,ecd")
@click.pass_obj
def ablate(o, which):
    run_stage(o, tuning_cells(o, "ablate", ABLATIONS, which))


@cli.command("final-ablate")
@click.option("--loss", type=click.Choice(sorted(ABLATIONS)), default="itvm")
@click.option("--index", type=int, required=True, help="which ablation of the loss to rerun with the final seeds")
@click.pass_obj
def final_ablate(o, loss, index):
    run_stage(o, [("final_ablate", toy, loss, index, seed) for toy in o["toys"] for seed in FINAL_SEEDS])


@cli.command("report")
@click.pass_obj
def report_cmd(o):
    results = read_results(o["out"])
    click.echo(report(results))
    click.echo(verdicts(results))


if __name__ == "__main__":
    cli()
