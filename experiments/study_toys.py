#!/usr/bin/env python
"""The multi-seed toy study (issues 11 and 20): ITVM against LFMD (finite-difference and exact
forward-mode derivative), MeanFlow and ECD, with the same budget and the same tuning effort, on the
four 2-D toys, judged on a per-sample distance AND a distribution distance.

Protocol
  1. tune   every loss gets a grid of the same size (GRIDS, 6 configurations each)
            over its own knobs and the time-pair sampling, run once per toy with the
            tuning seed (100, not one of the reported seeds);
  2. ablate every loss gets 3 post-hoc variations (ABLATIONS) with the same seed, so the
            tuning effort is 9 runs per loss per toy;
  3. select per loss and per metric, the setting with the best score over its grid and its
            variations. Two metrics, two selections (METRICS):
              mse  per-sample distance: the flow-map error, MSE of the student's N-step sample to
                   the teacher's 256-step Heun solution FROM THE SAME NOISE (the toy analogue of
                   the paper's LPIPS to the teacher); score = mean over toys of
                   log10 MSE(N=1) + log10 MSE(N=2);
              tv   distribution distance: total variation between 2-D histograms of the samples
                   and of held-out data (the toy analogue of FID); score = mean over toys of
                   TV(N=1) + TV(N=2);
  4. finals every loss's pick under each metric (one run set when both metrics pick the same) with
            seeds 0, 1, 2 on every toy; each final run is also evaluated at CURVE updates
            (a constant learning rate after warm-up, so U updates are the prefix of the
            longer run): quality against updates, and against wall time with the per-update
            cost that `timing` measures on a quiet machine;
  5. report mean +- standard error over the seeds at N = 1, 2, 4, 8, next to the
            teacher's own Euler N and Heun N/2 on the same noise, one verdict table of ITVM
            against each baseline per metric, and the curves with the updates and seconds each
            loss needs to reach a common target (`report`).

Teachers: one per toy, the same for every loss. `teachers` trains the toy recipe's teacher with
time features of frequency 1 (`train --time-scale 1`): with the MLP preset's 1000 MeanFlow's
update is unstable (docs/results.md, "MeanFlow on the toys"), and a fair comparison needs the
same teacher for every loss.

Every cell: the same teacher per toy (the default teacher of the toy recipe, or --teachers DIR),
a student warm-started from it and trained by pipeline.distill for STEPS updates of batch BATCH,
lr 1e-3, 50 warm-up steps; the EMA weights are evaluated on EVAL_N fixed noise samples (seed 0):
MSE to the teacher's 256-step Heun solution from the same noise, and sliced-W2 / 2-D histogram
total variation to held-out data. Results are JSON lines in
OUT/results.jsonl; a cell already there is skipped, so the script resumes.

    export OPENBLAS_NUM_THREADS=1 S="python experiments/study_toys.py --teachers runs/teachers-ts1 --out runs/study-toys"
    $S teachers                                    # time_scale-1 teachers (12000 steps each)
    $S tune --losses itvm,lfmd,lfmd-jvp,meanflow,ecd
    $S ablate --losses itvm,lfmd,lfmd-jvp,meanflow,ecd
    $S finals --losses itvm,lfmd,lfmd-jvp,meanflow,ecd
    $S timing                                      # ms per update of every pick, one process, quiet machine
    $S report                                      # markdown tables
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
    # meanflow_p: the adaptive weight's power (1 = Geng et al.'s, 0 = plain squared error). The study's
    # teachers have time features of frequency 1, with which MeanFlow's update is stable at the study's
    # learning rate (docs/results.md, "MeanFlow on the toys"); one entry still tries a smaller rate.
    "meanflow": [
        dict(frac_t1=0.0, meanflow_p=1.0),
        dict(frac_t1=0.0, meanflow_p=0.5),
        dict(frac_t1=0.0, meanflow_p=0.0),
        dict(frac_t1=0.25, meanflow_p=0.5),
        dict(frac_t1=0.0, meanflow_p=0.5, ema_decay=0.95),
        dict(frac_t1=0.0, meanflow_p=0.5, lr=3e-4),
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
    "meanflow": [      # of the default p = 0.5: the knobs that moved the other losses
        dict(frac_t1=0.0, meanflow_p=0.5, ema_decay=0.9),
        dict(frac_t1=0.1, meanflow_p=0.5),
        dict(frac_t1=0.0, meanflow_p=0.5, pairs="uniform-gap"),
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


def run_cell(teacher_ckpt, toy, loss, cfg, seed, steps, batch, lr, run_dir, curve=(), evaluate=None):
    """Distil one student with pipeline.distill (warm start from the teacher, the training loop
    of the CLI) -> (its checkpoint after `steps` updates, seconds per update, {U: evaluate(ckpt)}).

    curve: further update counts U at which `evaluate` (checkpoint -> rows) is called. The run is
    trained in segments up to each U (resumed, with a constant learning rate after warm-up the
    same updates as one long run); the checkpoint after `steps` is copied aside (`steps.h5`)."""
    opts, ema_decay = split_config(loss, cfg)
    lr = cfg.get("lr", lr)                                     # a grid entry may set its own (MeanFlow's)
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)                                 # an interrupted cell starts over
    budgets = sorted(set(curve) | {steps})
    train_seconds, at_steps, evals = 0.0, None, {}
    for i, updates in enumerate(budgets):
        t0 = time.time()
        res = pipeline.distill(f"toy:{toy}", teacher=teacher_ckpt, loss=opts, out=run_dir, evaluate=False,
                               progress=False, steps=updates, batch_size=batch, lr=lr, warmup=50,
                               ema_decay=ema_decay, seed=seed, resume=i > 0, log_every=max(1, steps // 10),
                               ckpt_every=updates, sample_every=0)
        train_seconds += time.time() - t0
        if updates == steps:
            at_steps = res.checkpoint
            if len(budgets) > 1:
                at_steps = os.path.join(run_dir, "steps.h5")
                shutil.copyfile(res.checkpoint, at_steps)
        if evaluate is not None and len(budgets) > 1:
            evals[updates] = evaluate(res.checkpoint)
    return at_steps, train_seconds / budgets[-1], evals


def run_cells(cells, teachers, out, steps, batch, lr, eval_n, curve=()):
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
        ckpt, spu, curve_rows = run_cell(evals[toy].teacher_ckpt, toy, loss, cfg, seed, steps, batch, lr,
                                         os.path.join(out, "runs", key.replace("/", "-")), curve,
                                         evals[toy].student_rows)
        rows = curve_rows.get(steps) or evals[toy].student_rows(ckpt)
        row = dict(key=key, stage=stage, toy=toy, loss=loss, cfg_id=cfg_id, cfg=cfg, seed=seed, steps=steps,
                   batch=batch, lr=lr, eval_n=eval_n, s_per_update=spu, rows={str(n): r for n, r in rows.items()})
        if curve_rows:
            row["curve"] = {str(u): {str(n): r for n, r in rs.items()} for u, rs in curve_rows.items()}
        append_result(out, row)
        click.echo(f"{key:32s} {spu * 1000:6.1f} ms/update  " +
                   "  ".join(f"N={n}: {r['mse']:.2e}/{r['tv']:.3f}" for n, r in rows.items()), err=False)


# ----------------------------------------------------------------------------- selection and report

# The two ways a setting is judged: a per-sample distance and a distribution distance (module docstring).
METRICS = {
    "mse": dict(name="flow-map MSE to the teacher (per sample)", log=True, fmt="{:.2e}", se_fmt="{:.1e}"),
    "tv": dict(name="2-D histogram TV to held-out data (distribution)", log=False, fmt="{:.3f}", se_fmt="{:.3f}"),
}


def score(results, loss, cfg_id, stage="tune", metric="mse"):
    """mean over toys of f(metric at N=1) + f(metric at N=2), f = log10 for mse and the identity for
    tv; None if a toy is missing. Lower is better for both."""
    f = math.log10 if METRICS[metric]["log"] else float
    vals = []
    for toy in TOYS:
        r = [v for v in results.values() if v.get("stage") == stage and v["toy"] == toy and v["loss"] == loss
             and v["cfg_id"] == cfg_id]
        if not r:
            return None
        vals.append(f(r[0]["rows"]["1"][metric]) + f(r[0]["rows"]["2"][metric]))
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


def selected(results, loss, metric="mse"):
    """The loss's setting with the best tuning score (under `metric`) over its grid and its three
    variations: (final stage, cfg_id) whose seeds 0-2 are the loss's reported result."""
    scored = [(score(results, loss, i, "tune", metric), "final", i) for i in range(len(GRIDS[loss]))]
    scored += [(score(results, loss, i, "ablate", metric), "final_ablate", i) for i in range(len(ABLATIONS[loss]))]
    best = min((v for v in scored if v[0] is not None), default=None)
    return None if best is None else best[1:]


