"""A U-Net's blocks of samples on worker processes (ttfm_np/block_processes.py) against the same blocks on
threads: outputs, input gradients and parameter gradients; errors, dropped caches, a killed child."""
import gc
import os

import numpy as np
import pytest

from ttfm_np import block_processes as bp
from ttfm_np import blas, conv, model, parallel, precision

pytestmark = pytest.mark.skipif(os.name != "posix", reason="block worker processes need a POSIX system")


@pytest.fixture
def two_workers():
    """Two blocks per U-Net pass, processes on; the previous settings restored afterwards."""
    parallel.set_workers(2)
    previous = bp.set_enabled(True)
    yield
    bp.set_enabled(previous)
    parallel.set_workers(None)


def net(rng, two_time=False, dtype=np.float64):
    cfg = model.make_config("tiny", (3, 16, 16), two_time=two_time)
    p = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(dtype) for k, v in model.init_model(cfg, 0).items()}
    return cfg, p        # every parameter perturbed: the zero-initialised output layer would hide the backward


def both_ways(p, cfg, x, s, t, du):
    """(u, dx, grads) with the blocks on processes, then on threads."""
    out = []
    for processes in (True, False):
        bp.set_enabled(processes)
        u, cache = model.model_forward(p, cfg, x, s, t)
        assert isinstance(cache[1], bp.BlockCache) == processes
        dx, grads = model.model_backward(du, cache)
        out.append((u, dx, grads))
    bp.set_enabled(True)
    return out


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("two_time", [False, True])
def test_processes_match_threads(rng, two_workers, two_time):
    """float64: the same blocks, the same per-block arithmetic (the child runs this process's OpenBLAS
    kernels), the parameter gradients the blocks' sums in block order either way; measured bit for bit,
    asserted to rounding (the child's arrays sit at other addresses)."""
    cfg, p = net(rng, two_time)
    x = rng.standard_normal((5, 3, 16, 16))
    s, t = rng.random(5), (rng.random(5) if two_time else None)
    du = rng.standard_normal(x.shape)
    (u1, dx1, g1), (u2, dx2, g2) = both_ways(p, cfg, x, s, t, du)
    assert rel(u1, u2) < 1e-13 and rel(dx1, dx2) < 1e-13
    assert set(g1) == set(g2) == set(p)
    for k in p:
        assert g1[k].dtype == p[k].dtype and rel(g1[k], g2[k]) < 1e-12, k
    u3, none = model.model_forward(p, cfg, x, s, t, need_grad=False)       # no cache kept anywhere
    assert none is None and rel(u3, u2) < 1e-13
    assert all(child["caches"] == 0 for child in bp.status())
    assert all(child["kernels"] == blas.kernel_set() for child in bp.status())   # whichever loaded first here


def test_float32_gradients_within_rounding(rng, two_workers):
    cfg, p = net(rng, dtype=np.float32)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    s, du = rng.random(4).astype(np.float32), rng.standard_normal(x.shape).astype(np.float32)
    (u1, dx1, g1), (u2, dx2, g2) = both_ways(p, cfg, x, s, None, du)
    assert u1.dtype == dx1.dtype == np.float32
    assert rel(u1, u2) < 1e-5 and rel(dx1, dx2) < 1e-5
    assert all(g1[k].dtype == np.float32 and rel(g1[k], g2[k]) < 1e-4 for k in p)


def test_an_error_is_raised_and_the_workers_go_on(rng, two_workers):
    cfg, p = net(rng)
    x, s = rng.standard_normal((4, 3, 16, 16)), rng.random(4)
    with pytest.raises(ValueError, match="U-Net built for inputs"):            # this process's own block fails
        model.model_forward(p, cfg, x[:, :2], s)
    u, cache = model.model_forward(p, cfg, x, s)
    model.model_backward(np.ones_like(u), cache)
    _, cache = model.model_forward(p, cfg, x, s, need_grad=True)
    child = bp._children[0]
    child.send(("backward", [], bp._settings(), 10**9, None, np.ones((2, 3, 16, 16))))         # a token the child never saw
    with pytest.raises(bp.BlockProcessError, match="no cache for token"):
        child.receive()
    model.model_backward(np.ones_like(u), cache)                               # the real one still works


def test_a_cache_dropped_without_a_backward_is_freed_in_the_child(rng, two_workers):
    cfg, p = net(rng)
    x, s = rng.standard_normal((4, 3, 16, 16)), rng.random(4)
    kept = [model.model_forward(p, cfg, x, s)[1] for _ in range(3)]
    assert bp.status()[0]["caches"] == 3
    del kept
    gc.collect()
    assert bp.status()[0]["caches"] == 0                                       # the drops ride on the next message


