"""Issue 10 at the command line (CPU): every fault a user can meet gives a non-zero exit code,
exactly one line starting with `Error:` that names the problem, and no traceback; nothing good
is lost on the way (checkpoints, previous generations), and nothing half-done is left behind.

In-process through click's CliRunner where possible (fast); subprocesses only where a real
signal or a second process is the point (interrupts, run locks). The library-level checks of
the same inputs (convert-inception's .pth reader, image files, jsonl) are in test_faults_lib.py.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from ttfm_np import ckpt, evaluate, recipes
from ttfm_np.objectives import FlowMatchingObjective

from cli_checks import assert_error, assert_ok, invoke
from test_faults_lib import _bomb_png, _forbidden_global_pickle, _good_pngs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "cli.py")
TEACHER = ["--data", "toy:moons", "--model", "mlp-tiny", "--batch-size", "32", "--ckpt-every", "5"]
TEACHER_STEPS = 20
EVAL_FAST = ["--eval-steps", "1", "--eval-n", "16", "--eval-n-ref", "4"]
PARAM = "in.weight"              # the parameter array whose bytes the checksum tests damage


# ----------------------------------------------------------------------------- helpers

def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def flip_array_byte(path, group="params", name=PARAM):
    """Flip one bit of the top byte of a float32 inside an array (its exponent: the value changes by 2^k)."""
    with h5py.File(path, "r") as f:
        ds = f[group][name]
        offset, nbytes = ds.id.get_offset(), ds.id.get_storage_size()
    raw = bytearray(open(path, "rb").read())
    assert offset is not None and offset + nbytes < len(raw) - 100       # inside the HDF5 part, before the trailer
    raw[offset + 4 * 3 + 3] ^= 0x01                                       # element 3, exponent byte
    open(path, "wb").write(bytes(raw))


def _array_ranges(path):
    with h5py.File(path, "r") as f:
        return [(ds.id.get_offset(), ds.id.get_offset() + ds.id.get_storage_size())
                for g in ckpt.GROUPS if g in f for ds in f[g].values()]


def damage(path, kind):
    raw = bytearray(open(path, "rb").read())
    if kind == "array":
        return flip_array_byte(path)
    if kind == "metadata":                       # a byte of the HDF5 structure, in no array
        at = next(i for i in range(200, 2000) if not any(a <= i < b for a, b in _array_ranges(path)))
        raw[at] ^= 0xFF
    elif kind == "truncated":
        raw = raw[:len(raw) // 2]
    elif kind == "no trailer":                   # cut exactly at the end of the HDF5 image
        manifest_len = int.from_bytes(raw[-48:-40], "little")
        raw = raw[:len(raw) - 48 - manifest_len]
    elif kind == "empty":
        raw = b""
    elif kind == "random":
        raw = np.random.default_rng(5).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    open(path, "wb").write(bytes(raw))


def rewrite(src, dst, edit_config=None, edit_arrays=None, keep_opt=True):
    """A valid (checksummed) checkpoint made from src with its config and/or every array group edited."""
    st = ckpt.load_checkpoint(src)
    config = json.loads(json.dumps(st["config"]))
    if edit_config:
        edit_config(config)
    groups = [st["params"], st["ema"]] + ([st["opt_state"].m, st["opt_state"].v] if keep_opt else [])
    if edit_arrays:
        for g in groups:
            edit_arrays(g)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    ckpt.save_checkpoint(dst, st["params"], ema=st["ema"], opt_state=st["opt_state"] if keep_opt else None,
                         step=st["step"], rng_state=st["rng_state"], config=config)
    return dst


def same_state(a, b):
    assert a["step"] == b["step"]
    for group in ("params", "ema"):
        for k in a[group]:
            np.testing.assert_array_equal(a[group][k], b[group][k], err_msg=f"{group}/{k}")
    for k in a["params"]:
        np.testing.assert_array_equal(a["opt_state"].m[k], b["opt_state"].m[k])
        np.testing.assert_array_equal(a["opt_state"].v[k], b["opt_state"].v[k])


def all_finite(state):
    return all(np.isfinite(v).all() for g in ("params", "ema") for v in state[g].values())


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def _sandbox(tmp_path, monkeypatch):
    """Stray default paths (runs/, <data root>/teachers) land in tmp_path, never in the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recipes, "DATA_DIR", str(tmp_path / "data"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny finished teacher run (20 steps, checkpoints every 5): checkpoint.h5 and checkpoint.prev.h5."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert_ok(invoke("train", *TEACHER, "--steps", TEACHER_STEPS, "--out", out))
    assert ckpt.load_checkpoint(out / "checkpoint.h5")["step"] == TEACHER_STEPS
    return out


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "run"
    assert_ok(invoke("distill", "--data", "toy:moons", "--teacher", teacher / "checkpoint.h5", "--steps", 10,
                     "--batch-size", 32, "--ckpt-every", 5, "--out", out, *EVAL_FAST))
    return out


# ----------------------------------------------------------------------------- 1. checksums

@pytest.mark.parametrize("command", ["sample", "eval", "distill", "train --resume", "eval --student"])
def test_a_flipped_byte_in_a_parameter_array_is_refused_and_named(teacher, student, tmp_path, command):
    run = copy_run(student if command == "eval --student" else teacher, tmp_path / "run")
    path = run / "checkpoint.h5"
    flip_array_byte(path)
    before = path.read_bytes()
    args = {"sample": ["sample", "--ckpt", path, "--out", tmp_path / "s.png"],
            "eval": ["eval", "--teacher", path, "--out", tmp_path / "e", "--n", 8, "--n-ref", 2],
            "eval --student": ["eval", "--teacher", teacher, "--student", path, "--out", tmp_path / "e",
                               "--n", 8, "--n-ref", 2],
            "distill": ["distill", "--data", "toy:moons", "--teacher", path, "--steps", 2, "--out", tmp_path / "d"],
            "train --resume": ["train", *TEACHER, "--steps", 25, "--resume", "--out", run]}[command]
    assert_error(invoke(*args), f"checkpoint {path} is damaged: params/{PARAM} fails its checksum",
                 "checkpoint.prev.h5")                               # the remedy names the previous generation
    assert path.read_bytes() == before                               # nothing was written over it
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "e").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("kind, message", [
    ("metadata", "HDF5 metadata"), ("truncated", re.compile("is damaged|is not a readable ttfm_np checkpoint")), ("no trailer", "checksum trailer is missing"),
    ("empty", "the file is empty"), ("random", "not an HDF5 file")])
