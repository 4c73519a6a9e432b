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
