"""ttfm_np/parallel.py: the static split, ordered results, serial fallbacks, errors, BLAS threads."""
import threading

import numpy as np
import pytest

from ttfm_np import blas, parallel


@pytest.fixture(autouse=True)
def _unpinned():
    yield
    parallel.set_workers(None)


@pytest.mark.parametrize("n, parts", [(10, 2), (11, 2), (3, 4), (1, 2), (7, 3), (0, 2)])
def test_split_range_covers_every_row_once_in_contiguous_blocks(n, parts):
    blocks = parallel.split_range(n, parts)
    rows = [i for lo, hi in blocks for i in range(lo, hi)]
    assert rows == list(range(n))
    assert all(hi > lo for lo, hi in blocks) and len(blocks) <= max(1, min(parts, n))
    sizes = [hi - lo for lo, hi in blocks]
    assert not sizes or max(sizes) - min(sizes) <= 1


def test_run_split_runs_the_blocks_on_separate_threads_and_returns_them_in_order(rng):
    parallel.set_workers(2)
    x = rng.standard_normal((9, 5))
    seen = []

    def part(lo, hi):
        seen.append(threading.current_thread().name)
        return x[lo:hi].sum(axis=0)
    parts = parallel.run_split(part, len(x))
    assert len(parts) == 2 and len(set(seen)) == 2
    np.testing.assert_array_equal(parts[0], x[:5].sum(axis=0))
    np.testing.assert_array_equal(parts[1], x[5:].sum(axis=0))


def test_run_split_is_serial_outside_the_main_thread_and_for_small_blocks():
    parallel.set_workers(2)
    names = []
    t = threading.Thread(target=lambda: names.append(parallel.run_split(
        lambda lo, hi: (threading.current_thread().name, lo, hi), 8)), name="a-rank")
    t.start()
    t.join()
    assert names == [[("a-rank", 0, 8)]]                                    # one block, on the calling thread
    assert parallel.run_split(lambda lo, hi: (lo, hi), 8, min_rows=5) == [(0, 8)]   # 8 // 5 = 1 worker


def test_an_error_in_a_worker_is_raised_after_every_block_finished():
    parallel.set_workers(2)
    finished = []

    def part(lo, hi):
        if lo > 0:
            raise ValueError("block 2 failed")
        finished.append(lo)
        return lo
    with pytest.raises(ValueError, match="block 2 failed"):
        parallel.run_split(part, 4)
    assert finished == [0]


def test_blas_threads_are_one_inside_the_split_and_restored_after():
    if blas.get_threads() is None:
        pytest.skip("NumPy bundles no OpenBLAS here: no thread count to check")
    before = blas.get_threads()
    blas.set_threads(2)
    try:
        parallel.set_workers(2)
        inside = parallel.run_split(lambda lo, hi: blas.get_threads(), 4)
        assert inside == [1, 1] and blas.get_threads() == 2
    finally:
        blas.set_threads(before)


def test_worker_count_follows_openblas_unless_pinned():
    if blas.get_threads() is None:
        pytest.skip("NumPy bundles no OpenBLAS here")
    before = blas.get_threads()
    try:
        blas.set_threads(1)
        assert parallel.workers() == 1
        parallel.set_workers(2)
        assert parallel.workers() == min(2, parallel.usable_cpus())
        with pytest.raises(ValueError, match=">= 1"):
            parallel.set_workers(0)
    finally:
        blas.set_threads(before)


