"""Why MeanFlow barely learned on the toy teachers (docs/results.md, "MeanFlow on the toys: why it barely
learned and what changed"; docs/method.md §5.8). Three small tools, each one quick CPU run:

    # a toy teacher like runs/lfmd_fd_vs_jvp/teacher-3000 (mlp, 3000 steps, seed 0) whose time features
    # have frequency TS (the MLP preset's is 1000; 1 feeds t in [0, 1] to the sinusoids unscaled)
    python experiments/meanflow_toy_probe.py teacher 1 runs/mf_probe/teacher-ts1

    # one distillation through the CLI (every option after -- goes to `cli.py distill`); --diag F sets t = s
    # for a fraction F of the pairs (Geng et al.'s "r = t" share), --times logitnormal draws both times
    # from logit-normal(-0.4, 1) (their sampler) instead of --pairs; appends a line to OUT/../probe.txt
    python experiments/meanflow_toy_probe.py run runs/mf_probe/mf-p1 [--diag 0.75] [--times logitnormal] \
        -- --teacher runs/lfmd_fd_vs_jvp/teacher-3000 --loss meanflow --steps 300

    # the size of the student's exact d/ds u along the teacher's flow against a difference over +-0.01,
    # and the MeanFlow residual, for students (or "warm": the warm start) of a teacher
    python experiments/meanflow_toy_probe.py ripple runs/lfmd_fd_vs_jvp/teacher-3000 warm runs/mf_probe/mf-p1

--diag and --times replace objectives.sample_time_pairs for the run (a probe, not a CLI option).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ttfm_np import objectives  # noqa: E402

EVAL = ["--data", "toy:checkerboard", "--eval-steps", "1,2", "--eval-n", "1000", "--eval-n-ref", "64"]


def train_teacher(time_scale, out):
    import cli
    cli.cli.main(["train", "--data", "toy:checkerboard", "--model", "mlp", "--steps", "3000", "--out", out,
                  "--seed", "0", "--time-scale", str(time_scale)], standalone_mode=False)


def patch_pairs(diag, times):
    original = objectives.sample_time_pairs

    def pairs(rng, n, frac_t1=0.0, max_gap=None, pairs="minmax"):
        if times == "logitnormal":        # Geng et al.: two logit-normal(-0.4, 1) draws, sorted
            a, b = (1.0 / (1.0 + np.exp(-(rng.standard_normal(n) - 0.4))) for _ in range(2))
            s, t = np.minimum(a, b), np.maximum(a, b)
        else:
            s, t = original(rng, n, frac_t1, max_gap, pairs)
        if diag > 0:
            s = np.where(rng.random(n) < diag, t, s)           # r = t: flow matching on the teacher
        return s, t
    objectives.sample_time_pairs = pairs


def run(out, diag, times, args):
    import cli
    patch_pairs(diag, times)
    cli.cli.main(["distill"] + EVAL + ["--out", out] + args, standalone_mode=False)
    with open(os.path.join(out, "eval", "eval.json")) as f:
        rows = {r["method"]: r for r in json.load(f)["rows"]}
    one, two = rows["student 1-step"], rows["student 2-step"]
    line = (f"{os.path.basename(out)} diag={diag} times={times} {' '.join(args)} :: 1-step {one['mse']:.3g} "
            f"2-step {two['mse']:.3g} hist TV {one['hist_tv']:.3f} {two['hist_tv']:.3f}")
    print(line)
    with open(os.path.join(os.path.dirname(os.path.abspath(out)), "probe.txt"), "a") as f:
        f.write(line + "\n")


def ripple(teacher_path, students, n=1000, h=0.01):
    from ttfm_np import data, flow, sampling
    from ttfm_np.model import model_forward, model_jvp
    from ttfm_np.ttfm import student_from_teacher
    tm = sampling.load_model(teacher_path, weights="ema", role="teacher", data="toy:checkerboard")
    rng = np.random.default_rng(1)
    x1 = np.asarray(data.make_toy("checkerboard", n, seed=1), dtype=np.float32)            # (n, 2)
    x0 = rng.standard_normal(x1.shape).astype(np.float32)
    s, t = (a.astype(np.float32) for a in objectives.sample_time_pairs(rng, len(x1)))
    x_s = flow.interpolate(x0, x1, s)
    v = model_forward(tm.params, tm.cfg, x_s, s, None, need_grad=False)[0]
    rms = lambda a: float(np.sqrt((a ** 2).sum(axis=1).mean()))
    for path in students:
        if path == "warm":
            sp, sc = student_from_teacher(tm.params, tm.cfg)
        else:
            sm = sampling.load_model(path, weights="ema", role="student", data="toy:checkerboard")
            sp, sc = sm.params, sm.cfg
        u, du, _ = model_jvp(sp, sc, x_s, s, t, v, 1.0, 0.0, need_grad=False)       # exact d/ds u along (v, 1, 0)
        up = model_forward(sp, sc, x_s + h * v, s + h, t, need_grad=False)[0]
        um = model_forward(sp, sc, x_s - h * v, s - h, t, need_grad=False)[0]
        gap = (t - s)[:, None]
        print(f"{path}: |u| {rms(u):.3g}  |d/ds u| exact {rms(du):.3g}, difference +-{h} {rms((up - um) / (2 * h)):.3g}"
              f"  |residual u - v - (t-s) d/ds u| {rms(u - v - gap * du):.3g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("teacher")
    a.add_argument("time_scale", type=float)
    a.add_argument("out")
    b = sub.add_parser("run")
    b.add_argument("out")
    b.add_argument("--diag", type=float, default=0.0)
    b.add_argument("--times", choices=["pairs", "logitnormal"], default="pairs")
    c = sub.add_parser("ripple")
    c.add_argument("teacher")
    c.add_argument("students", nargs="+")
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    ns = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if ns.cmd == "teacher":
        train_teacher(ns.time_scale, ns.out)
    elif ns.cmd == "run":
        run(ns.out, ns.diag, ns.times, rest)
    else:
        ripple(ns.teacher, ns.students)


if __name__ == "__main__":
    main()
