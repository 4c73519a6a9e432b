"""Guards against silent wrong results and lost output (issue 19, sections 3 and 4).

Every test here failed on the code before the guard it checks:
atomic writes (a failure mid-write keeps the old file), non-finite option values,
the unequal-size sliced-W2 (fast, and equal to the np.quantile version), zip bombs
given as .pth files, content hashes of the inputs on resume, eval against another
teacher, --model with --teacher, points data of any dimension, the CLI's report of
internal errors, the wrong messages, and the memory/time guard before the first step.
"""
import builtins
import errno
import os
import re
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from cli_checks import assert_error, assert_ok, invoke
from ttfm_np import atomic, fid, images, jsonio, metrics, recipes, torch_reader

TEACHER = ["--data", "toy:moons", "--model", "mlp-tiny", "--batch-size", "32", "--ckpt-every", "5"]
EVAL_FAST = ["--eval-steps", "1", "--eval-n", "16", "--eval-n-ref", "4"]


@pytest.fixture(autouse=True)
def _sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recipes, "DATA_DIR", str(tmp_path / "data"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert_ok(invoke("train", *TEACHER, "--steps", 10, "--out", out))
    return out


# ----------------------------------------------------------------------------- atomic writes

class _DiskFull:
    """builtins.open wrapper: files written under an atomic temp name fail after `budget` bytes (ENOSPC)."""

    def __init__(self, budget=100):
        self.budget, self.real = budget, builtins.open

    def __call__(self, file, mode="r", *args, **kwargs):
        f = self.real(file, mode, *args, **kwargs)
        if ".tmp-" in os.fspath(file) and any(c in mode for c in "wa"):
            budget, write = [self.budget], f.write

            def failing_write(data):
                if len(data) > budget[0]:
                    write(data[:budget[0]])
                    raise OSError(errno.ENOSPC, "No space left on device")
                budget[0] -= len(data)
                return write(data)
            f.write = failing_write
        return f


def _no_temp_files(folder):
    return [n for n in os.listdir(folder) if ".tmp-" in n]


@pytest.mark.parametrize("what", ["json", "png", "npz"])
def test_a_write_failing_midway_keeps_the_old_file(tmp_path, monkeypatch, what):
    path = tmp_path / f"out.{what}"
    writers = {
        "json": lambda v: _write_json(path, v),
        "png": lambda v: images.save_image_grid(np.full((4, 3, 8, 8), v, np.float32), str(path)),
        "npz": lambda v: fid.save_stats(str(path), np.full(16, v), np.eye(16) * v, 10, "x"),
    }
    writers[what](0.5)
    old = path.read_bytes()
    monkeypatch.setattr(builtins, "open", _DiskFull(100))
    with pytest.raises(OSError) as info:
        writers[what](-0.5)
    assert info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "intact" in str(info.value)      # names the file, no bare [Errno 28]
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert not _no_temp_files(tmp_path)


def _write_json(path, value):
    with atomic.write(path, "w") as f:
        jsonio.dump_json({"v": value, "pad": list(range(200))}, f)


def test_an_exception_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    _write_json(path, 1)
    old = path.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic.write(path, "w") as f:
            f.write("{half")
            raise RuntimeError("boom")
    assert path.read_bytes() == old and not _no_temp_files(tmp_path)


def test_sample_and_eval_with_a_full_disk_keep_their_old_outputs(teacher, tmp_path, monkeypatch):
    png = tmp_path / "s.png"
    assert_ok(invoke("sample", "--ckpt", teacher, "--n", 16, "--steps", 2, "--out", png))
    assert_ok(invoke("eval", "--teacher", teacher, "--steps", "1", "--n", 16, "--n-ref", 4, "--out", tmp_path / "ev"))
    before = {p: p.read_bytes() for p in [png, *(tmp_path / "ev").iterdir()]}
    monkeypatch.setattr(builtins, "open", _DiskFull(100))
    assert_error(invoke("sample", "--ckpt", teacher, "--n", 16, "--steps", 2, "--seed", 1, "--out", png),
                 str(png), "free space")
    assert_error(invoke("eval", "--teacher", teacher, "--steps", "1", "--n", 16, "--n-ref", 4, "--seed", 1,
                        "--out", tmp_path / "ev"), "free space")
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in before} == before
    assert not _no_temp_files(tmp_path) and not _no_temp_files(tmp_path / "ev")