def verdicts(results, ns=(1, 2), metric="mse"):
    """Cell by cell: ITVM's setting selected under `metric` against each baseline's (seeds 0-2);
    z = (baseline - ITVM) / sqrt(SE_ITVM^2 + SE_baseline^2); a win or loss where |z| > 2."""
    picks = {loss: selected(results, loss, metric) for loss in GRIDS}
    picks = {loss: p for loss, p in picks.items()                         # tuned, with final-seed runs
             if p is not None and _cells(results, p[0], loss, p[1])}
    if "itvm" not in picks:
        return f"(no verdicts on {metric}: ITVM's selected setting has no final runs yet)"
    baselines = [loss for loss in picks if loss != "itvm"]
    names = {"final": "grid", "final_ablate": "variation"}
    fmt, se_fmt = METRICS[metric]["fmt"], METRICS[metric]["se_fmt"]
    lines = [f"Verdicts on {METRICS[metric]['name']}, settings selected on it: "
             + ", ".join(f"{loss} {names[st]} {i}" for loss, (st, i) in picks.items()) + "\n",
             "| toy | N | ITVM | " + " | ".join(f"{b.upper()} | z | verdict vs {b.upper()}" for b in baselines) + " |",
             "|---|---|---|" + "---|---|---|" * len(baselines)]
    for toy in TOYS:
        for n in ns:
            stats = {}
            for loss, (stage, i) in picks.items():
                stats[loss] = mean_se([r["rows"][str(n)][metric] for r in _cells(results, stage, loss, i, toy)])
            m0, se0 = stats["itvm"]
            row = f"| {toy} | {n} | {fmt.format(m0)} +- {se_fmt.format(se0)} |"
            for base in baselines:
                m, se = stats[base]
                z = (m - m0) / math.sqrt(se0 ** 2 + se ** 2) if se0 + se > 0 else float("nan")
                verdict = "**ITVM beats**" if z > 2 else "**ITVM loses**" if z < -2 else \
                    f"within noise ({'ITVM' if z > 0 else base.upper()} lower)"
                row += f" {fmt.format(m)} +- {se_fmt.format(se)} | {z:+.1f} | {verdict} |"
            lines.append(row)
    return "\n".join(lines)


