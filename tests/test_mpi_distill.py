"""`mpiexec -n 2 python cli.py distill ...` equals one process: the printed table, eval.json and
the checkpoint (the real launcher and the real command line, in subprocesses); `train` and
`eval` too.

In float64 the claim is equality to 1e-10 (relative): two ranks
take 8 rows each of every global batch of 16 and sum their weighted gradients, one
process takes 16 rows; the two differ only in the order of float64 additions and in
GEMM shapes, i.e. by a few units of 1.1e-16 per operation, amplified over 12 Adam
steps and the evaluation's ODE steps by far less than the 1e6 that would reach 1e-10
(measured: below 1e-13).
The table is printed with 4 significant digits, so at 1e-10 its text is the same
(unless a number sat within 1e-10 of a rounding boundary of the 4th digit).
In float32 (the default dtype; `eval` always) the results are compared within the
tolerances derived in tests/float_bounds.py.

Skipped with the reason when mpi4py or mpiexec is missing (pip install -e .[mpi]).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_distributed import needs_mpi

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLI = os.path.join(ROOT, "cli.py")
SCRIPT = os.path.join(HERE, "dist_scripts.py")

pytestmark = needs_mpi

STEPS = 12
# float64 distillation of the session's teacher: 12 updates of a global batch of 16, evaluated on 64 noise rows
DISTILL = ["--data", "toy:moons", "--dtype", "float64", "--batch-size", "16", "--lr", "1e-2", "--warmup", "2",
           "--seed", "3", "--eval-steps", "1,2", "--eval-n", "64", "--eval-n-ref", "8", "--device", "cpu"]
RTOL = 1e-10


def run(k, *args, data_root, script=None):
    """cli.py ARGS (or dist_scripts.py cli ARGS) with k ranks under mpiexec, k = 1 without a launcher."""
    prog = [CLI] if script is None else [SCRIPT, script]
    cmd = ([] if k == 1 else ["mpiexec", "-n", str(k)]) + [sys.executable, *prog, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", TTFM_DEVICE="cpu",
               TTFM_DATA=str(data_root))
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)   # only a hang
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A float64 mlp-tiny teacher of toy:moons, trained by one process (300 steps, under a second)."""
    d = tmp_path_factory.mktemp("teacher")
    run(1, "train", "--data", "toy:moons", "--model", "mlp-tiny", "--steps", 300, "--batch-size", 64, "--lr",
        "1e-2", "--dtype", "float64", "--device", "cpu", "--out", d / "T", data_root=d / "data")
    return str(d / "T" / "checkpoint.h5")


@pytest.fixture(scope="module")
def one_process(teacher, tmp_path_factory):
    """The reference: `cli.py distill` for 12 steps in one process."""
    d = tmp_path_factory.mktemp("one")
    out = run(1, "distill", *DISTILL, "--teacher", teacher, "--steps", STEPS, "--out", d / "run",
              data_root=d / "data")
    return str(d / "run"), out.stdout


def _table(stdout):
    """The evaluation table's lines (header and rows) in a command's stdout."""
    lines = stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("method"))
    return [l for l in lines[start:] if l.strip()]


def _state(run_dir):
    from ttfm_np import ckpt
    return ckpt.load_checkpoint(os.path.join(run_dir, "checkpoint.h5"))