def test_other_damage_is_a_clean_error(teacher, tmp_path, kind, message):
    path = copy_run(teacher, tmp_path / "run") / "checkpoint.h5"
    damage(path, kind)
    for args in (["sample", "--ckpt", path, "--out", tmp_path / "s.png"],
                 ["eval", "--teacher", path, "--out", tmp_path / "e", "--n", 8, "--n-ref", 2],
                 ["train", *TEACHER, "--steps", 25, "--resume", "--out", path.parent]):
        assert_error(invoke(*args), str(path), message, "restore")
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "e").exists()


def test_a_wrong_shape_parameter_is_named(teacher, tmp_path):
    def shrink(arrays):
        arrays["out.weight"] = arrays["out.weight"][:, :15].copy()
    path = rewrite(teacher / "checkpoint.h5", str(tmp_path / "run" / "checkpoint.h5"), edit_arrays=shrink)
    needle = re.compile(r"out\.weight: \(2, 15\) in the checkpoint, \(2, 16\) expected")
    assert_error(invoke("train", *TEACHER, "--steps", 25, "--resume", "--out", tmp_path / "run"), needle)
    assert_error(invoke("sample", "--ckpt", path, "--out", tmp_path / "s.png"), needle)
    assert_error(invoke("eval", "--teacher", path, "--out", tmp_path / "e", "--n", 8, "--n-ref", 2), needle)
    assert_error(invoke("distill", "--data", "toy:moons", "--teacher", path, "--steps", 2,
                        "--out", tmp_path / "d"), needle)
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "e").exists() and not (tmp_path / "d").exists()


def test_a_damaged_default_teacher_says_delete_it_or_pass_teacher(teacher, tmp_path):
    folder = recipes.default_teacher_dir("toy:moons", "mlp-tiny", quick=True)
    assert folder.startswith(str(tmp_path))
    shutil.copytree(teacher, folder)
    flip_array_byte(os.path.join(folder, "checkpoint.h5"))
    assert_error(invoke("distill", "--data", "toy:moons", "--model", "mlp-tiny", "--out", tmp_path / "d", *EVAL_FAST),
                 "the default teacher is unusable", f"params/{PARAM} fails its checksum",
                 f"Delete {folder} to train a new one, or pass --teacher")
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- 1. resume must match the run