def final_picks(results, which):
    """{(stage, cfg_id) of a final run set: the metrics that selected it} for each loss in `which`."""
    picks = {}
    for loss in which:
        for metric in METRICS:
            pick = selected(results, loss, metric)
            if pick is None:
                raise click.ClickException(f"no complete tuning results for {loss}: run tune and ablate first")
            picks.setdefault((loss,) + pick, []).append(metric)
    return picks


def curve_table(results, metric, n=1, steps=600):
    """Mean over the seeds of `metric` at N = n against updates, for each loss's pick under `metric`;
    then the updates and seconds (updates x the loss's clean ms/update from `timing`) each loss needs
    to reach a common target: per toy, ITVM's own value after the study's budget (`steps` updates),
    i.e. how long every loss takes to match ITVM's quality (log-linear interpolation between the
    measured counts; "<= U" when the first count is already there, "> U" when the last is not)."""
    timing = {r["loss"]: r["ms_per_update"] for r in results.values() if r.get("stage") == "timing"}
    picks = {loss: selected(results, loss, metric) for loss in GRIDS}
    fmt = METRICS[metric]["fmt"]
    lines, budgets = [], None
    for toy in TOYS:
        curves = {}
        for loss, pick in picks.items():
            rs = [r for r in _cells(results, pick[0], loss, pick[1], toy) if "curve" in r] if pick else []
            if rs:
                us = sorted(int(u) for u in rs[0]["curve"])
                curves[loss] = (us, [float(np.mean([r["curve"][str(u)][str(n)][metric] for r in rs])) for u in us])
        if "itvm" not in curves or steps not in curves["itvm"][0]:
            continue
        if budgets is None:
            budgets = curves["itvm"][0]
            lines += [f"{METRICS[metric]['name']} at N = {n} against updates (mean of the final seeds; pick "
                      f"selected on {metric}); updates and seconds to reach ITVM's value at {steps} updates\n",
                      "| toy | loss | " + " | ".join(f"{u} upd." for u in budgets)
                      + " | target | updates to target | seconds to target |",
                      "|---|---|" + "---|" * len(budgets) + "---|---|---|"]
        us_i, vs_i = curves["itvm"]
        target = vs_i[us_i.index(steps)]
        for loss, (us, vs) in curves.items():
            reach = updates_to(us, vs, target)
            ms = timing.get(loss)
            if reach is None:
                upd, secs = f"> {us[-1]}", "-" if ms is None else f"> {us[-1] * ms / 1e3:.1f}"
            else:
                first = reach == us[0] and vs[0] <= target
                upd = f"<= {us[0]}" if first else f"{reach:.0f}"
                secs = "-" if ms is None else (f"<= {reach * ms / 1e3:.1f}" if first else f"{reach * ms / 1e3:.1f}")
            lines.append(f"| {toy} | {loss} | " + " | ".join(fmt.format(v) for v in vs) + f" | {fmt.format(target)} | "
                         f"{upd} | {secs} |")
    return "\n".join(lines)


