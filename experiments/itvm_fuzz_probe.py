"""Why are 1-step ITVM samples fuzzier than LFMD's (issue 20 item 5)? docs/results.md, "Why 1-step ITVM samples
are fuzzier (issue 20 item 5, probe)". Every run is the CLI's quick toy recipe (`distill --recipe quick`: the
quick teacher, 2000 updates of batch 256 unless --steps says otherwise; points: files get their only recipe,
the full toy one: 2000 updates of batch 512), resumable, and prints its CLI line.

    export TTFM_DATA=/work/ttfm_data_fuzz            # teachers and the rings file live there
    python experiments/itvm_fuzz_probe.py rings      # writes $TTFM_DATA/rings.npy (3 noisy rings, for points:)
    # (a) quality against updates, ITVM vs LFMD: flow-map MSE and hist TV at 1, 2, 4 steps
    python experiments/itvm_fuzz_probe.py curves --data toy:checkerboard --budgets 500,1000,2000,4000
    # (c) ITVM settings aimed at the long jump, at the default budget (NAME=--option value,...)
    python experiments/itvm_fuzz_probe.py settings --data toy:checkerboard
    # (b) where the 1-step error lives (run folders of finished runs)
    python experiments/itvm_fuzz_probe.py where --data toy:checkerboard RUN [RUN ...]

`where` compares a student's 1-step map S(z) with the teacher's reference map T(z) (Heun 256; Heun 32 inside the stretch and blur estimates) on 2000 noise
samples: the error ||S - T|| binned by the local stretch of T at z (largest singular value of its Jacobian by
central differences; large where z sits on a boundary between two basins, i.e. where the teacher fans out to
two modes), the share of samples that land between the modes (histogram cells of the data with almost no
mass), and a blur test: the distance of S to the teacher's map averaged over a Gaussian neighbourhood of z,
T_sigma(z) = E_d T(z + sigma d). A student that averages over the teacher's fan-out is closer to some
T_sigma (sigma > 0) than to T itself; a biased one is not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from runner import cli_equivalent, seconds_per_update  # noqa: E402  (experiments/runner.py, beside this file)
from ttfm_np import data as data_mod, pipeline, recipes, sampling  # noqa: E402
from ttfm_np.losses import DistillLossConfig  # noqa: E402

OUT = "runs/itvm_fuzz"
EVAL_STEPS = (1, 2, 4)
EVAL_N = 2000
# (c): ITVM settings that target the long jump (CLI option -> value); "default" is the CLI's ITVM
SETTINGS = {
    "default": {},
    "uniform-gap": dict(pairs="uniform-gap"),
    "frac-t1-0.25": dict(frac_t1=0.25),
    "lambda-term-2": dict(lambda_term=2.0),
    "lambda-term-4": dict(lambda_term=4.0),
}
SIGMAS = (0.0, 0.03, 0.06, 0.1, 0.2)


def slug(data):
    return recipes.slug(data)


def quick(data):
    """The CLI's default recipe: quick for toy: data, the (only) toy recipe for points: files (as cli.py)."""
    return recipes.family(data) == "toy"


def run_one(data, name, loss_opts, steps, seed):
    """One quick-recipe distillation (resumed when it stopped, reused when finished) -> its eval rows."""
    loss = DistillLossConfig(**loss_opts)
    out = os.path.join(OUT, slug(data), f"{name}-s{seed}-u{steps}")
    recipe = "quick" if quick(data) else None
    print("$ " + cli_equivalent("distill", data=data, recipe=recipe, **loss_opts, steps=steps, seed=seed,
                                eval_steps=list(EVAL_STEPS), eval_n=EVAL_N, out=out, resume=True), flush=True)
    done = os.path.join(ROOT, out, "probe_rows.json")
    if not os.path.exists(done):
        finish(data, loss, out, steps, seed, done)
    with open(done) as f:
        rows = json.load(f)
    with open(os.path.join(ROOT, out, "metrics.jsonl")) as f:          # wall time per update (this machine)
        rows["ms_per_update"] = 1e3 * seconds_per_update([json.loads(line) for line in f])
    return rows


def finish(data, loss, out, steps, seed, done):
    result = pipeline.distill(data, loss=loss, out=os.path.join(ROOT, out), quick=quick(data), resume=True,
                              eval_steps=EVAL_STEPS, eval_n=EVAL_N, progress=False, steps=steps, seed=seed)
    rows = {r["method"]: r for r in result.rows}
    with open(done, "w") as f:
        json.dump(rows, f)


def row_line(label, rows):
    cells = []
    for n in EVAL_STEPS:
        r = rows[f"student {n}-step"]
        cells.append(f"{r['mse']:.2e} / {r['hist_tv']:.3f}")
    ref = next(r for m, r in rows.items() if "(reference)" in m)        # the teacher's own TV: the floor
    return f"| {label} | " + " | ".join(cells) + f" | {ref['hist_tv']:.3f} | {rows['ms_per_update']:.1f} |"