def test_a_killed_worker_is_started_again(rng, two_workers):
    cfg, p = net(rng)
    x, s = rng.standard_normal((4, 3, 16, 16)), rng.random(4)
    u, _ = model.model_forward(p, cfg, x, s, need_grad=False)
    old = bp._children[0].process
    old.kill()
    old.wait()
    u2, _ = model.model_forward(p, cfg, x, s, need_grad=False)                 # between calls: replaced
    assert bp._children[0].process.pid != old.pid and rel(u2, u) < 1e-13
    _, cache = model.model_forward(p, cfg, x, s)
    bp._children[0].process.kill()                                             # during a call: a clear error
    bp._children[0].process.wait()
    with pytest.raises(bp.BlockProcessError, match="exited"):
        model.model_backward(np.ones_like(u), cache)
    u3, _ = model.model_forward(p, cfg, x, s, need_grad=False)
    assert rel(u3, u) < 1e-13


def test_the_mlp_and_single_worker_stay_in_process(rng):
    parallel.set_workers(1)
    try:
        cfg, p = net(rng)
        _, cache = model.model_forward(p, cfg, rng.standard_normal((4, 3, 16, 16)), rng.random(4))
        assert not isinstance(cache[1], bp.BlockCache)
    finally:
        parallel.set_workers(None)
    assert bp.memory_overhead(model.make_config("mlp", (2,)), 10**6, 2) == 0
    assert bp.memory_overhead(model.make_config("tiny", (3, 16, 16)), 10**6, 1) == 0


def test_the_workers_compute_with_this_processs_switches(rng, two_workers):
    """--precision tf32 rounds every GEMM operand to 10 mantissa bits (emulated on NumPy): a worker that
    kept fp32 would differ from the threaded rows by ~1e-3, far above float32 rounding."""
    cfg, p = net(rng, dtype=np.float32)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    s, du = rng.random(4).astype(np.float32), rng.standard_normal(x.shape).astype(np.float32)
    previous_algorithm = conv.set_conv3x3_algorithm("im2col")
    try:
        with precision.using("tf32"):
            (u1, dx1, g1), (u2, dx2, g2) = both_ways(p, cfg, x, s, None, du)
            assert bp.status()[0]["settings"] == bp._settings()
            assert bp._settings()["precision"] == "tf32" and bp._settings()["conv3x3"] == "im2col"
        fp32 = both_ways(p, cfg, x, s, None, du)[0][0]
    finally:
        conv.set_conv3x3_algorithm(previous_algorithm)
    # a rounding difference in fp32 may flip an operand's TF32 rounding (2^-11): the bound is TF32's
    assert rel(u1, u2) < 2e-3 and rel(dx1, dx2) < 2e-3
    assert all(rel(g1[k], g2[k]) < 2e-3 for k in p)
    assert rel(u1[2:], fp32[2:]) > 1e-4                  # the worker's rows really were computed in tf32


def test_a_reply_left_unread_by_an_interrupted_call_is_not_taken_for_the_next(rng, two_workers, monkeypatch):
    """Ctrl-C between sending a block and reading its reply leaves the reply in the pipe: the next call
    must not read it as its own (same shape, other values)."""
    cfg, p = net(rng)
    x, s = rng.standard_normal((4, 3, 16, 16)), rng.random(4)
    u, _ = model.model_forward(p, cfg, x, s, need_grad=False)
    real = bp._Child.receive

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(bp._Child, "receive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.model_forward(p, cfg, 2 * x, s, need_grad=False)                  # its reply stays unread
    monkeypatch.setattr(bp._Child, "receive", real)
    assert bp._children[0].pending == 1
    u2, _ = model.model_forward(p, cfg, x, s, need_grad=False)
    assert rel(u2, u) < 1e-13 and bp._children[0].pending == 0


def test_a_worker_that_cannot_start_says_how_to_run_without(rng, two_workers, monkeypatch):
    cfg, p = net(rng)
    x, s = rng.standard_normal((4, 3, 16, 16)), rng.random(4)
    bp.shutdown()                                                               # no worker left to reuse
    monkeypatch.setattr("sys.executable", "/nonexistent/python")
    with pytest.raises(bp.BlockProcessError, match="could not start.*TTFM_BLOCK_PROCESSES=0"):
        model.model_forward(p, cfg, x, s)
    monkeypatch.undo()
    parallel.set_workers(2)
    bp.set_enabled(True)
    u, _ = model.model_forward(p, cfg, x, s, need_grad=False)                   # starts normally again
    assert u.shape == x.shape and bp._children[0].alive()