def updates_to(us, vs, target):
    """First update count where the curve (us, vs) is at or below target, interpolated linearly in
    log(updates) between the measured counts; None if it never gets there."""
    for i, (u, v) in enumerate(zip(us, vs)):
        if v <= target:
            if i == 0:
                return float(u)
            u0, v0 = us[i - 1], vs[i - 1]
            frac = (v0 - target) / (v0 - v) if v0 != v else 1.0
            return float(math.exp(math.log(u0) + frac * (math.log(u) - math.log(u0))))
    return None


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
@click.option("--curve", default="150,300,1200", help="finals: further update counts at which every final run "
              "is evaluated (quality against updates)")
@click.pass_context
def cli(ctx, teachers, out, toys, steps, batch_size, lr, eval_n, curve):
    ctx.obj = dict(teachers=teachers, out=out, toys=toys.split(","), steps=steps, batch=batch_size, lr=lr,
                   eval_n=eval_n, curve=tuple(int(u) for u in curve.split(",") if u))


def run_stage(o, cells, curve=()):
    """run_cells with the group's options (teachers, out, budget, evaluation size)."""
    run_cells(cells, o["teachers"], o["out"], o["steps"], o["batch"], o["lr"], o["eval_n"], curve)


@cli.command()
@click.option("--time-scale", default=1.0, help="frequency of the teachers' time features")
@click.pass_obj
def teachers(o, time_scale):
    """Train the toy recipe's teacher (mlp, 12000 updates of batch 512) for every toy into
    --teachers/<toy>/ (resumed when interrupted, reused when finished)."""
    if not o["teachers"]:
        raise click.ClickException("give --teachers DIR: the folder the teachers are written to")
    for toy in o["toys"]:
        pipeline.train_teacher(f"toy:{toy}", out=os.path.join(o["teachers"], toy), time_scale=time_scale,
                               resume=True, progress=False)
        click.echo(f"teacher: {os.path.join(o['teachers'], toy, 'checkpoint.h5')}")


