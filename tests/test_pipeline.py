"""ttfm_np.pipeline and the pieces the CLI leans on: run-folder choice for the
main job, the CPU-time estimate, progress lines off a terminal, the seed scheme."""
import io
import os

import numpy as np
import pytest

from ttfm_np import ckpt, pipeline, recipes, seeds, train
from ttfm_np.losses import DistillLossConfig
from ttfm_np.progress import Progress, format_seconds


@pytest.fixture
def tiny_recipes(tmp_path, monkeypatch):
    """Quick toy recipes small enough for a test; data root and runs/ inside tmp_path."""
    monkeypatch.setattr(recipes, "DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(recipes, "RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setitem(recipes.QUICK_TEACHER_RECIPES, "toy",
                        dict(model="mlp-tiny", steps=12, batch_size=32, lr=1e-2, warmup=2, ema_decay=0.9))
    monkeypatch.setitem(recipes.QUICK_DISTILL_RECIPES, "toy",
                        dict(steps=6, batch_size=32, lr=1e-3, warmup=2, ema_decay=0.9))
    return tmp_path


def test_main_job_reuses_a_finished_run_and_never_overwrites_another(tiny_recipes, capsys):
    kw = dict(quick=True, eval_steps=(1,), eval_n=16, eval_n_ref=4, progress=False)
    first = pipeline.distill("toy:moons", **kw)
    assert first.step == 6 and not first.reused
    assert first.out == os.path.join(str(tiny_recipes / "runs"), "distill-toy-moons-itvm-quick")
    mtime = os.stat(first.checkpoint).st_mtime_ns
    again = pipeline.distill("toy:moons", **kw)                   # same settings: reused, not retrained
    assert again.reused and again.out == first.out
    assert os.stat(first.checkpoint).st_mtime_ns == mtime
    assert "reusing the finished run" in capsys.readouterr().err
    other = pipeline.distill("toy:moons", loss=DistillLossConfig(lambda_init=0.5), **kw)   # other settings
    assert other.out == first.out + "-2" and not other.reused
    assert ckpt.load_checkpoint(first.checkpoint)["config"]["loss"]["lambda_init"] == 1.0


def test_cpu_estimate_asks_for_confirmation_and_leaves_nothing(tiny_recipes):
    out = tiny_recipes / "t"
    with pytest.raises(train.NeedsConfirmation, match="--yes"):
        pipeline.train_teacher("toy:moons", model_name="mlp-tiny", out=str(out), steps=1000, batch_size=32,
                               progress=False, max_cpu_hours=1e-9)
    assert not out.exists()                                       # a run that saved nothing leaves no folder
    res = pipeline.train_teacher("toy:moons", model_name="mlp-tiny", out=str(out), steps=5, batch_size=32,
                                 progress=False, max_cpu_hours=None)
    assert res.step == 5 and os.path.exists(res.checkpoint)


def test_progress_prints_lines_with_eta_when_not_a_terminal():
    stream = io.StringIO()                                        # not a tty: plain lines, no bar
    with Progress(4, "train", every_s=0.0, stream=stream) as bar:
        for i in range(4):
            bar.update(1, status=f"loss {1.0 / (i + 1):.3f}")
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 4
    assert lines[-1].startswith("train  4/4  loss 0.250") and "it/s" in lines[-1] and "ETA 0s" in lines[-1]
    assert format_seconds(3725) == "1h02m" and format_seconds(381) == "6m21s" and format_seconds(float("inf")) == "?"


def test_seed_scheme_is_deterministic_and_separates_streams():
    assert seeds.derive(3, "step", 10, 0) == seeds.derive(3, "step", 10, 0)
    values = {seeds.derive(3, "step", 10, 0), seeds.derive(3, "step", 10, 1), seeds.derive(3, "step", 11, 0),
              seeds.derive(4, "step", 10, 0), seeds.derive(3, "noise", 10, 0)}
    assert len(values) == 5 and all(0 <= v < 2**63 for v in values)
    a = seeds.generator(0, "noise", 0).standard_normal(1000)
    b = seeds.generator(0, "noise", 1).standard_normal(1000)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.15                    # independent streams, not shifted copies
    with pytest.raises(ValueError, match=">= 0"):
        seeds.derive(0, -1)


def test_resume_lists_every_changed_setting(tiny_recipes):
    out = str(tiny_recipes / "t")
    pipeline.train_teacher("toy:moons", model_name="mlp-tiny", out=out, steps=4, batch_size=32, progress=False)
    with pytest.raises(train.ResumeMismatch) as info:
        pipeline.train_teacher("toy:moons", model_name="mlp-tiny", out=out, steps=8, batch_size=16, lr=0.5,
                               resume=True, progress=False)
    msg = str(info.value)
    assert "train.batch_size: 32 -> 16" in msg and "train.lr:" in msg and "-> 0.5" in msg and "steps" not in msg.split("(")[1].split(")")[0]
    res = pipeline.train_teacher("toy:moons", model_name="mlp-tiny", out=out, steps=8, batch_size=32,
                                 resume=True, progress=False)      # more --steps is a safe change
    assert res.step == 8


@pytest.mark.numerics
def test_evaluation_split_over_ranks_equals_one_process(tiny_recipes):
    """K ranks (threads with a fake communicator) each generate their rows of the noise; the gathered
    table equals the one-process table, and only rank 0 writes eval.json.

    Float32: a rank's rows go through GEMMs of 3-4 rows instead of 10, which rounds differently
    on some BLAS kernels (AVX2) and not on others, so the rows agree within the tolerances
    derived in tests/float_bounds.py from the float32 error of the one-process samples."""
    from float_bounds import assert_rows_close, row_tolerances, sample_delta
    from test_distributed import run_ranks
    from ttfm_np import evaluate as evaluation, sampling
    kw = dict(quick=True, eval_steps=(1, 2), eval_n=10, eval_n_ref=4, progress=False)
    run = pipeline.distill("toy:moons", **kw)
    one = run.rows
    results, errors = run_ranks(3, lambda comm: pipeline.evaluate_models(
        run.teacher, run.checkpoint, steps=(1, 2), n=10, n_ref=4, out=str(tiny_recipes / f"ev{comm.rank}"),
        comm=comm))
    assert errors == [None, None, None], errors
    # the one-process samples (float32) and the same computation in float64 from the same float32 noise
    t32, s32 = (sampling.load_model(p, "ema", role=r) for p, r in ((run.teacher, "teacher"), (run.checkpoint, "student")))
    t64, s64 = (sampling.load_model(p, "ema", dtype="float64", role=r)
                for p, r in ((run.teacher, "teacher"), (run.checkpoint, "student")))
    z = t32.noise(10, 0)
    x32 = evaluation.generate_samples(t32, s32, z, (1, 2), n_ref=4)
    x64 = evaluation.generate_samples(t64, s64, z.astype(np.float64), (1, 2), n_ref=4)
    keys = ["reference"] + [k for k in x32 if k != "reference"]          # the rows' order (table_rows)
    assert len(keys) == len(one)
    delta = {k: sample_delta(x32[k], x64[k]) for k in keys}
    assert max(delta.values()) < 1e-4 * max(float(np.abs(x).max()) for x in x32.values())   # tight enough to see a wrong row
    heldout = pipeline._heldout_points("toy:moons", None, 10)
    tols = [row_tolerances(r, delta[k], delta["reference"], x32[k], heldout) for r, k in zip(one, keys)]
    assert_rows_close(evaluation.table_rows(x32, 4, heldout), one, tols)   # the test's samples are the run's
    for rows in results:
        assert_rows_close(rows, one, tols)
    assert (tiny_recipes / "ev0" / "eval.json").exists()
    assert not (tiny_recipes / "ev1").exists() and not (tiny_recipes / "ev2").exists()


@pytest.mark.numerics
def test_sampling_split_over_ranks_equals_one_process(tiny_recipes):
    """sample under K ranks: each generates its rows of every noise batch; the gathered samples are
    the one-process samples, and only rank 0 writes the PNG.

    Float32: rows generated in GEMMs of 85 rows instead of 256 may round differently (AVX2 kernels
    do, AVX-512 ones happen not to), so they agree within the bound of tests/float_bounds.py:
    5x the one-process samples' float32 error against float64 from the same noise."""
    from float_bounds import sample_delta
    from test_distributed import run_ranks
    from ttfm_np import backend, sampling
    run = pipeline.distill("toy:moons", quick=True, eval_steps=(1,), eval_n=8, eval_n_ref=2, progress=False)
    one = pipeline.sample(run.checkpoint, out=str(tiny_recipes / "one.png"), steps=2, n=300)["samples"]
    results, errors = run_ranks(3, lambda comm: pipeline.sample(
        run.checkpoint, out=str(tiny_recipes / f"r{comm.rank}.png"), steps=2, n=300, comm=comm))
    assert errors == [None, None, None], errors
    m32, m64 = sampling.load_model(run.checkpoint), sampling.load_model(run.checkpoint, dtype="float64")
    x64 = np.concatenate([backend.to_numpy(m64.generate(m32.noise(n_b, 0, b).astype(np.float64), 2))
                          for b, n_b in enumerate((256, 44))])              # sample()'s noise batches of 256
    delta = sample_delta(one, x64)
    assert delta < 1e-4 * float(np.abs(one).max())                         # tight enough to see a wrong row
    for info in results:
        assert info["samples"].shape == one.shape
        err = float(np.abs(info["samples"].astype(np.float64) - one).max())
        assert err <= delta, f"K-rank samples differ from one process by {err:.3g} > {delta:.3g}"
    assert (tiny_recipes / "r0.png").exists() and not (tiny_recipes / "r1.png").exists()


def test_ranks_share_image_data_through_one_memory_mapped_file(tmp_path, monkeypatch, rng):
    """Under K ranks rank 0 decodes an image folder once into <data root>/cache; every rank maps it."""
    from PIL import Image
    from test_distributed import run_ranks
    monkeypatch.setattr(recipes, "DATA_DIR", str(tmp_path / "data"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3)).astype(np.uint8)).save(imgs / f"{i}.png")
    one = pipeline._training_data(f"imagefolder:{imgs}", resolution=8)
    results, errors = run_ranks(2, lambda comm: pipeline._training_data(f"imagefolder:{imgs}", resolution=8,
                                                                          comm=comm))
    assert errors == [None, None], errors
    for ds in results:
        assert isinstance(ds.data, np.memmap) and ds.kind == "image"
        np.testing.assert_array_equal(np.asarray(ds.data), one.data)
    assert len(os.listdir(tmp_path / "data" / "cache")) == 1
    # a second start maps the cached file without decoding a single image
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded the images although the cache holds them")
    monkeypatch.setattr(pipeline.datasets, "load_imagefolder", no_decoding)
    results, errors = run_ranks(2, lambda comm: pipeline._training_data(f"imagefolder:{imgs}", resolution=8,
                                                                          comm=comm))
    assert errors == [None, None], errors
    np.testing.assert_array_equal(np.asarray(results[1].data), one.data)
    # a changed file (here in a subfolder: the listing is recursive, like the decoder) is a new key
    (imgs / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (12, 12, 3)).astype(np.uint8)).save(imgs / "sub" / "5.png")
    monkeypatch.undo()
    monkeypatch.setattr(recipes, "DATA_DIR", str(tmp_path / "data"))
    results, errors = run_ranks(2, lambda comm: pipeline._training_data(f"imagefolder:{imgs}", resolution=8,
                                                                          comm=comm))
    assert errors == [None, None], errors
    assert len(results[0].data) == 6 and len(os.listdir(tmp_path / "data" / "cache")) == 2


