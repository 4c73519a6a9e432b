"""evaluate.reference_solution: the on-disk cache returns exactly what a fresh
solve gives, and any change of noise, step count or checkpoint recomputes."""
import os

import numpy as np

from ttfm_np import backend, evaluate, model, sampling


class CountingTeacher(sampling.LoadedModel):
    calls = 0

    def generate(self, z, steps, solver="euler", grid=None, chunk=128):
        CountingTeacher.calls += 1
        return super().generate(z, steps, solver, grid, chunk)


def _teacher(tmp_path):
    backend.select_device("cpu")
    cfg = model.make_config("mlp-tiny", (2,))
    p = model.init_model(cfg, seed=0)
    rng = np.random.default_rng(1)
    p = {k: v + 0.3 * rng.standard_normal(v.shape).astype(v.dtype) for k, v in p.items()}   # not zero-init
    ckpt_file = tmp_path / "checkpoint.h5"
    ckpt_file.write_bytes(b"stands in for the checkpoint: only its size and mtime are read")
    return CountingTeacher(params=p, cfg=cfg, config={}, path=str(ckpt_file))


def test_cached_reference_equals_a_fresh_solve_and_is_reused(tmp_path):
    tm = _teacher(tmp_path)
    z = np.random.default_rng(2).standard_normal((16, 2)).astype(np.float32)
    fresh = tm.generate(z, 8, "heun")
    CountingTeacher.calls = 0
    cache = str(tmp_path / "cache")
    first = evaluate.reference_solution(tm, z, 8, cache)
    second = evaluate.reference_solution(tm, z, 8, cache)
    assert CountingTeacher.calls == 1                          # the second call read the file
    np.testing.assert_array_equal(first, fresh)
    np.testing.assert_array_equal(second, fresh)
    assert len(os.listdir(cache)) == 1 and not any(".tmp" in f for f in os.listdir(cache))


def test_changed_noise_steps_or_checkpoint_recompute(tmp_path):
    tm = _teacher(tmp_path)
    z = np.random.default_rng(2).standard_normal((16, 2)).astype(np.float32)
    cache = str(tmp_path / "cache")
    evaluate.reference_solution(tm, z, 8, cache)
    CountingTeacher.calls = 0
    z2 = z.copy()
    z2[0, 0] += 1e-3
    np.testing.assert_array_equal(evaluate.reference_solution(tm, z2, 8, cache), tm.generate(z2, 8, "heun"))
    evaluate.reference_solution(tm, z, 4, cache)
    st = os.stat(tm.path)
    os.utime(tm.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # a newer checkpoint
    evaluate.reference_solution(tm, z, 8, cache)
    assert CountingTeacher.calls == 1 + 1 + 1 + 1               # 3 recomputations + the direct generate
    assert len(os.listdir(cache)) == 4


def test_solver_is_part_of_the_key_and_teacher_rows_are_cached(tmp_path):
    """Euler 4 and Heun 4 from the same noise are different files; a second student's evaluation
    reads every teacher solution (reference, Euler N, Heun N/2) from the cache."""
    tm = _teacher(tmp_path)
    z = np.random.default_rng(4).standard_normal((8, 2)).astype(np.float32)
    cache = str(tmp_path / "cache")
    euler = evaluate.teacher_solution(tm, z, 4, "euler", cache)
    heun = evaluate.teacher_solution(tm, z, 4, "heun", cache)
    np.testing.assert_array_equal(euler, tm.generate(z, 4, "euler"))
    np.testing.assert_array_equal(heun, tm.generate(z, 4, "heun"))
    assert not np.array_equal(euler, heun) and len(os.listdir(cache)) == 2
    first = evaluate.generate_samples(tm, None, z, steps=(1, 2), n_ref=8, cache_dir=cache)
    CountingTeacher.calls = 0
    second = evaluate.generate_samples(tm, None, z, steps=(1, 2), n_ref=8, cache_dir=cache)
    assert CountingTeacher.calls == 0                          # reference, euler 1/2, heun 1: all read
    assert first.keys() == second.keys() == {"reference", "euler_1", "euler_2", "heun_1"}
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_unwritable_cache_warns_and_still_evaluates(tmp_path):
    tm = _teacher(tmp_path)
    z = np.random.default_rng(3).standard_normal((4, 2)).astype(np.float32)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should go")
    import pytest
    with pytest.warns(UserWarning, match="could not cache"):
        x = evaluate.reference_solution(tm, z, 4, str(blocker / "cache"))
    np.testing.assert_array_equal(x, tm.generate(z, 4, "heun"))


def test_precomputed_teacher_solutions_are_exactly_what_the_evaluation_reads(tmp_path, monkeypatch):
    """pipeline.distill solves the teacher ahead in a child process (evaluate.precompute_teacher_solutions);
    its plan (teacher_solutions_needed) must cover every teacher solution generate_samples asks for,
    with the same noise and cache keys, or the evaluation would compute them again."""
    from ttfm_np import ckpt, pipeline
    fake = _teacher(tmp_path)
    path = str(tmp_path / "teacher" / "checkpoint.h5")        # a real checkpoint: the child loads it
    os.makedirs(os.path.dirname(path))
    ckpt.save_checkpoint(path, fake.params, ema=fake.params, config=dict(task="teacher", model=fake.cfg.to_dict()))
    tm = sampling.load_model(path, weights="ema", dtype="float32", role="teacher")
    cache = str(tmp_path / "reference_cache")
    steps, n_ref, n, seed = (1, 2, 3, 4), 8, 12, 5
    evaluate.precompute_teacher_solutions(tm.path, n, seed, steps, n_ref, "float32", cache)
    assert len(os.listdir(cache)) == len(evaluate.teacher_solutions_needed(steps, n_ref)) == 1 + 4 + 2
    loaded = sampling.load_model(tm.path, weights="ema", dtype="float32", role="teacher")
    calls = []
    monkeypatch.setattr(sampling.LoadedModel, "generate", lambda self, *a: calls.append(a) or 1 / 0)
    samples = evaluate.generate_samples(loaded, None, loaded.noise(n, seed), steps, n_ref, cache)
    assert calls == [] and set(samples) == {"reference", "euler_1", "euler_2", "euler_3", "euler_4",
                                            "heun_1", "heun_2"}
    # the background process of pipeline.distill writes the same files (spawned: a fresh interpreter)
    monkeypatch.undo()
    cache2 = os.path.join(os.path.dirname(path), "reference_cache")
    with pipeline._teacher_solutions_ahead(True, tm.path, n, seed, steps, n_ref, "float32"):
        pass
    assert sorted(os.listdir(cache2)) == sorted(os.listdir(cache))      # same keys: same noise and checkpoint
    # Not bit-identical under pytest: conftest imports NumPy before ttfm_np.blas can pick OpenBLAS's
    # Haswell kernels, the fresh child picks them, and other GEMM kernels round float32 differently
    # (~1e-7 relative per pass). Over at most 2 n_ref = 16 passes of a flow that does not amplify
    # differences much on [0, 1], 16 passes x 8 ulp ~ 1e-5 of max |x| bounds it (measured: 3e-7).
    for name in os.listdir(cache):
        got, want = np.load(os.path.join(cache2, name)), np.load(os.path.join(cache, name))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