@pytest.mark.parametrize("option, value, diff", [
    ("--data", "toy:spirals", "data: toy:moons -> toy:spirals"),
    ("--batch-size", "64", "train.batch_size: 32 -> 64"),
    ("--lr", "0.01", "train.lr: 0.002 -> 0.01"),
    ("--seed", "7", "train.seed: 0 -> 7"),
    ("--dtype", "float64", "train.dtype: float32 -> float64"),
])
def test_train_resume_refuses_a_changed_setting(teacher, tmp_path, option, value, diff):
    run = copy_run(teacher, tmp_path / "run")
    before = {p: (run / p).read_bytes() for p in ("checkpoint.h5", "checkpoint.prev.h5", "metrics.jsonl")}
    args = list(TEACHER)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    assert_error(invoke("train", *args, "--steps", 25, "--resume", "--out", run), "cannot resume", diff,
                 "only --steps, --log-every, --ckpt-every, --sample-every may change")
    assert {p: (run / p).read_bytes() for p in before} == before        # config and log not rewritten


def test_train_resume_lists_every_difference_and_allows_more_steps(teacher, tmp_path):
    run = copy_run(teacher, tmp_path / "run")
    out = assert_error(invoke("train", *TEACHER, "--lr", "0.01", "--seed", "7", "--dtype", "float64",
                              "--steps", 25, "--resume", "--out", run),
                       "train.lr: 0.002 -> 0.01", "train.seed: 0 -> 7", "train.dtype: float32 -> float64")
    error = next(line for line in out.splitlines() if line.startswith("Error:"))
    assert "steps" not in error.split("(only")[0]                        # --steps is no difference
    assert_ok(invoke("train", *TEACHER, "--steps", 25, "--ckpt-every", 25, "--resume", "--out", run))
    assert ckpt.load_checkpoint(run / "checkpoint.h5")["step"] == 25
    assert "may change on --resume" in " ".join(assert_ok(invoke("train", "--help")).split())   # (help wraps lines)


def test_distill_resume_refuses_another_teacher_or_loss(teacher, student, tmp_path):
    run = copy_run(student, tmp_path / "run")
    other = copy_run(teacher, tmp_path / "other_teacher") / "checkpoint.h5"
    base = ["distill", "--data", "toy:moons", "--batch-size", 32, "--ckpt-every", 5, "--out", run, "--resume", *EVAL_FAST]
    t = str(teacher / "checkpoint.h5")
    before = {p: (run / p).read_bytes() for p in ("checkpoint.h5", "eval/eval.json")}
    assert_error(invoke(*base, "--teacher", other, "--steps", 12), f"teacher: {t} -> {other}")
    assert_error(invoke(*base, "--teacher", t, "--loss", "lfmd", "--steps", 12), "loss.loss: itvm -> lfmd")
    assert {p: (run / p).read_bytes() for p in before} == before       # checkpoint and old evaluation untouched
    assert_ok(invoke(*base, "--teacher", t, "--steps", 12))              # more steps: accepted
    assert ckpt.load_checkpoint(run / "checkpoint.h5")["step"] == 12


# ----------------------------------------------------------------------------- 1. roles and data

def test_eval_checks_roles_and_data(teacher, student, tmp_path):
    e = tmp_path / "e"
    common = ["--out", e, "--n", 8, "--n-ref", 2]
    assert_error(invoke("eval", "--teacher", student, *common), "is a two-timed student, but a teacher is needed")
    assert_error(invoke("eval", "--teacher", teacher, "--student", teacher, *common),
                 "is a flow-matching teacher, but a student is needed")

    def spirals(config):
        config["data"] = "toy:spirals"
    other = rewrite(student / "checkpoint.h5", str(tmp_path / "other" / "checkpoint.h5"), edit_config=spirals)
    assert_error(invoke("eval", "--teacher", teacher, "--student", other, *common),
                 "distilled on toy:spirals, the teacher trained on toy:moons")
    assert not e.exists()


# ----------------------------------------------------------------------------- 1. non-finite outputs