# ----------------------------------------------------------------------------- non-finite option values

@pytest.mark.parametrize("args", [
    ["distill", "--lambda-init", "nan"], ["distill", "--lambda-term", "nan"], ["distill", "--grad-clip", "nan"],
    ["train", "--data", "toy:moons", "--grad-clip", "inf"], ["train", "--data", "toy:moons", "--lr", "nan"],
    ["distill", "--frac-t1", "nan"], ["distill", "--ema-decay", "nan"],
])
def test_non_finite_option_values_are_usage_errors(args, tmp_path):
    res = invoke(*args, "--out", tmp_path / "run")
    assert_error(res, "finite", code=2)
    assert not (tmp_path / "run").exists()


def test_library_configs_refuse_nan_too():
    from ttfm_np.losses import DistillLossConfig
    from ttfm_np.train import TrainConfig
    with pytest.raises(ValueError, match="finite"):
        DistillLossConfig(lambda_init=float("nan")).validate()
    with pytest.raises(ValueError, match="finite"):
        TrainConfig(grad_clip=float("nan")).validate()


# ----------------------------------------------------------------------------- sliced-W2 with unequal sizes

def _sliced_w2_np_quantile(a, b, n_proj=256, seed=0):
    """The previous implementation (np.quantile at the common levels): the accuracy reference."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((a.shape[1], n_proj))
    w /= np.linalg.norm(w, axis=0, keepdims=True)
    pa, pb = np.sort(a @ w, axis=0), np.sort(b @ w, axis=0)
    if len(pa) != len(pb):
        q = (np.arange(max(len(pa), len(pb))) + 0.5) / max(len(pa), len(pb))
        pa, pb = np.quantile(pa, q, axis=0), np.quantile(pb, q, axis=0)
    return float(np.sqrt(((pa - pb) ** 2).mean()))


@pytest.mark.parametrize("na, nb, d", [(300, 200, 2), (101, 1000, 3), (57, 57, 5), (2, 9, 1)])
def test_sliced_w2_equals_the_np_quantile_version(rng, na, nb, d):
    a, b = rng.standard_normal((na, d)), 1.3 * rng.standard_normal((nb, d)) + 0.2
    # same arithmetic up to the order of two float64 operations per element: relative 1e-12
    np.testing.assert_allclose(metrics.sliced_w2(a, b), _sliced_w2_np_quantile(a, b), rtol=1e-12)


def test_sliced_w2_with_unequal_sizes_is_fast(rng):
    a, b = rng.standard_normal((20000, 2)), rng.standard_normal((2000, 2))
    t = time.perf_counter()
    metrics.sliced_w2(a, a[:20000])
    equal = time.perf_counter() - t
    t = time.perf_counter()
    metrics.sliced_w2(a, b)
    unequal = time.perf_counter() - t
    # the same work as equal sizes (a gather instead of a pairing): generous 5x + 0.5 s for a loaded machine;
    # np.quantile took about 100x the equal-size time here
    assert unequal < 5 * equal + 0.5, (unequal, equal)


# ----------------------------------------------------------------------------- zip bombs as .pth files

def _unicode(s):
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def _one_tensor_pickle(numel):
    """data.pkl of {'w': float32 tensor of numel elements on storage '0'} (protocol 2, no torch needed)."""
    return b"".join([b"\x80\x02", b"ccollections\nOrderedDict\n)R(", _unicode("w"),
                     b"ctorch._utils\n_rebuild_tensor_v2\n(",
                     b"(" + _unicode("storage") + b"ctorch\nFloatStorage\n" + _unicode("0") + _unicode("cpu")
                     + b"J" + struct.pack("<i", numel) + b"tQ",
                     b"K\x00", b"(J" + struct.pack("<i", numel) + b"t", b"(J\x01\x00\x00\x00t",
                     b"\x89", b"ccollections\nOrderedDict\n)R", b"tR", b"u."])


def test_a_zip_bomb_is_refused_before_inflating(tmp_path):
    numel = 16 << 20                                     # 64 MiB of zeros deflate to ~64 KiB
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", _one_tensor_pickle(numel))
        zf.writestr("archive/data/0", bytes(4 * numel))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(torch_reader.TorchFileError, match="zip bomb"):
            torch_reader.load_torch_file(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak                          # nothing near the 64 MiB was inflated


def test_a_declared_size_that_is_not_the_tensors_is_refused(tmp_path):
    path = tmp_path / "lies.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _one_tensor_pickle(4))
        zf.writestr("archive/data/0", bytes(4 * 1000))  # 1000 floats stored for a 4-element storage
    with pytest.raises(torch_reader.TorchFileError, match="declares 4000 bytes.*needs 16"):
        torch_reader.load_torch_file(str(path))


def test_too_many_bytes_in_all_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _one_tensor_pickle(1000))
        zf.writestr("archive/data/0", np.ones(1000, "<f4").tobytes())
    assert torch_reader.load_torch_file(str(path))["w"].shape == (1000,)        # a good file reads
    monkeypatch.setattr(torch_reader, "MAX_TOTAL_BYTES", 3999)
    with pytest.raises(torch_reader.TorchFileError, match="refused before inflating"):
        torch_reader.load_torch_file(str(path))


# ----------------------------------------------------------------------------- inputs: contents, not paths

def _points(path, seed, n=200):
    np.save(path, np.random.default_rng(seed).standard_normal((n, 2)).astype(np.float32))
    return f"points:{path}"


def test_resume_refuses_a_changed_points_file(tmp_path):
    data = _points(tmp_path / "p.npy", 0)
    run = ["train", "--data", data, "--model", "mlp-tiny", "--batch-size", 16, "--out", tmp_path / "t"]
    assert_ok(invoke(*run, "--steps", 4))
    _points(tmp_path / "p.npy", 1)                           # same path, other rows
    assert_error(invoke(*run, "--steps", 8, "--resume"), "the data file(s): sha256", "->", "Restore the original")
    _points(tmp_path / "p.npy", 0)                           # the original contents again: resumes
    assert_ok(invoke(*run, "--steps", 8, "--resume"))


def test_resume_refuses_a_replaced_teacher(teacher, tmp_path):
    import shutil
    t = tmp_path / "teacher"
    shutil.copytree(teacher, t)
    run = ["distill", "--data", "toy:moons", "--teacher", t, "--batch-size", 16, "--ckpt-every", 2,
           "--out", tmp_path / "s", *EVAL_FAST]
    assert_ok(invoke(*run, "--steps", 2))
    assert_ok(invoke("train", *TEACHER, "--steps", 12, "--out", t, "--resume"))    # the teacher trains on in place
    assert_error(invoke(*run, "--steps", 4, "--resume"), "the teacher checkpoint: sha256", "->")


def test_eval_warns_when_the_teacher_is_not_the_students(teacher, tmp_path):
    import shutil
    t = tmp_path / "teacher"
    shutil.copytree(teacher, t)
    s = tmp_path / "s"
    assert_ok(invoke("distill", "--data", "toy:moons", "--teacher", t, "--batch-size", 16, "--steps", 2,
                     "--out", s, *EVAL_FAST))
    ev = ["eval", "--student", s, "--steps", "1", "--n", 16, "--n-ref", 4, "--out", tmp_path / "ev"]
    out = assert_ok(invoke(*ev, "--teacher", t))
    assert "Warning" not in out
    copy = tmp_path / "copy"
    shutil.copytree(t, copy)                                 # the same contents elsewhere: no warning
    assert "Warning" not in assert_ok(invoke(*ev, "--teacher", copy))
    other = tmp_path / "other"
    assert_ok(invoke("train", *TEACHER, "--steps", 10, "--seed", 3, "--out", other))
    out = assert_ok(invoke(*ev, "--teacher", other))
    assert "Warning: the student" in out and "another teacher" in out


def test_distill_model_with_teacher_is_checked_not_ignored(teacher, tmp_path):
    run = ["distill", "--data", "toy:moons", "--teacher", teacher, "--batch-size", 16, "--steps", 1, *EVAL_FAST]
    assert_error(invoke(*run, "--model", "mlp", "--out", tmp_path / "a"), "--model mlp is not the network",
                 "omit --model")
    assert_error(invoke(*run, "--model", "small", "--out", tmp_path / "b"), "--model small is not the network")
    assert_ok(invoke(*run, "--model", "mlp-tiny", "--out", tmp_path / "c"))          # the teacher's own: honoured


# ----------------------------------------------------------------------------- memory and time guards

def _pngs(folder, n, size, rng):
    from PIL import Image
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_a_run_over_the_memory_available_is_refused_before_the_first_step(tmp_path, monkeypatch, rng):
    imgs = _pngs(tmp_path / "imgs", 16, 16, rng)
    monkeypatch.setenv("TTFM_MEM_AVAILABLE", "20M")              # fakes MemAvailable: nothing is allocated
    res = invoke("train", "--data", f"imagefolder:{imgs}", "--model", "tiny", "--batch-size", 16, "--steps", 2,
                 "--out", tmp_path / "run")
    assert_error(res, "of memory", "per sample x batch 16", "MB available ($TTFM_MEM_AVAILABLE)",
                 "--batch-size", "--model", "--device gpu", "nothing was started")
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("TTFM_MEM_AVAILABLE", "2G")
    assert_ok(invoke("train", "--data", f"imagefolder:{imgs}", "--model", "tiny", "--batch-size", 16,
                     "--steps", 2, "--out", tmp_path / "run"))


def test_a_run_over_the_time_limit_is_refused_before_the_first_step(tmp_path, monkeypatch):
    from ttfm_np import resources
    real = resources._probe_pass
    monkeypatch.setattr(resources, "_probe_pass", lambda *a: (real(*a)[0], 20.0))   # 10 s per sample
    run = ["train", *TEACHER, "--steps", 1000, "--out", tmp_path / "run"]
    assert_error(invoke(*run), "needs about", "on the CPU", "10.00 s per sample x batch 32 x 1000 steps",
                 "--device gpu", "--yes")
    assert not (tmp_path / "run").exists()
    steps = []
    monkeypatch.setattr(resources, "check_before_training", lambda *a, **k: steps.append(a))
    assert_ok(invoke(*run[:-4], "--steps", 3, "--out", tmp_path / "run", "--yes"))      # --yes: no guard
    assert steps == []


def test_the_largest_batch_that_fits_is_right():
    from ttfm_np import resources
    est = resources.Estimate(now=100, state=50, pass_fixed=10, per_sample=7, batch=40, seconds_per_sample=0.0)
    for available in (1000, 5000, 12345):
        fit = est.largest_batch(available)
        assert resources.SAFETY * est.total(fit) - est.now <= available < resources.SAFETY * est.total(fit + 1) - est.now


MEASURE_RSS = r"""
import sys, numpy as np
from ttfm_np import data as D, model, pipeline, resources
from ttfm_np.objectives import FlowMatchingObjective
out, name, res, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, res, res)).astype(np.float32)
cfg = model.make_config(name, (3, res, res))
est = resources.estimate(FlowMatchingObjective(cfg, sample_kind="image"), model.init_model(cfg, 0), x, batch,
                         "float32")