def test_workers_never_exceed_the_cpus_this_process_may_use(monkeypatch):
    """A container or taskset may allow fewer CPUs than the machine has (os.cpu_count()): the
    affinity mask caps the workers, or two threads would share one core."""
    import os
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("this OS reports no CPU affinity (os.sched_getaffinity)")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    parallel.set_workers(4)
    assert parallel.usable_cpus() == 1 and parallel.workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7})
    assert parallel.usable_cpus() == 3 and parallel.workers() == 3


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_groupnorm_split_over_threads_matches_the_serial_pass(rng, silu, dtype):
    """GroupNorm(+SiLU) on NumPy splits the batch over workers; every sample's rows are computed by
    the same code either way, and dgamma/dbeta add the blocks' partial sums (rounding only)."""
    from ttfm_np import groupnorm
    N, C, H, W = 5, 8, 16, 16                                 # 2048 entries a sample: 32 rows a block
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    gamma, beta = (1 + 0.1 * rng.standard_normal(C)).astype(dtype), (0.1 * rng.standard_normal(C)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dy_before = dy.copy()
    out = {}
    for k in (1, 2):
        parallel.set_workers(k)
        y, cache = groupnorm.groupnorm_forward(x, gamma, beta, 4, silu=silu)
        dx, g = groupnorm.groupnorm_backward(dy, cache)
        out[k] = (y, dx, g["gamma"], g["beta"])
    np.testing.assert_array_equal(dy, dy_before)              # the caller's dy is never written
    tol = 1e-13 if dtype == np.float64 else 2e-6
    for a, b in zip(out[1], out[2]):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_groupnorm_backward_writes_into_the_given_block_in_every_branch(rng):
    """groupnorm_backward_numpy(dx_out=...): with the cached sigmoid, with it recomputed, without SiLU."""
    from ttfm_np import groupnorm
    x = rng.standard_normal((2, 4, 3, 3))
    gamma, beta, dy = rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal((2, 4, 3, 3))
    for silu, keep in ((True, True), (True, False), (False, False)):
        y, mean, rstd, s = groupnorm._forward_numpy_keep_sigmoid(x, gamma, beta, 2, 1e-5, silu)
        ref = groupnorm.groupnorm_backward_numpy(dy, x, gamma, beta, mean, rstd, 2, silu,
                                                 y if keep else None, s if keep else None)
        out = np.full_like(x, np.nan)
        got = groupnorm.groupnorm_backward_numpy(dy, x, gamma, beta, mean, rstd, 2, silu,
                                                 y if keep else None, s if keep else None, dx_out=out)
        np.testing.assert_allclose(out, ref[0], rtol=1e-14, atol=1e-14)
        assert np.shares_memory(got[0], out)


@pytest.mark.parametrize("H, algorithm", [(16, "winograd"), (8, "im2col"), (5, "im2col")])
def test_conv3x3_split_over_threads_matches_the_serial_pass(rng, H, algorithm):
    """The stride-1 3x3 convolution (Winograd at 16x16 and up, the im2col/transposed path below) splits
    its sample chunks over workers: y and dx exactly as serial (each sample's arithmetic is the same),
    dW and db as sums of the blocks' parts (float64: rounding only)."""
    from ttfm_np import conv
    x = rng.standard_normal((5, 3, H, H))
    W, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    dy = rng.standard_normal((5, 4, H, H))
    out = {}
    for k in (1, 2):
        parallel.set_workers(k)
        y, cache = conv.conv2d_forward(x, W, b, 1, 1)
        assert (isinstance(cache[0], str) and cache[0] == "winograd") == (algorithm == "winograd")
        dx, g = conv.conv2d_backward(dy, cache)
        out[k] = (y, dx, g["weight"], g["bias"])
    for a, c in zip(out[1], out[2]):
        np.testing.assert_allclose(a, c, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_split_over_threads_matches_the_serial_pass(rng, bias):
    """1x1 convolutions on NumPy: per-sample products straight in NCHW, split over workers."""
    from ttfm_np import conv
    x = rng.standard_normal((5, 6, 4, 3))
    W, b = rng.standard_normal((7, 6, 1, 1)), (rng.standard_normal(7) if bias else None)
    dy = rng.standard_normal((5, 7, 4, 3))
    out = {}
    for k in (1, 2):
        parallel.set_workers(k)
        y, cache = conv.conv2d_forward(x, W, b, 1, 0)
        assert cache[0] == "pointwise"
        dx, g = conv.conv2d_backward(dy, cache)
        out[k] = (y, dx, g["weight"]) + ((g["bias"],) if bias else ())
        # against the definition: y[n, o, i, j] = b[o] + sum_c W[o, c] x[n, c, i, j]
        ref = np.einsum("oc,nchw->nohw", W[:, :, 0, 0], x) + (b.reshape(1, 7, 1, 1) if bias else 0)
        np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(g["weight"][:, :, 0, 0], np.einsum("nohw,nchw->oc", dy, x), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(dx, np.einsum("oc,nohw->nchw", W[:, :, 0, 0], dy), rtol=1e-13, atol=1e-13)
    for a, c in zip(out[1], out[2]):
        np.testing.assert_allclose(a, c, rtol=1e-13, atol=1e-12)


def test_sum_split_adds_the_blocks_fields_in_block_order_and_keeps_none():
    parallel.set_workers(2)
    x = np.arange(10.0)
    total, nothing = parallel.sum_split(lambda lo, hi: (x[lo:hi].sum(keepdims=True), None), len(x))
    assert nothing is None and total.tolist() == [45.0]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_starts_its_own_workers():
    """The parent's worker threads do not exist in a forked child: run_split there must not wait on them."""
    import os
    parallel.set_workers(2)
    assert parallel.run_split(lambda lo, hi: hi - lo, 4) == [2, 2]          # the parent's pool exists now
    pid = os.fork()
    if pid == 0:                                                             # child: exit 0 only if it works
        import signal
        signal.alarm(60)                  # a child stuck on the parent's dead workers is killed, not waited on
        code = 1
        try:
            code = 0 if parallel.run_split(lambda lo, hi: hi - lo, 4) == [2, 2] else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _blocks_against_one_pass(cfg, params, x, s, t=None):
    """model_forward + model_backward with 1 and with 2 workers (2: one pass per block of samples):
    u and dx the same rows as one pass, parameter gradients the blocks' sums (float64: rounding only)."""
    from ttfm_np import model
    du = np.random.default_rng(9).standard_normal(x.shape)
    out = {}
    for k in (1, 2):
        parallel.set_workers(k)
        assert (model._sample_blocks(cfg, x, None) is not None) == (k == 2)
        u, cache = model.model_forward(params, cfg, x, s, t)
        dx, grads = model.model_backward(du, cache)
        out[k] = (u, dx, grads)
    np.testing.assert_allclose(out[2][0], out[1][0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out[2][1], out[1][1], rtol=1e-12, atol=1e-12)
    for name, g in out[1][2].items():
        np.testing.assert_allclose(out[2][2][name], g, rtol=1e-11, atol=1e-12, err_msg=name)


def test_unet_pass_split_into_sample_blocks_matches_the_serial_pass(rng):
    from ttfm_np import model
    cfg = model.make_config("tiny", (3, 16, 16))
    params = {k: v.astype(np.float64) for k, v in model.init_model(cfg, 0).items()}
    params = {k: v + 0.01 * rng.standard_normal(v.shape) for k, v in params.items()}   # no zero-init outputs
    _blocks_against_one_pass(cfg, params, rng.standard_normal((5, 3, 16, 16)), rng.random(5))


def test_seeded_dropout_and_small_mlp_batches_are_not_split_into_sample_blocks(rng):
    from ttfm_np import model
    parallel.set_workers(2)
    x = rng.standard_normal((4, 3, 16, 16))
    drop = model.make_config("tiny", (3, 16, 16), dropout=0.1)
    assert model._sample_blocks(drop, x, dropout_seed=7) is None          # masks are drawn for the whole batch
    assert model._sample_blocks(drop, x, dropout_seed=None) is not None
    mlp = model.make_config("mlp", (2,))
    small = 2 * model.MLP_MIN_BLOCK_ROWS - 1                               # a block would be under the minimum
    assert model._sample_blocks(mlp, rng.standard_normal((small, 2)), None) is None
    assert model._sample_blocks(mlp, rng.standard_normal((small + 1, 2)), None) == [(0, small // 2 + 1),
                                                                                    (small // 2 + 1, small + 1)]


@pytest.mark.parametrize("two_time", [False, True])
def test_mlp_pass_split_into_sample_blocks_matches_the_serial_pass(rng, two_time):
    """A large MLP batch with two workers runs as two blocks (model.MLP_MIN_BLOCK_ROWS rows or more each)."""
    from ttfm_np import model
    cfg = model.make_config("mlp-tiny", (2,), two_time=two_time)
    params = {k: v.astype(np.float64) + 0.1 * rng.standard_normal(v.shape) for k, v in model.init_model(cfg, 0).items()}
    n = 2 * model.MLP_MIN_BLOCK_ROWS + 3
    _blocks_against_one_pass(cfg, params, rng.standard_normal((n, 2)), rng.random(n),
                             rng.random(n) if two_time else None)