def _nan_weights(arrays):
    arrays["out.weight"] = np.full_like(arrays["out.weight"], np.nan)


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_sampling_diverged_weights_is_an_error_and_writes_nothing(teacher, student, tmp_path, which):
    src = (teacher if which == "teacher" else student) / "checkpoint.h5"
    bad = rewrite(src, str(tmp_path / "bad" / "checkpoint.h5"), edit_arrays=_nan_weights)
    for weights in ("ema", "params"):
        png = tmp_path / f"{weights}.png"
        assert_error(invoke("sample", "--ckpt", bad, "--weights", weights, "--steps", 2, "--out", png),
                     "non-finite values", "diverged")
        assert not png.exists()
    args = ["--teacher", bad] if which == "teacher" else ["--teacher", teacher, "--student", bad]
    assert_error(invoke("eval", *args, "--out", tmp_path / "e", "--n", 8, "--n-ref", 2), "non-finite values")
    assert not (tmp_path / "e" / "eval.json").exists()


# ----------------------------------------------------------------------------- 2. the divergence guard

def _poison(monkeypatch, good_calls, how):
    """Let the teacher objective go bad after `good_calls` evaluations: NaN gradients, or a loss
    10^6 x too large with finite gradients (what a huge learning rate does)."""
    original = FlowMatchingObjective.loss_and_grads
    calls = [0]

    def bad(self, *args):
        loss, grads, metrics = original(self, *args)
        calls[0] += 1
        if calls[0] > good_calls:
            if how == "nan":
                grads[PARAM].flat[0] = np.nan
            else:
                loss = loss * 1e6
        return loss, grads, metrics
    monkeypatch.setattr(FlowMatchingObjective, "loss_and_grads", bad)
    # the memory/time guard's two probe passes before the first step would count as evaluations here
    from ttfm_np import resources
    monkeypatch.setattr(resources, "check_before_training", lambda *a, **k: None)


LAST_GOOD = re.compile(r"the last good checkpoint is (\S+) \(step (\d+), finite weights\)")


@pytest.fixture(scope="module")
def reference_25(teacher, tmp_path_factory):
    """The state a healthy resume of the teacher run reaches at step 25 (resume is bit-exact)."""
    run = copy_run(teacher, tmp_path_factory.mktemp("ref") / "run")
    assert_ok(invoke("train", *TEACHER, "--steps", 25, "--resume", "--out", run))
    return ckpt.load_checkpoint(run / "checkpoint.h5")


@pytest.mark.parametrize("how", ["nan", "explode"])
@pytest.mark.parametrize("good_calls, last_good", [(5, 20), (6, 25)])
def test_divergence_after_resume_keeps_the_last_good_state(teacher, reference_25, tmp_path, monkeypatch,
                                                           how, good_calls, last_good):
    """Resume at step 20 (checkpoints every 5). The 6th loss is the one computed with the step-25 state:
    bad there, that state is never written and step 20 stays the last good one; bad one call later,
    step 25 was proven sane and is kept."""
    run = copy_run(teacher, tmp_path / "run")
    _poison(monkeypatch, good_calls, how)
    out = assert_error(invoke("train", *TEACHER, "--steps", 40, "--resume", "--out", run),
                       "non-finite gradient" if how == "nan" else "exploding loss", "Lower --lr")
    named, step = LAST_GOOD.search(out).groups()
    assert int(step) == last_good and os.path.isfile(named)
    state = ckpt.load_checkpoint(named)
    assert all_finite(state)
    same_state(state, ckpt.load_checkpoint(teacher / "checkpoint.h5") if last_good == 20 else reference_25)
    assert all_finite(ckpt.load_checkpoint(run / "checkpoint.prev.h5"))


def test_divergence_on_a_fresh_run(tmp_path, monkeypatch):
    _poison(monkeypatch, 2, "explode")
    out = assert_error(invoke("train", *TEACHER, "--steps", 20, "--out", tmp_path / "a"),
                       "no checkpoint had been saved yet in this run")
    assert "checkpoint.h5" not in out and not (tmp_path / "a" / "checkpoint.h5").exists()
    _poison(monkeypatch, 4, "nan")                                    # saves every step: 1, 2, 3 are proven sane
    out = assert_error(invoke("train", *TEACHER, "--ckpt-every", 1, "--steps", 20, "--out", tmp_path / "b"))
    named, step = LAST_GOOD.search(out).groups()
    assert int(step) == 3 and all_finite(ckpt.load_checkpoint(named))
    assert ckpt.load_checkpoint(tmp_path / "b" / "checkpoint.prev.h5")["step"] == 2


# ----------------------------------------------------------------------------- 3. interrupts (real signals)