def tuning_cells(o, stage, configs, which):
    """Every configuration of `configs` (GRIDS or ABLATIONS) of the chosen losses, per toy, tuning seed."""
    return [(stage, toy, loss, i, TUNE_SEED) for toy in o["toys"] for loss in which.split(",")
            for i in range(len(configs[loss]))]


@cli.command()
@click.option("--losses", "which", default=",".join(GRIDS), help="any of these")
@click.pass_obj
def tune(o, which):
    run_stage(o, tuning_cells(o, "tune", GRIDS, which))


ALL_LOSSES = ",".join(GRIDS)


@cli.command()
@click.option("--losses", "which", default=ALL_LOSSES, help="a loss can start once its own tune and ablate are complete")
@click.pass_obj
def finals(o, which):
    """Every loss's pick under each metric (selected over grid and variations) with seeds 0, 1, 2,
    each evaluated at --curve update counts too."""
    picks = final_picks(read_results(o["out"]), which.split(","))
    for (loss, stage, i), metrics_ in picks.items():
        click.echo(f"{loss}: {stage} {i} (selected on {', '.join(metrics_)})")
    run_stage(o, [(stage, toy, loss, i, seed) for (loss, stage, i) in picks for toy in o["toys"]
                  for seed in FINAL_SEEDS], o["curve"])


@cli.command()
@click.option("--toy", default="checkerboard")
@click.option("--updates", default=300)
@click.pass_obj
def timing(o, toy, updates):
    """Clean cost per update of each loss's pick (selected on mse), one run after another in this
    process: run it on an otherwise quiet machine. Wall time between the first and last metrics line."""
    results = read_results(o["out"])
    teacher = teacher_path(o["teachers"], toy)
    for loss in GRIDS:
        pick = selected(results, loss, "mse")
        if pick is None:
            continue
        cfg = (ABLATIONS if pick[0] == "final_ablate" else GRIDS)[loss][pick[1]]
        opts, ema_decay = split_config(loss, cfg)
        run_dir = os.path.join(o["out"], "runs", f"timing-{loss}")
        shutil.rmtree(run_dir, ignore_errors=True)
        res = pipeline.distill(f"toy:{toy}", teacher=teacher, loss=opts, out=run_dir, evaluate=False, progress=False,
                               steps=updates, batch_size=o["batch"], lr=cfg.get("lr", o["lr"]), warmup=50,
                               ema_decay=ema_decay, seed=0, log_every=50, ckpt_every=updates, sample_every=0)
        with open(os.path.join(res.out, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        first, last = lines[0], lines[-1]
        ms = 1e3 * (last["time_s"] - first["time_s"]) / (last["step"] - first["step"])
        row = dict(key=f"timing/{loss}", stage="timing", loss=loss, toy=toy, pick=list(pick), ms_per_update=ms,
                   batch=o["batch"], threads=os.environ.get("OPENBLAS_NUM_THREADS"), cpu=_cpu_name())
        results[row["key"]] = row
        append_result(o["out"], row)
        click.echo(f"{loss:10s} {ms:6.2f} ms/update")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


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
@click.option("--losses", "which", default=",".join(GRIDS))
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
    for metric in METRICS:
        click.echo(verdicts(results, metric=metric) + "\n")
    for metric in METRICS:
        click.echo(curve_table(results, metric, steps=o["steps"]) + "\n")


if __name__ == "__main__":
    cli()