def test_teacher_solutions_are_computed_ahead_only_where_a_core_is_free(monkeypatch):
    """A second process for the evaluation's teacher solutions: MLP teachers on the CPU, one process,
    at least two usable CPUs; never for U-Nets (their training takes every core) or a single CPU."""
    from ttfm_np import model, parallel
    mlp, unet = model.make_config("mlp-tiny", (2,)), model.make_config("tiny", (1, 8, 8))
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 2)
    assert pipeline._solve_teacher_ahead(mlp) and not pipeline._solve_teacher_ahead(unet)
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 1)
    assert not pipeline._solve_teacher_ahead(mlp)


def test_main_job_evaluates_from_the_solutions_computed_ahead(tiny_recipes, monkeypatch):
    """distill on toy data: the child process fills the teacher's reference cache during training,
    so the evaluation in this process solves no teacher ODE (every teacher row is a cache hit)."""
    from ttfm_np import evaluate, parallel
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 2)
    solved = []
    real = evaluate.teacher_solution

    def counting(teacher, z, n_steps, solver="heun", cache_dir=None):
        before = set(os.listdir(cache_dir)) if cache_dir and os.path.isdir(cache_dir) else set()
        out = real(teacher, z, n_steps, solver, cache_dir)
        solved.append(set(os.listdir(cache_dir)) - before)          # a new file: solved here, not read
        return out
    monkeypatch.setattr(evaluate, "teacher_solution", counting)
    run = pipeline.distill("toy:moons", quick=True, eval_steps=(1, 2), eval_n=16, eval_n_ref=4, progress=False)
    assert len(solved) == len(evaluate.teacher_solutions_needed((1, 2), 4)) and not any(solved)
    assert run.rows and run.rows[0]["method"].startswith("teacher heun 4")


def test_invalid_evaluation_steps_are_refused_before_training(tiny_recipes):
    """A bad --eval-steps is an error before any training (and before the teacher-solutions process)."""
    with pytest.raises(ValueError, match="step counts must be integers >= 1"):
        pipeline.distill("toy:moons", quick=True, eval_steps=(0, 2), eval_n=8, eval_n_ref=2, progress=False)
    assert not os.path.exists(tiny_recipes / "runs")                  # nothing trained, nothing written