def _close(a, b, what, rtol=RTOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
    err = float(np.abs(a - b).max(initial=0.0))
    assert err <= rtol * scale, f"{what}: max difference {err:.3g} > {rtol:g} x {scale:.3g}"


def assert_same_run(run_dir, stdout, ref_dir, ref_stdout):
    """Checkpoint (params, EMA, Adam moments, step, data position), eval.json and printed table."""
    a, b = _state(run_dir), _state(ref_dir)
    assert a["step"] == b["step"] == STEPS
    for group in ("params", "ema"):
        assert sorted(a[group]) == sorted(b[group])
        for k in b[group]:
            _close(a[group][k], b[group][k], f"{group}.{k}")
    for k in b["opt_state"].m:
        _close(a["opt_state"].m[k], b["opt_state"].m[k], f"adam m {k}")
        _close(a["opt_state"].v[k], b["opt_state"].v[k], f"adam v {k}")
    assert a["rng_state"]["data"] == b["rng_state"]["data"]
    rows = json.load(open(os.path.join(run_dir, "eval", "eval.json")))["rows"]
    ref_rows = json.load(open(os.path.join(ref_dir, "eval", "eval.json")))["rows"]
    assert [r["method"] for r in rows] == [r["method"] for r in ref_rows]
    for r, q in zip(rows, ref_rows):
        for key in ("mse", "sw2"):
            _close(r[key], q[key], f"eval.json {r['method']} {key}")
        # hist TV counts points per cell: it changes only if a point moves across a cell edge,
        # which a 1e-13 perturbation does only for a point within 1e-13 of an edge (never, in practice)
        assert r["hist_tv"] == q["hist_tv"], (r, q)
        assert r["nfe"] == q["nfe"]
    assert _table(stdout) == _table(ref_stdout)          # rank 0 alone printed, the same numbers


@pytest.mark.parametrize("ckpt_every", [None, 5], ids=["fresh", "ckpt-every-5"])
def test_two_ranks_distill_equals_one_process(teacher, one_process, tmp_path, ckpt_every):
    """A fresh run (the checkpoint written once, at the end) and one with --ckpt-every 5 (so that an
    older checkpoint exists while rank 0 writes the last one): rank 1 must evaluate the final student."""
    extra = [] if ckpt_every is None else ["--ckpt-every", ckpt_every]
    out = run(2, "distill", *DISTILL, *extra, "--teacher", teacher, "--steps", STEPS, "--out", tmp_path / "run",
              data_root=tmp_path / "data")
    assert_same_run(str(tmp_path / "run"), out.stdout, *one_process)


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_resume_on_another_rank_count_equals_one_process(teacher, one_process, tmp_path, first, then):
    """6 steps with `first` ranks, --resume to 12 with `then` ranks = 12 steps in one process."""
    run(first, "distill", *DISTILL, "--teacher", teacher, "--steps", STEPS // 2, "--out", tmp_path / "run",
        data_root=tmp_path / "data")
    assert _state(str(tmp_path / "run"))["step"] == STEPS // 2
    out = run(then, "distill", *DISTILL, "--teacher", teacher, "--steps", STEPS, "--resume", "--out",
              tmp_path / "run", data_root=tmp_path / "data")
    assert_same_run(str(tmp_path / "run"), out.stdout, *one_process)


def test_teacher_trained_first_under_two_ranks_equals_one_process(tmp_path):
    """The README's pattern with no teacher yet: `distill` trains the default teacher first (here a
    40-step recipe with checkpoints every 10 steps), then distills from it, all under mpiexec."""
    args = ["distill", *DISTILL, "--steps", STEPS]
    one = run(1, *args, "--out", tmp_path / "one", data_root=tmp_path / "d1", script="cli")
    two = run(2, *args, "--out", tmp_path / "two", data_root=tmp_path / "d2", script="cli")
    from ttfm_np import ckpt
    t1, t2 = (ckpt.load_checkpoint(str(tmp_path / d / "teachers" / "toy-moons-mlp-tiny-quick" / "checkpoint.h5"))
              for d in ("d1", "d2"))
    assert t1["step"] == t2["step"] == 40
    for k in t1["params"]:
        _close(t2["params"][k], t1["params"][k], f"teacher {k}")
        _close(t2["ema"][k], t1["ema"][k], f"teacher ema {k}")
    assert_same_run(str(tmp_path / "two"), two.stdout, str(tmp_path / "one"), one.stdout)


def _parse_table(lines):
    """[(method, [numbers...]), ...] of _table's rows (the header and rule skipped)."""
    rows = []
    for line in lines[2:]:
        method, numbers = line[:32].strip(), line[32:].split()
        rows.append((method, [float(v) for v in numbers]))
    return rows


def assert_tables_close(stdout, ref_stdout, tols):
    """The printed tables: same rows, each number within its tolerance plus half a unit of its
    last printed digit on either side (MSE has 4 significant digits, PSNR 2 decimals, SW2 and TV 4)."""
    t1, t2 = _parse_table(_table(ref_stdout)), _parse_table(_table(stdout))
    assert [m for m, _ in t1] == [m for m, _ in t2] and len(t1) == len(tols)
    for (method, a), (_, b), tol in zip(t1, t2, tols):
        for x, y, key in zip(a, b, ["nfe", "mse", "psnr", "sw2", "hist_tv"]):
            printed = {"mse": 5e-4 * max(abs(x), abs(y)), "psnr": 5e-3, "sw2": 5e-5, "hist_tv": 5e-5}.get(key, 0.0)
            assert x == y or abs(x - y) <= tol.get(key, 0.0) + 2 * printed, f"table {method} {key}: {x} vs {y}"


def test_two_ranks_float32_distill_within_derived_tolerance(teacher, one_process, tmp_path):
    """float32 under 2 ranks vs 1 process: not bit-identical (other GEMM shapes, other order of the
    gradient sum), so compared within tolerances derived from the float32 error itself
    (tests/float_bounds.py): the one-process float32 run's distance to the float64 run of the same
    settings (the `one_process` fixture: exact to ~1e-13) bounds what rounding alone can do; another
    order of the same float32 arithmetic is allowed 5x that distance (its own error, 4x safety)."""
    from float_bounds import U32, assert_rows_close, row_tolerances, sample_delta
    from ttfm_np import evaluate as evaluation, pipeline, sampling
    args = [a if a != "float64" else "float32" for a in DISTILL]
    one = run(1, "distill", *args, "--teacher", teacher, "--steps", STEPS, "--out", tmp_path / "one",
              data_root=tmp_path / "data")
    two = run(2, "distill", *args, "--teacher", teacher, "--steps", STEPS, "--out", tmp_path / "two",
              data_root=tmp_path / "data")
    s1, s2, s64 = _state(str(tmp_path / "one")), _state(str(tmp_path / "two")), _state(one_process[0])
    assert s1["step"] == s2["step"] == STEPS and s1["rng_state"]["data"] == s2["rng_state"]["data"]
    for group in ("params", "ema"):
        for k, p1 in s1[group].items():
            ref = s64[group][k]
            e = float(np.abs(p1.astype(np.float64) - ref).max())
            delta = max(5 * e, 8 * U32 * float(np.abs(ref).max()))
            # an Adam step moves a parameter by about lr = 1e-2: a wrong gradient or a stale checkpoint
            # on one rank shows up at that scale, far above this bound (measured: at most 3.4e-4)
            assert delta < 1e-3, f"{group}.{k}: float32 is {e:.3g} from float64, the bound would be too loose"
            err = float(np.abs(s2[group][k].astype(np.float64) - p1).max())
            assert err <= delta, f"{group}.{k}: 2 ranks vs 1 differ by {err:.3g} > {delta:.3g}"
    # eval.json: rows of the same noise from students that differ by the above; the samples' bound
    # comes from the one-process float32 samples against the float64 run's samples
    tm32 = sampling.load_model(teacher, "ema", role="teacher")
    tm64 = sampling.load_model(teacher, "ema", dtype="float64", role="teacher")
    sm32 = sampling.load_model(str(tmp_path / "one"), "ema", role="student")
    sm64 = sampling.load_model(one_process[0], "ema", dtype="float64", role="student")
    z = tm32.noise(64, 0)
    x32 = evaluation.generate_samples(tm32, sm32, z, (1, 2), n_ref=8)
    x64 = evaluation.generate_samples(tm64, sm64, z.astype(np.float64), (1, 2), n_ref=8)
    keys = ["reference"] + [k for k in x32 if k != "reference"]
    delta = {k: sample_delta(x32[k], x64[k]) for k in keys}
    heldout = pipeline._heldout_points("toy:moons", None, 64)
    rows1 = json.load(open(tmp_path / "one" / "eval" / "eval.json"))["rows"]
    rows2 = json.load(open(tmp_path / "two" / "eval" / "eval.json"))["rows"]
    assert len(keys) == len(rows1)
    tols = [row_tolerances(r, delta[k], delta["reference"], x32[k], heldout) for r, k in zip(rows1, keys)]
    assert_rows_close(rows2, rows1, tols)
    assert_tables_close(one.stdout, two.stdout, tols)


def test_two_ranks_train_equals_one_process(teacher, tmp_path):
    """`mpiexec -n 2 cli.py train` (float64) ends with the checkpoint of the one-process teacher."""
    run(2, "train", "--data", "toy:moons", "--model", "mlp-tiny", "--steps", 300, "--batch-size", 64, "--lr",
        "1e-2", "--dtype", "float64", "--device", "cpu", "--out", tmp_path / "T", data_root=tmp_path / "data")
    a, b = _state(str(tmp_path / "T")), _state(os.path.dirname(teacher))
    assert a["step"] == b["step"] == 300 and a["rng_state"]["data"] == b["rng_state"]["data"]
    for group in ("params", "ema"):
        for k in b[group]:
            _close(a[group][k], b[group][k], f"{group}.{k}")


def test_two_ranks_eval_within_derived_tolerance(teacher, one_process, tmp_path):
    """`mpiexec -n 2 cli.py eval` (float32: each rank generates 32 of the 64 rows) vs one process:
    eval.json within the tolerances of tests/float_bounds.py, the same table text to its printed digits."""
    from float_bounds import assert_rows_close, row_tolerances, sample_delta
    from ttfm_np import evaluate as evaluation, pipeline, sampling
    student = one_process[0]
    args = ["eval", "--teacher", teacher, "--student", student, "--steps", "1,2", "--n", 64, "--n-ref", 8,
            "--device", "cpu"]
    one = run(1, *args, "--out", tmp_path / "one", data_root=tmp_path / "data")
    two = run(2, *args, "--out", tmp_path / "two", data_root=tmp_path / "data")
    t32, s32 = (sampling.load_model(p, "ema", role=r) for p, r in ((teacher, "teacher"), (student, "student")))
    t64, s64 = (sampling.load_model(p, "ema", dtype="float64", role=r) for p, r in ((teacher, "teacher"),
                                                                                   (student, "student")))
    z = t32.noise(64, 0)
    x32 = evaluation.generate_samples(t32, s32, z, (1, 2), n_ref=8)
    x64 = evaluation.generate_samples(t64, s64, z.astype(np.float64), (1, 2), n_ref=8)
    keys = ["reference"] + [k for k in x32 if k != "reference"]
    delta = {k: sample_delta(x32[k], x64[k]) for k in keys}
    heldout = pipeline._heldout_points("toy:moons", None, 64)
    rows1 = json.load(open(tmp_path / "one" / "eval.json"))["rows"]
    rows2 = json.load(open(tmp_path / "two" / "eval.json"))["rows"]
    tols = [row_tolerances(r, delta[k], delta["reference"], x32[k], heldout) for r, k in zip(rows1, keys)]
    assert_rows_close(rows2, rows1, tols)
    assert_tables_close(one.stdout, two.stdout, tols)