pipeline._training_data = lambda *a, **k: D.Dataset("x", x, "image")
pipeline.train_teacher("imagefolder:" + out, model_name=name, out=out + "/run", steps=1, batch_size=batch,
                       ckpt_every=1, progress=False)
# VmHWM: this program's peak resident memory (ru_maxrss would include the forking parent's, on Linux)
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
from ttfm_np import block_processes                 # a U-Net's blocks may run on worker processes: theirs too
peak += sum(child["peak_rss"] for child in block_processes.status())
print(est.total(), peak)
"""


@pytest.mark.slow          # one real training step of a U-Net in a fresh process (10-40 s on 2 cores)
def test_the_memory_estimate_matches_the_measured_peak(tmp_path):
    """M(B) against the peak resident memory of a real run (a step, its checkpoint, samples): within 1.5x.

    Measured on a 2-core AMD EPYC (AVX-512), under load: 197 MB estimated, 188 MB peak (tiny U-Net,
    32x32, batch 32, this test); 318 MB / 303 MB (batch 64); 901 MB / 1010 MB (small, batch 16);
    celebahq64 at 64x64, batch 64 (issue 19's killed run): 24.5 GB estimated. The factor allows for allocator slack and
    the libraries' own buffers, which tracemalloc does not see.
    """
    import subprocess
    import sys
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc/self/status (VmHWM) for the peak resident memory")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TTFM_DATA=str(tmp_path / "data"))
    out = subprocess.run([sys.executable, "-c", MEASURE_RSS, str(tmp_path), "tiny", "32", "32"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    estimate, peak = map(int, out.stdout.split()[-2:])
    assert peak / 1.5 < estimate < 1.5 * peak, (estimate, peak, {k: v for k, v in env.items() if k.startswith(("OPENBLAS", "OMP", "MKL", "TTFM", "PYTHON"))})


# ----------------------------------------------------------------------------- messages that were wrong

def test_the_time_refusal_says_a_checkpoint_was_kept_and_how_to_continue(tmp_path):
    run = ["train", *TEACHER[:-2], "--ckpt-every", 1, "--out", tmp_path / "run"]
    out = assert_error(invoke(*run, "--steps", 100_000_000), "on the CPU", "--resume --yes")
    assert "nothing was saved" not in out and (tmp_path / "run" / "checkpoint.h5").exists()
    assert_ok(invoke(*run, "--steps", 5, "--resume", "--yes"))            # the advice works
    out = assert_error(invoke("train", *TEACHER, "--out", tmp_path / "fresh", "--steps", 100_000_000),
                       "nothing was saved", "--yes")
    assert not (tmp_path / "fresh").exists()


def test_huge_points_data_is_blamed_not_the_learning_rate(tmp_path):
    np.save(tmp_path / "big.npy", 1e30 * np.random.default_rng(0).standard_normal((200, 2)).astype(np.float32))
    out = assert_error(invoke("train", "--data", f"points:{tmp_path / 'big.npy'}", "--model", "mlp-tiny",
                              "--batch-size", 16, "--steps", 5, "--out", tmp_path / "run"),
                       "big.npy holds values up to", "the data is the problem", "standardise")
    assert "--lr" not in out


def test_a_full_disk_outside_the_atomic_writers_names_the_path_and_the_fix(tmp_path, monkeypatch):
    from ttfm_np import pipeline

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))
    monkeypatch.setattr(pipeline, "train_teacher", full)
    out = assert_error(invoke("train", *TEACHER, "--steps", 2, "--out", tmp_path / "run"),
                       "no space left on the device while writing", "metrics.jsonl", "free space", "--resume")
    assert "[Errno 28]" not in out


# ----------------------------------------------------------------------------- points of any dimension

@pytest.mark.parametrize("d", [1, 3])
def test_points_of_any_dimension_train_distill_sample_and_evaluate(tmp_path, d):
    np.save(tmp_path / "p.npy", np.random.default_rng(0).standard_normal((300, d)).astype(np.float32))
    data = f"points:{tmp_path / 'p.npy'}"
    assert_ok(invoke("train", "--data", data, "--model", "mlp-tiny", "--batch-size", 16, "--steps", 3,
                     "--out", tmp_path / "t"))
    out = assert_ok(invoke("distill", "--data", data, "--teacher", tmp_path / "t", "--batch-size", 16, "--steps", 3,
                           "--out", tmp_path / "s", *EVAL_FAST))
    assert "SW2" in out and "n/a" in out                       # sliced-W2 in any d; histogram TV for d = 2 only
    assert (tmp_path / "s" / "eval" / "samples.png").exists()
    rows = __import__("json").loads((tmp_path / "s" / "eval" / "eval.json").read_text())["rows"]
    assert all(r["sw2"] > 0 and r["hist_tv"] is None for r in rows)
    assert "sliced-W2" in assert_ok(invoke("sample", "--ckpt", tmp_path / "s", "--n", 20, "--out", tmp_path / "x.png"))
    assert_ok(invoke("eval", "--teacher", tmp_path / "t", "--student", tmp_path / "s", "--steps", "1", "--n", 20,
                     "--n-ref", 4, "--out", tmp_path / "ev"))


# ----------------------------------------------------------------------------- internal errors keep their context

def test_an_internal_error_is_one_line_plus_a_log_with_the_traceback(teacher, tmp_path, monkeypatch):
    def buggy(*a, **k):
        return np.zeros((2, 3)).transpose(0, 2, 3, 1)        # numpy's ValueError: a bug, not bad input
    monkeypatch.setattr(images, "plane", buggy)              # the scatter plot of the evaluation calls it
    out = assert_error(invoke("eval", "--teacher", teacher, "--steps", "1", "--n", 16, "--n-ref", 4,
                              "--out", tmp_path / "ev"),
                       "internal error (ValueError: axes don't match array)", "please report it")
    log = re.search(r"the traceback is in (\S+)\.", out).group(1)
    text = open(log).read()
    assert "Traceback" in text and "in buggy" in text and "transpose(0, 2, 3, 1)" in text
    # bad input stays one line without a log
    out = assert_error(invoke("sample", "--ckpt", tmp_path / "missing", "--out", tmp_path / "a.png"))
    assert "internal error" not in out


# ----------------------------------------------------------------------------- imagefolder: the data's resolution

@pytest.mark.parametrize("side, resolution, model", [(32, 32, "cifar10"), (16, 16, "cifar10"), (30, 28, "cifar10"),
                                                     (64, 64, "celebahq64"), (100, 64, "celebahq64")])
def test_the_imagefolder_recipe_follows_the_datas_resolution(tmp_path, rng, side, resolution, model):
    from ttfm_np import pipeline
    data = f"imagefolder:{_pngs(tmp_path / 'imgs', 2, side, rng)}"
    assert pipeline.image_resolution(data) == resolution
    assert pipeline.image_resolution(data, 48) == 48                          # --resolution wins
    assert recipes.teacher_recipe(data, resolution=resolution)["model"] == model
    assert recipes.distill_recipe(data, resolution=resolution)["batch_size"] == (128 if model == "cifar10" else 64)


def test_distill_takes_resolution_for_imagefolder_data(tmp_path, rng):
    imgs = _pngs(tmp_path / "imgs", 8, 16, rng)
    data = f"imagefolder:{imgs}"
    assert_ok(invoke("train", "--data", data, "--model", "tiny", "--batch-size", 4, "--steps", 1,
                     "--out", tmp_path / "t"))                                   # trained at the images' 16 px
    from ttfm_np import ckpt
    assert ckpt.load_checkpoint(tmp_path / "t" / "checkpoint.h5")["config"]["resolution"] == 16
    run = ["distill", "--data", data, "--teacher", tmp_path / "t", "--batch-size", 4, "--steps", 1,
           "--eval-steps", "1", "--eval-n", 4, "--eval-n-ref", 2]
    assert_error(invoke(*run, "--resolution", 32, "--out", tmp_path / "a"), "--resolution 32", "trained at 16x16")
    assert_ok(invoke(*run, "--resolution", 16, "--out", tmp_path / "b"))


def test_a_default_teacher_batch_over_the_data_says_how_to_size_it(tmp_path):
    np.save(tmp_path / "p.npy", np.random.default_rng(0).standard_normal((100, 2)).astype(np.float32))
    assert_error(invoke("distill", "--data", f"points:{tmp_path / 'p.npy'}", "--batch-size", 16, "--steps", 2,
                        "--out", tmp_path / "s"),
                 "the default teacher's recipe", "larger than", "train a teacher first", "--teacher")


def test_a_full_disk_on_resume_names_the_file_and_the_fix(teacher, tmp_path, monkeypatch):
    import shutil
    run = tmp_path / "t"
    shutil.copytree(teacher, run)
    with open(run / "metrics.jsonl", "a") as f:                # a line after the checkpoint: resume rewrites the log
        f.write('{"step": 99, "loss": 1.0}\n')
    monkeypatch.setattr(builtins, "open", _DiskFull(10))
    out = assert_error(invoke("train", *TEACHER, "--steps", 12, "--out", run, "--resume"),
                       str(run / "metrics.jsonl"), "No space left", "free space")
    assert "[Errno" not in out


def test_checkpoints_from_before_input_hashes_still_resume():
    from ttfm_np import train
    saved = {"data": "toy:moons", "train": {"lr": 1e-3}}
    assert train.config_differences(saved, dict(saved, inputs={"data": None, "teacher": "ab" * 32})) == []


def test_resume_after_a_cut_off_metrics_line(teacher, tmp_path):
    import shutil
    run = tmp_path / "t"
    shutil.copytree(teacher, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 0.5, "grad_n')               # killed while appending
    assert_ok(invoke("train", *TEACHER, "--steps", 12, "--out", run, "--resume"))
    rows = jsonio.read_jsonl(run / "metrics.jsonl")               # every line whole again
    assert [r["step"] for r in rows][-1] == 12
    with open(run / "metrics.jsonl", "r+") as f:                  # damage in the middle is named
        text = f.read()
        f.seek(0)
        f.write(text.replace("{", "{{", 1))                         # the first line is no longer JSON
    assert_error(invoke("train", *TEACHER, "--steps", 13, "--out", run, "--resume"), "metrics.jsonl line",
                 "repair or delete that line")