def header(first):
    return (f"| {first} | " + " | ".join(f"{n}-step MSE / TV" for n in EVAL_STEPS) + " | teacher ref. TV | ms/update |\n|"
            + "---|" * (3 + len(EVAL_STEPS)))


def curves(args):
    lines = [header("loss, updates")]
    for seed in args.seeds:
        for loss in ("itvm", "lfmd"):
            for steps in args.budgets:
                rows = run_one(args.data, loss, dict(loss=loss), steps, seed)
                lines.append(row_line(f"{loss} s{seed} {steps}", rows))
                print(lines[-1], flush=True)
    report(args, "curves", lines)


def settings(args):
    lines = [header("ITVM setting")]
    for seed in args.seeds:
        for name in args.names or SETTINGS:
            opts = dict(loss="itvm", **SETTINGS[name])
            rows = run_one(args.data, "itvm" if name == "default" else f"itvm-{name}", opts, args.steps, seed)
            lines.append(row_line(f"{name} s{seed}", rows))
            print(lines[-1], flush=True)
    report(args, "settings", lines)


def report(args, kind, lines):
    path = os.path.join(ROOT, OUT, slug(args.data), f"{kind}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"table: {path}")


# ----------------------------------------------------------------------------- (b) where the error lives

def local_jacobian(T, z, eps=0.02):
    """The Jacobian dT/dz of the map T at each z (N, 2) -> (N, 2, 2), by central differences."""
    cols = []
    for k in range(z.shape[1]):
        d = np.zeros_like(z)
        d[:, k] = eps
        cols.append((T(z + d) - T(z - d)) / (2 * eps))            # (N, 2): dT/dz_k
    return np.stack(cols, axis=2)                                   # (N, 2, 2)


def local_stretch(T, z, eps=0.02):
    """Largest singular value of the Jacobian of the map T at each z (N, 2), by central differences."""
    return np.linalg.svd(local_jacobian(T, z, eps), compute_uv=False)[:, 0]


def gap_mask(points, heldout, bins=32, min_share=0.2):
    """True for points in histogram cells of the held-out data with under min_share of the mean mass of an
    occupied cell (between the modes), or outside the data's grid (the grid of metrics.hist2d_tv)."""
    lo, hi = heldout.min(axis=0), heldout.max(axis=0)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def cells(x):
        ij = np.floor((x - lo) / (hi - lo) * bins).astype(np.int64)
        inside = ((ij >= 0) & (ij < bins)).all(axis=1)
        return np.clip(ij, 0, bins - 1), inside

    ij, _ = cells(heldout)
    counts = np.zeros((bins, bins))
    np.add.at(counts, (ij[:, 0], ij[:, 1]), 1)
    threshold = min_share * counts[counts > 0].mean()
    ij, inside = cells(points)
    return ~inside | (counts[ij[:, 0], ij[:, 1]] < threshold)


def blur_distances(S, T, z, sigmas, k=8, seed=0):
    """RMS distance of S(z) to T_sigma(z) = mean_j T(z + sigma d_j), d_j ~ N(0, I), for each sigma."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((k,) + z.shape).astype(z.dtype)       # (k, N, 2), the same draws for every sigma
    out = {}
    for sigma in sigmas:
        Ts = T(z) if sigma == 0 else np.mean([T(z + sigma * dj) for dj in d], axis=0)
        out[sigma] = float(np.sqrt(np.mean(np.sum((S - Ts) ** 2, axis=1))))
    return out


def error_roughness(S_map, T, z, delta=0.03, seed=1):
    """RMS of e(z) - e(z + delta u) over sqrt(2) RMS e, e = S - T, u a random unit vector: about 0 for an
    error that is a smooth field over z (a bias that moves whole regions), about 1 for an error that is
    independent between neighbouring noise samples (jitter)."""
    u = np.random.default_rng(seed).standard_normal(z.shape)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    z2 = z + delta * u
    e1, e2 = S_map(z) - T(z), S_map(z2) - T(z2)
    return float(np.sqrt(np.mean(np.sum((e1 - e2) ** 2, axis=1)) / (2 * np.mean(np.sum(e1 ** 2, axis=1)))))


def where(args):
    teacher_path = pipeline.ensure_teacher(args.data, quick=quick(args.data))
    tm = sampling.load_model(teacher_path, weights="ema", role="teacher", data=args.data)
    z = tm.noise(EVAL_N, 0)                                       # the evaluation's noise (seed 0)

    def T(x, steps=32):                                           # the teacher's map, Heun 32 (cheaper than 256)
        return np.asarray(tm.generate(x.astype(np.float32), steps, "heun", chunk=4096), dtype=np.float64)

    T_ref = np.asarray(tm.generate(z, 256, "heun", chunk=4096), dtype=np.float64)
    J_T = local_jacobian(T, z)
    stretch = np.linalg.svd(J_T, compute_uv=False)[:, 0]
    logdet_T = np.log(np.abs(np.linalg.det(J_T)) + 1e-12)
    q = np.quantile(stretch, [0.5, 0.9])
    bins = {"stretch < median": stretch < q[0], "median..p90": (stretch >= q[0]) & (stretch < q[1]),
            "top 10 %": stretch >= q[1]}
    name = args.data.split(":", 1)[1] if ":" in args.data else args.data
    kind, _, path = args.data.partition(":")
    heldout = (data_mod.make_toy(name, 20000, seed=12345) if kind == "toy"
               else data_mod.load_points(os.path.join(recipes.data_root(), path) if not os.path.isabs(path)
                                         else path, split="test")).astype(np.float64)
    print(f"teacher reference: share between modes {gap_mask(T_ref, heldout).mean():.3f}; stretch median "
          f"{q[0]:.2f}, p90 {q[1]:.2f}")
    lines = ["| run | steps | RMS err | " + " | ".join(f"RMS {b}" for b in bins) + " | top-10 % share of sq. err "
             "| between modes | roughness | area ratio below median | " + " | ".join(f"to T_{s:g}" for s in SIGMAS) + " |",
             "|" + "---|" * (7 + len(bins) + len(SIGMAS))]
    for run in args.runs:
        sm = sampling.load_model(run, weights="ema", role="student", data=args.data)
        for n in (1, 2):
            S = np.asarray(sm.generate(z, n, chunk=4096), dtype=np.float64)
            sq = np.sum((S - T_ref) ** 2, axis=1)                  # (N,) per-sample squared error
            per_bin = [np.sqrt(sq[m].mean()) for m in bins.values()]
            top = sq[bins["top 10 %"]].sum() / sq.sum()
            blur = blur_distances(S, T, z, SIGMAS) if n == 1 else {s: float("nan") for s in SIGMAS}
            rough = error_roughness(lambda x: np.asarray(sm.generate(x.astype(np.float32), n, chunk=4096),
                                                         dtype=np.float64), T, z)
            # median of |det dS/dz| / |det dT/dz| where T contracts most (the mode interiors): > 1 = the
            # student spreads a mode's noise over a larger area than the teacher (wider, fuzzier modes)
            J_S = local_jacobian(lambda x: np.asarray(sm.generate(x.astype(np.float32), n, chunk=4096),
                                                      dtype=np.float64), z)
            low = bins["stretch < median"]
            area = float(np.exp(np.median((np.log(np.abs(np.linalg.det(J_S)) + 1e-12) - logdet_T)[low])))
            lines.append(f"| {os.path.basename(run.rstrip('/'))} | {n} | {np.sqrt(sq.mean()):.3f} | "
                         + " | ".join(f"{v:.3f}" for v in per_bin)
                         + f" | {top:.2f} | {gap_mask(S, heldout).mean():.3f} | {rough:.2f} | {area:.2f} | "
                         + " | ".join(f"{blur[s]:.3f}" for s in SIGMAS) + " |")
            print(lines[-1], flush=True)
    report(args, "where", lines)


def make_rings(args):
    """Three noisy concentric rings (radii 1, 2, 3; noise 0.08), 40000 points, standardised scale."""
    rng = np.random.default_rng(0)
    n = 40000
    r = rng.choice([1.0, 2.0, 3.0], size=n, p=[1 / 6, 2 / 6, 3 / 6])         # uniform density along the arcs
    a = rng.uniform(0, 2 * np.pi, n)
    x = np.stack([r * np.cos(a), r * np.sin(a)], axis=1) + 0.08 * rng.standard_normal((n, 2))
    path = os.path.join(recipes.data_root(), "rings.npy")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, x.astype(np.float32))
    print(f"wrote {path}: use --data points:{path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("curves", "settings", "where"):
        c = sub.add_parser(name)
        c.add_argument("--data", default="toy:checkerboard")
        c.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0])
        if name == "curves":
            c.add_argument("--budgets", type=lambda s: [int(v) for v in s.split(",")], default=[500, 1000, 2000, 4000])
        if name == "settings":
            c.add_argument("--steps", type=int, default=2000)
            c.add_argument("--names", type=lambda s: s.split(","), default=None)
        if name == "where":
            c.add_argument("runs", nargs="+")
    sub.add_parser("rings")
    args = p.parse_args(argv)
    {"curves": curves, "settings": settings, "where": where, "rings": make_rings}[args.cmd](args)


if __name__ == "__main__":
    main()