def _spawn(args, tmp_path, **env):
    full_env = dict(os.environ, TTFM_DEVICE="cpu", PYTHONUNBUFFERED="1", TTFM_DATA=str(tmp_path / "data"), **env)
    return subprocess.Popen([sys.executable, CLI, *map(str, args)], cwd=tmp_path, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt_when(proc, path, signum, timeout=60):
    """Send signum once `path` exists (the training loop opens metrics.jsonl after installing its handler)."""
    t0 = time.monotonic()
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"{path} did not appear (rc {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.02)
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"no exit within {timeout} s of {signal.Signals(signum).name}:\n{proc.communicate()}")
    assert "Traceback" not in out + err, err
    return proc.returncode, out, err


def _check_interrupted(rc, err, signum, checkpoint):
    name = signal.Signals(signum).name
    assert rc == 128 + signum, err                                     # 130 SIGINT, 143 SIGTERM
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"interrupted by {name}" in errors[0], err
    assert f"state saved in {checkpoint}" in errors[0] and "--resume" in errors[0], err
    state = ckpt.load_checkpoint(checkpoint)
    assert state["step"] >= 1 and all_finite(state)
    return state


def test_sigint_in_distills_teacher_phase_stops_everything(tmp_path):
    out = tmp_path / "student"
    proc = _spawn(["distill", "--data", "toy:moons", "--model", "mlp-tiny", "--out", out, "--yes", *EVAL_FAST], tmp_path)
    teacher_dir = tmp_path / "data" / "teachers" / "toy-moons-mlp-tiny-quick"
    rc, _, err = _interrupt_when(proc, teacher_dir / "metrics.jsonl", signal.SIGINT)
    state = _check_interrupted(rc, err, signal.SIGINT, str(teacher_dir / "checkpoint.h5"))
    assert state["step"] < recipes.teacher_recipe("toy:moons", quick=True)["steps"]
    assert not out.exists()                                            # no student phase, no evaluation
    assert not list(tmp_path.rglob("eval.json"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_in_distills_student_phase_skips_the_evaluation(teacher, tmp_path, signum):
    out = tmp_path / "student"
    args = ["distill", "--data", "toy:moons", "--teacher", teacher, "--batch-size", 32, "--out", out, *EVAL_FAST]
    proc = _spawn([*args, "--steps", 10**6, "--yes"], tmp_path)
    rc, _, err = _interrupt_when(proc, out / "metrics.jsonl", signum)
    state = _check_interrupted(rc, err, signum, str(out / "checkpoint.h5"))
    assert not (out / "eval").exists()
    if signum == signal.SIGINT:                                        # the advice works: resume and finish
        assert_ok(invoke(*args, "--steps", state["step"] + 2, "--resume"))
        assert ckpt.load_checkpoint(out / "checkpoint.h5")["step"] == state["step"] + 2
        assert (out / "eval" / "eval.json").exists()


def test_sigterm_stops_train_with_143(tmp_path):
    out = tmp_path / "run"
    proc = _spawn(["train", *TEACHER, "--steps", 10**6, "--yes", "--out", out], tmp_path)
    rc, _, err = _interrupt_when(proc, out / "metrics.jsonl", signal.SIGTERM)
    state = _check_interrupted(rc, err, signal.SIGTERM, str(out / "checkpoint.h5"))
    assert_ok(invoke("train", *TEACHER, "--steps", state["step"] + 1, "--resume", "--out", out))


@pytest.mark.parametrize("command", ["eval", "fid"])
def test_sigint_during_eval_or_fid_exits_130_and_writes_nothing(teacher, tmp_path, monkeypatch, command):
    """Commands without a training loop: Ctrl-C arriving mid-computation stops them with 130."""
    from ttfm_np import inception
    target, name = (evaluate, "generate_samples") if command == "eval" else (inception, "load_inception")
    original = getattr(target, name)

    def interrupted(*args, **kwargs):
        if command == "eval":
            original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)                            # Ctrl-C arrives while it computes
        pytest.fail("the SIGINT did not interrupt")
    monkeypatch.setattr(target, name, interrupted)
    args = (["eval", "--teacher", teacher, "--out", tmp_path / "e", "--n", 8, "--n-ref", 2] if command == "eval"
            else ["fid", "--ckpt", teacher, "--ref", tmp_path / "ref.npz", "--n", 8])
    assert_error(invoke(*args), "interrupted by SIGINT", "nothing of this command's output is complete", code=130)
    assert not (tmp_path / "e").exists()


def test_eval_json_is_strict_json(teacher, tmp_path):
    """The reference row's PSNR is +inf (it is compared with itself): written as null and listed."""
    assert_ok(invoke("eval", "--teacher", teacher, "--out", tmp_path / "e", "--n", 8, "--n-ref", 2,
                     "--steps", "1"))

    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    doc = json.loads((tmp_path / "e" / "eval.json").read_text(), parse_constant=refuse)
    ref = next(r for r in doc["rows"] if "(reference)" in r["method"])
    assert ref["psnr"] is None and ref["mse"] == 0.0
    assert any(k.endswith(".psnr") for k in doc["non_finite_as_null"]["values"])


# ----------------------------------------------------------------------------- 3. one writer per run folder

def test_a_second_writer_is_refused_naming_the_pid(teacher, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ttfm_np.runlock import RunLock\n"
         "lock = RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(60)", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["train", *TEACHER, "--steps", 2, "--out", out],
                     ["train", *TEACHER, "--steps", 2, "--out", out, "--resume"],
                     ["distill", "--data", "toy:moons", "--teacher", teacher, "--steps", 2, "--out", out]):
            assert_error(invoke(*args), f"run folder {out} is in use by PID {holder.pid}", "choose another --out")
        assert sorted(os.listdir(out)) == [".lock"]                     # nothing written beside the holder
    finally:
        holder.kill()
        holder.wait()
    assert_ok(invoke("train", *TEACHER, "--steps", 2, "--out", out))   # its death released the lock


# ----------------------------------------------------------------------------- 4. data that does not fit

def test_too_few_samples_for_the_batch(tmp_path, rng):
    imgs = tmp_path / "imgs"
    _good_pngs(imgs, rng, n=3)
    assert_error(invoke("train", "--data", f"imagefolder:{imgs}", "--model", "tiny", "--resolution", 16,
                        "--steps", 1, "--out", tmp_path / "a"),
                 # 16-pixel images get the CIFAR-10 recipe (batch 128: recipes.imagefolder_resolution)
                 f"--batch-size 128 is larger than imagefolder:{imgs} (3 samples)", "--batch-size 3 or less")
    points = tmp_path / "few.npy"
    np.save(points, rng.standard_normal((20, 2)))
    assert_error(invoke("train", "--data", f"points:{points}", "--model", "mlp-tiny", "--batch-size", 32,
                        "--steps", 1, "--out", tmp_path / "b"), "--batch-size 32 is larger than", "(18 samples)")
    assert_error(invoke("train", *TEACHER, "--batch-size", 200_000, "--steps", 1, "--out", tmp_path / "c"),
                 "--batch-size 200000 is larger than toy:moons (100000 samples)")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_decompression_bomb_in_an_image_folder(tmp_path, rng):
    imgs = tmp_path / "imgs"
    _good_pngs(imgs, rng, n=3)
    _bomb_png(imgs / "img1.png")
    assert_error(invoke("train", "--data", f"imagefolder:{imgs}", "--model", "tiny", "--resolution", 16,
                        "--batch-size", 2, "--steps", 1, "--out", tmp_path / "a"),
                 f"{imgs / 'img1.png'} is refused as a possible decompression bomb")


# ----------------------------------------------------------------------------- 4. file systems that refuse

from test_ckpt import _mount_tmpfs  # noqa: E402  (skips with the reason where mounting is not allowed)


def test_an_unwritable_out(teacher, tmp_path):
    """Running as root, chmod cannot make a folder unwritable: a path under a regular file, and a
    read-only mount (skipped where mounting is not allowed)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert_error(invoke("train", *TEACHER, "--steps", 2, "--out", blocker / "run"), "Not a directory",
                 str(blocker / "run"))
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "size=1m")
    try:
        run = copy_run(teacher, mnt / "run")
        before = (run / "checkpoint.h5").read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        assert_error(invoke("train", *TEACHER, "--steps", 2, "--out", mnt / "new"), "Read-only file system",
                     str(mnt / "new"))
        assert_error(invoke("train", *TEACHER, "--steps", 25, "--resume", "--out", run), "Read-only file system")
        assert (run / "checkpoint.h5").read_bytes() == before
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _fill(folder, leave):
    st = os.statvfs(folder)
    with open(os.path.join(folder, "filler"), "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


@pytest.mark.parametrize("how", ["/dev/full", "full tmpfs"])
def test_a_full_disk_keeps_the_old_checkpoint_and_no_temp_file(teacher, tmp_path, how):
    mnt = tmp_path / "mnt"
    if how == "/dev/full":
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full on this system")
        run = copy_run(teacher, tmp_path / "run")
        # the checkpoint's temp file (named after this process) is /dev/full: every write fails with ENOSPC
        os.symlink("/dev/full", run / f"checkpoint.h5.tmp-{os.getpid()}")
    else:
        _mount_tmpfs(mnt, "size=1m")
        run = copy_run(teacher, mnt / "run")
        _fill(mnt, leave=16 << 10)                                     # room for log lines, not for a checkpoint
    before = {p: (run / p).read_bytes() for p in ("checkpoint.h5", "checkpoint.prev.h5")}
    try:
        assert_error(invoke("train", *TEACHER, "--steps", 25, "--resume", "--out", run),
                     f"could not write checkpoint {run / 'checkpoint.h5'}: No space left on device",
                     "is intact", "free space and resume with --resume")
        assert {p: (run / p).read_bytes() for p in before} == before
        assert not [p for p in os.listdir(run) if ".tmp" in p]
        assert ckpt.load_checkpoint(run / "checkpoint.h5")["step"] == TEACHER_STEPS
    finally:
        if how != "/dev/full":
            subprocess.run(["umount", str(mnt)], check=False)


# ----------------------------------------------------------------------------- 4. other inputs

@pytest.mark.parametrize("kind, reason", [("empty", "is empty"), ("random", "not a (readable )?PyTorch"),
                                          ("pickle", "refused"), ("missing", "does not exist")])
def test_convert_inception_refuses_bad_files(tmp_path, kind, reason):
    pth = tmp_path / "weights.pth"
    if kind == "empty":
        pth.write_bytes(b"")
    elif kind == "random":
        pth.write_bytes(np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "pickle":
        _forbidden_global_pickle(pth)
    out = tmp_path / "inception.h5"
    assert_error(invoke("convert-inception", pth, "--out", out), str(pth), re.compile(reason), "pt_inception")
    assert not out.exists()


def test_plot_metrics_names_the_bad_line(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps({"step": i, "loss": 1.0 / i}) for i in range(1, 4)) + '\n{"step": 4, "lo')
    assert_error(invoke("plot-metrics", m, "--out", tmp_path / "p.png"), f"{m} line 4 is not JSON")
    assert_error(invoke("plot-metrics", m, "--out", tmp_path / "p.jpg"), "must be a .png")
    assert not (tmp_path / "p.png").exists()


def test_sample_out_needs_a_png_name(teacher, tmp_path):
    for name in ("samples", "samples.jpg"):
        assert_error(invoke("sample", "--ckpt", teacher, "--out", tmp_path / name), "must be a .png file name")
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("args, message", [
    (["train", *TEACHER, "--steps", "1e23"], "'1e23' is not a valid integer"),
    (["train", *TEACHER, "--steps", str(10**23)], "not in the range 1<=x<=1000000000"),
    (["distill", "--steps", str(10**12)], "not in the range 1<=x<=1000000000"),
    (["sample", "--ckpt", "x", "--out", "x.png", "--steps", "1e23"], "not a valid integer"),
    (["eval", "--teacher", "x", "--steps", "1,1e23"], "expected comma-separated integers"),
    (["train", *TEACHER, "--lr", "1e6"], "not in the range 0<x<=10"),
])
def test_out_of_range_numbers_are_usage_errors(args, message):
    assert_error(invoke(*args), message, code=2)


def test_eval_step_count_above_the_limit(teacher, tmp_path):
    assert_error(invoke("eval", "--teacher", teacher, "--steps", "1,200000", "--out", tmp_path / "e"),
                 "step counts above 100000")


def test_resolution_on_toy_data_warns_and_runs(tmp_path):
    out = assert_ok(invoke("train", *TEACHER, "--steps", 2, "--resolution", 32, "--out", tmp_path / "r"))
    assert re.search(r"^Warning: --resolution 32 applies only to imagefolder data; ignored for toy:moons$",
                     out, re.M), out
    assert ckpt.load_checkpoint(tmp_path / "r" / "checkpoint.h5")["step"] == 2
