"""Data-parallel pieces (ttfm_np/distributed.py).

Two layers of tests:
* in-process: a fake communicator whose K "ranks" are threads exchanging
  arrays through shared lists, so the sharding / bucketing / reduction logic
  is checked without MPI, against independent float64 references;
* real MPI: `mpiexec -n 2 python tests/dist_scripts.py ...` in subprocesses
  (skipped with the reason when mpi4py or mpiexec is missing).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from ttfm_np import distributed as D
from ttfm_np.data import BatchIterator
from ttfm_np.fid import FeatureStats, merge_feature_stats

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ----------------------------------------------------------------------------- a fake communicator

class RankGone(RuntimeError):
    """A thread rank waits in a collective that another rank, already finished or failed, never joins."""


class _Exchange:
    """What the thread "ranks" share: one slot per rank for every collective, and who has ended.

    No wall clock anywhere: a rank waits in a collective until every rank has arrived, or
    until a rank that has not arrived has ended (returned or raised): that rank can never
    come, so the waiting rank raises RankGone at once. A slow rank (a loaded machine) only
    makes the others wait longer; it cannot fail a test.
    """

    def __init__(self, size):
        self.size = size
        self.calls = {}                       # collective number -> one slot per rank
        self.arrived = {}                     # collective number -> ranks that have written their slot
        self.ended = set()                    # ranks whose function returned or raised
        self.cond = threading.Condition()

    def end(self, rank):
        with self.cond:
            self.ended.add(rank)
            self.cond.notify_all()


class ThreadComm(D.SingleProcess):
    """K ranks as K threads of one process; every collective is an allgather through shared slots."""

    kind = "threads"

    def __init__(self, rank, exchange):
        self.rank, self.size, self.x = rank, exchange.size, exchange
        self.local_rank, self.local_size = rank, exchange.size
        self.aborted, self.n_calls = None, 0

    def allgather_object(self, obj):
        # every collective has its own slots, so a rank that leaves a collective early (all
        # slots written) and goes on to the next one never overwrites a slot still being read
        n, x = self.n_calls, self.x
        self.n_calls += 1
        with x.cond:
            slots = x.calls.setdefault(n, [None] * self.size)
            arrived = x.arrived.setdefault(n, set())
            slots[self.rank] = obj
            arrived.add(self.rank)
            x.cond.notify_all()
            while len(arrived) < self.size:
                gone = sorted(x.ended - arrived)
                if gone:
                    raise RankGone(f"rank {self.rank} waits in collective #{n}, which rank(s) {gone} "
                                   "ended without joining: the ranks called different collectives")
                x.cond.wait()
        return list(slots)

    def allreduce_sum(self, buf):
        parts = self.allgather_object(buf.copy())
        total = parts[0].copy()
        for p in parts[1:]:                   # the same order on every rank: identical results
            total += p
        buf[...] = total
        return buf

    def allreduce_mean(self, buf):
        self.allreduce_sum(buf)
        buf /= self.size
        return buf

    def bcast(self, buf, root=0):
        buf[...] = self.allgather_object(buf.copy())[root]
        return buf

    def bcast_object(self, obj, root=0):
        return self.allgather_object(obj)[root]

    def barrier(self):
        self.allgather_object(None)

    def any_flag(self, flag):
        return any(self.allgather_object(bool(flag)))

    def abort_on_exit(self, status=1):
        self.aborted = status


def run_ranks(size, fn):
    """fn(comm) on `size` thread ranks; returns the list of results (exceptions re-raised per rank)."""
    ex = _Exchange(size)
    results, errors = [None] * size, [None] * size

    def body(r):
        try:
            results[r] = fn(ThreadComm(r, ex))
        except BaseException as exc:        # noqa: BLE001 - handed back to the test
            errors[r] = exc
        finally:
            ex.end(r)                 # a rank still waiting for this one raises RankGone now

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        # Collectives cannot hang (see _Exchange), so this bound is only a last resort against a
        # deadlock elsewhere: far above any run time of these tests, even on a loaded machine.
        t.join(600)
    assert not any(t.is_alive() for t in threads), "a thread rank is still running after 600 s (deadlock?)"
    return results, errors


def _ok(size, fn):
    results, errors = run_ranks(size, fn)
    for e in errors:
        if e is not None:
            raise e
    return results


# ----------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("n,k", [(8, 2), (7, 3), (5, 5), (128, 8)])
def test_shard_range_partitions_the_batch(n, k):
    ranges = [D.shard_range(n, r, k) for r in range(k)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))          # contiguous, disjoint
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_range_rejects_too_small_batches():
    with pytest.raises(ValueError, match="global batch >= the number of ranks"):
        D.shard_range(3, 0, 4)
    with pytest.raises(ValueError, match="outside"):
        D.shard_range(8, 2, 2)


def test_sharded_generator_slices_the_global_draws():
    """Ranks' draws concatenated = one process's draws, and the stream ends at the same place."""
    seed, n, k = 1234, 7, 3
    ref = np.random.default_rng(seed)
    ref_noise = ref.standard_normal((n, 2, 3), dtype=np.float32)
    ref_t = ref.random(n)
    ref_next = ref.random(4)
    got_noise, got_t = [], []
    for r in range(k):
        lo, hi = D.shard_range(n, r, k)
        g = D.ShardedGenerator(np.random.default_rng(seed), n, lo, hi)
        got_noise.append(g.standard_normal((hi - lo, 2, 3), dtype=np.float32))
        got_t.append(g.random(hi - lo))
        np.testing.assert_array_equal(g.rng.random(4), ref_next)
    np.testing.assert_array_equal(np.concatenate(got_noise), ref_noise)
    np.testing.assert_array_equal(np.concatenate(got_t), ref_t)


def test_sharded_generator_refuses_non_batch_draws():
    g = D.ShardedGenerator(np.random.default_rng(0), 8, 0, 4)
    with pytest.raises(ValueError, match="local batch"):
        g.random(3)
    with pytest.raises(ValueError, match="local batch"):
        g.standard_normal()


@pytest.mark.parametrize("k", [2, 3])
def test_batch_iterator_shards_join_to_the_global_batches(k):
    """K sharded iterators see together exactly the batches (and flips) of one iterator, across epochs."""
    rng = np.random.default_rng(5)
    data = rng.standard_normal((23, 1, 2, 3)).astype(np.float32)
    B = 6
    full = BatchIterator(data.copy(), B, seed=3, flip=True)
    shards = []
    for r in range(k):
        it = BatchIterator(data.copy(), B, seed=3, flip=True)
        it.set_shard(*D.shard_range(B, r, k))
        shards.append(it)
    for _ in range(9):                                   # > 2 epochs of 3 batches
        ref = full.next()
        np.testing.assert_array_equal(np.concatenate([it.next() for it in shards]), ref)
        assert all(it.state_dict() == full.state_dict() for it in shards)


def test_batch_iterator_rejects_a_bad_shard():
    it = BatchIterator(np.zeros((10, 2), np.float32), 4)
    with pytest.raises(ValueError, match="not inside a batch"):
        it.set_shard(2, 5)


# ----------------------------------------------------------------------------- bucket and reduction

def test_grad_bucket_round_trip_and_scale():
    rng = np.random.default_rng(1)
    grads = {"b.weight": rng.standard_normal((3, 4)), "a.bias": rng.standard_normal(5), "c": rng.standard_normal(())}
    bucket = D.GradBucket(grads, n_scalars=2)
    buf = bucket.pack(grads, [1.5, -2.0], scale=0.25)
    assert buf.shape == (12 + 5 + 1 + 2,) and buf.flags.c_contiguous
    out, scalars = bucket.unpack()
    for k in grads:
        np.testing.assert_array_equal(out[k], 0.25 * grads[k])
        assert out[k].shape == grads[k].shape
    assert scalars == [0.375, -0.5]
    with pytest.raises(ValueError, match="missing"):
        bucket.pack({"a.bias": grads["a.bias"]}, [0, 0])
    with pytest.raises(ValueError, match="shape"):
        bucket.pack(dict(grads, c=np.zeros(2)), [0, 0])


def _lsq(w, x, y):
    """L = mean_n (x_n . w - y_n)^2 and dL/dw: a model whose per-shard mean mirrors the losses'."""
    r = x @ w - y
    return float(np.mean(r * r)), {"w": 2.0 * x.T @ r / len(y)}


@pytest.mark.numerics
@pytest.mark.parametrize("B,k", [(8, 2), (7, 3)])
def test_reduce_gives_the_global_batch_gradient(B, k):
    """sum_r (n_r / B) grad(mean over shard r) = grad(mean over the global batch), unequal shards too.

    Float64, up to the order of the additions: g_j = (2 / B) sum_n x_nj r_n summed in one GEMM or
    in k partial GEMMs plus an all-reduce differ by at most 2 gamma_B (2 / B) sum_n |x_nj r_n|
    (gamma_B = B u / (1 - B u), u = 2^-53), elementwise, whatever the BLAS kernel."""
    rng = np.random.default_rng(B * 10 + k)
    x, y, w = rng.standard_normal((B, 4)), rng.standard_normal(B), rng.standard_normal(4)
    ref_loss, ref_g = _lsq(w, x, y)
    u = np.finfo(np.float64).eps / 2
    g_tol = 2 * (B + 2) * u / (1 - (B + 2) * u) * (2 / B) * (np.abs(x).T @ np.abs(x @ w - y))   # (+2: the scalings)

    def rank(comm):
        dp = D.DataParallel(comm, B)
        loss, g = _lsq(w, x[dp.lo:dp.hi], y[dp.lo:dp.hi])
        return dp.reduce(loss, g, {"loss": loss, "extra": float(dp.hi - dp.lo)}, stop=False)

    for loss, g, metrics, stop in _ok(k, rank):
        assert np.all(np.abs(g["w"] - ref_g["w"]) <= g_tol), (g["w"] - ref_g["w"], g_tol)
        assert abs(loss - ref_loss) <= 1e-13 * abs(ref_loss)
        # metrics get the same weights: sum_r (n_r / B) n_r
        assert metrics["extra"] == pytest.approx(sum((hi - lo) ** 2 for lo, hi in
                                                     (D.shard_range(B, r, k) for r in range(k))) / B)
        assert stop is False


def test_reduce_agrees_on_stop_and_on_nan():
    def rank(comm):
        dp = D.DataParallel(comm, 4)
        g = {"w": np.full(3, 1.0 + comm.rank)}
        if comm.rank == 1:
            g["w"][0] = np.nan
        _, g1, _, stop1 = dp.reduce(1.0, g, {}, stop=(comm.rank == 1))
        finite1 = bool(np.isfinite(g1["w"]).all())
        _, _, _, stop2 = dp.reduce(1.0, {"w": np.ones(3)}, {}, stop=False)
        return stop1, finite1, stop2

    assert _ok(2, rank) == [(True, False, False)] * 2


def test_single_process_reduce_returns_its_inputs():
    dp = D.DataParallel(D.SingleProcess(), 5)
    g = {"w": np.ones(2)}
    loss, g2, m, stop = dp.reduce(0.5, g, {"a": 1.0}, stop=True)
    assert g2 is g and loss == 0.5 and m == {"a": 1.0} and stop is True
    it = BatchIterator(np.zeros((10, 2), np.float32), 5)
    assert dp.shard_iterator(it).shard == (0, 5)
    rng = np.random.default_rng(0)
    assert dp.step_rng(rng) is rng


# ----------------------------------------------------------------------------- replica check

def test_check_replicas_passes_for_identical_state_and_names_the_difference():
    rng = np.random.default_rng(2)
    params = {"a": rng.standard_normal(4), "b": rng.standard_normal((2, 2))}

    def same(comm):
        D.check_replicas(comm, {"params": {k: v.copy() for k, v in params.items()}, "step": 3})
        return True

    assert _ok(3, same) == [True] * 3

    def differ(comm):
        p = {k: v.copy() for k, v in params.items()}
        if comm.rank == 2:
            p["b"][1, 1] = np.nextafter(p["b"][1, 1], np.inf)      # one ulp is a difference
        D.check_replicas(comm, {"params": p, "step": 3})

    _, errors = run_ranks(3, differ)
    assert all(isinstance(e, D.DistributedError) for e in errors)     # every rank raises, none hangs
    assert "rank 2" in str(errors[0]) and "'b'" in str(errors[0])


# ----------------------------------------------------------------------------- FID statistics

@pytest.mark.numerics
def test_merge_feature_stats_equals_one_process():
    """3 ranks with 0, 9 and 14 features (offset mean, as Inception features are) = all 23 on one."""
    rng = np.random.default_rng(3)
    feats = 5.0 + rng.standard_normal((23, 6)) @ rng.standard_normal((6, 6))
    parts = [feats[:0], feats[:9], feats[9:]]

    def rank(comm):
        st = FeatureStats()
        for i in range(0, len(parts[comm.rank]), 4):           # several batches per rank
            st.update(parts[comm.rank][i:i + 4])
        return merge_feature_stats(comm, st)

    for st in _ok(3, rank):
        assert st.n == 23
        np.testing.assert_allclose(st.mu, feats.mean(0), rtol=1e-12)
        np.testing.assert_allclose(st.sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- choosing a communicator

def test_get_communicator_without_a_launcher_is_single_process(monkeypatch):
    for var in D._SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert isinstance(D.get_communicator("auto"), D.SingleProcess)
    assert isinstance(D.get_communicator("none"), D.SingleProcess)
    with pytest.raises(ValueError, match="choose one of"):
        D.get_communicator("gloo")


def test_get_communicator_mpi_without_mpi4py_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # import mpi4py -> ImportError
    with pytest.raises(D.DistributedError, match=r"pip install -e \.\[mpi\]"):
        D.get_communicator("mpi")
    monkeypatch.setenv("PMI_SIZE", "2")                        # launched with 2 ranks: auto needs MPI too
    with pytest.raises(D.DistributedError, match="mpi4py is not importable"):
        D.get_communicator("auto", device="cpu")


def test_fail_together_aborts_on_errors_only():
    comm = ThreadComm(0, _Exchange(1))
    with D.fail_together(comm):
        pass
    assert comm.aborted is None
    with pytest.raises(SystemExit):
        with D.fail_together(comm):
            raise SystemExit(0)
    assert comm.aborted is None
    with pytest.raises(KeyError):                               # raised by all ranks together: no abort
        with D.fail_together(comm, coordinated=(KeyError,)):
            raise KeyError("x")
    assert comm.aborted is None
    with pytest.raises(KeyError):
        with D.fail_together(comm):
            raise KeyError("x")
    assert comm.aborted == 1


# ----------------------------------------------------------------------------- real MPI

def _mpi_problem():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e .[mpi])"
    if shutil.which("mpiexec") is None:
        return "mpiexec is not on PATH (pip install -e .[mpi] installs mpich)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_problem() is not None, reason=str(_mpi_problem()))
SCRIPT = os.path.join(HERE, "dist_scripts.py")


def mpirun(k, *args, timeout=600, env=None):
    """`mpiexec -n k python tests/dist_scripts.py args` (k = 0: plain python, no launcher).

    The timeout only stops a hung job: far above the seconds these runs take, even on a loaded machine."""
    cmd = ([sys.executable] if k == 0 else ["mpiexec", "-n", str(k), sys.executable]) + [SCRIPT, *map(str, args)]
    e = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", TTFM_DEVICE="cpu", **(env or {}))
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@needs_mpi
def test_mpi_fid_statistics_of_two_ranks_equal_one(tmp_path):
    """pipeline.fid_stats / fid_score with the images split over 2 ranks = 1 process (fake Inception)."""
    from PIL import Image
    folder = tmp_path / "pngs"
    folder.mkdir()
    pixels = np.random.default_rng(4).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"{i:03d}.png")
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    mpirun(0, "fid", folder, one)
    mpirun(2, "fid", folder, two)
    a, b = np.load(one), np.load(two)
    assert int(a["n"]) == int(b["n"]) == 30
    np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-12)
    np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-10, atol=1e-13)
    # the same images in batches of 3 against their own statistics: FID ~ 0 on both
    assert abs(float(a["fid"])) < 1e-6 and abs(float(b["fid"]) - float(a["fid"])) < 1e-8


# ----------------------------------------------------------------------------- MPIComm / NCCLComm on fakes
# MPIComm and NCCLComm run here on thread ranks: a fake mpi4py communicator and a fake CuPy/NCCL whose
# "device arrays" wrap NumPy arrays, so their code paths (device = local rank, the NCCL unique id sent
# from rank 0, pointer/count/dtype of every NCCL call, the mean) are checked without MPI or a GPU.

class _FakeMPI:
    IN_PLACE, SUM, MAX, COMM_TYPE_SHARED = object(), "sum", "max", 1


class _FakeMPIComm:
    """The mpi4py calls distributed.py makes, over ThreadComm."""

    def __init__(self, tc):
        self.tc = tc

    def Get_rank(self):
        return self.tc.rank

    def Get_size(self):
        return self.tc.size

    def Split_type(self, kind, key=0):
        assert kind == _FakeMPI.COMM_TYPE_SHARED
        return self                                          # one node: the node communicator is the world

    def Free(self):
        pass

    def Allreduce(self, inplace, buf, op):
        assert inplace is _FakeMPI.IN_PLACE and op == _FakeMPI.SUM and isinstance(buf, np.ndarray)
        self.tc.allreduce_sum(buf)

    def Bcast(self, buf, root=0):
        self.tc.bcast(buf, root)

    def bcast(self, obj, root=0):
        return self.tc.bcast_object(obj, root)

    def allgather(self, obj):
        return self.tc.allgather_object(obj)

    def allreduce(self, value, op):
        assert op == _FakeMPI.MAX
        return max(self.tc.allgather_object(value))

    def Barrier(self):
        self.tc.barrier()


_DEVICE_MEMORY = {}                                          # fake device pointer -> numpy array


class _FakeDeviceArray:
    """Just enough of a cupy.ndarray: .data.ptr, size, dtype, ndim, flags, in-place divide."""

    def __init__(self, a):
        self.a = np.ascontiguousarray(a)
        self.data = type("MemoryPointer", (), {"ptr": id(self.a)})()
        _DEVICE_MEMORY[id(self.a)] = self.a
        self.size, self.dtype, self.ndim, self.flags = self.a.size, self.a.dtype, self.a.ndim, self.a.flags

    def __itruediv__(self, v):
        self.a /= v
        return self


def _fake_cupy(n_devices, log):
    import types
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64, nccl.NCCL_INT32, nccl.NCCL_INT64, nccl.NCCL_UINT8 = 7, 8, 2, 4, 1
    nccl.NCCL_SUM = 0
    nccl.get_unique_id = lambda: ("uid", threading.get_ident())        # differs per caller

    class NcclCommunicator:
        def __init__(self, size, uid, rank):
            self.size, self.uid, self.rank = size, uid, rank
            self.tc = _THREAD_COMMS[threading.get_ident()]
            log.append(("init", rank, uid))

        def allReduce(self, send, recv, count, dtype, op, stream):
            assert send == recv and op == nccl.NCCL_SUM and stream == 1234
            buf = _DEVICE_MEMORY[recv]
            assert buf.size == count and dtype == {np.float32: 7, np.float64: 8}[buf.dtype.type]
            self.tc.allreduce_sum(buf)

        def bcast(self, ptr, count, dtype, root, stream):
            self.tc.bcast(_DEVICE_MEMORY[ptr], root)

    nccl.NcclCommunicator = NcclCommunicator
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl = nccl
    cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: n_devices)

    class Device:
        def __init__(self, i):
            self.i = i

        def use(self):
            log.append(("device", _THREAD_COMMS[threading.get_ident()].rank, self.i))

    cuda.Device = Device
    cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=1234)
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.nccl": nccl}


_THREAD_COMMS = {}


def _with_fake_mpi(fn):
    def rank(tc):
        _THREAD_COMMS[threading.get_ident()] = tc
        return fn(tc, _FakeMPIComm(tc))
    return rank


def test_mpicomm_collectives_over_a_fake_mpi(monkeypatch):
    monkeypatch.setattr(D, "_import_mpi", lambda: _FakeMPI)

    def rank(tc, fake):
        comm = D.MPIComm(fake)
        buf = np.arange(4.0) * (comm.rank + 1)
        comm.allreduce_mean(buf)                              # (1 + 2) / 2 * arange
        b = np.full(3, float(comm.rank))
        comm.bcast(b, root=1)
        with pytest.raises(ValueError, match="flat contiguous"):
            comm.allreduce_sum(np.zeros((2, 2)))
        return (comm.rank, comm.size, comm.local_rank, buf, b, comm.any_flag(comm.rank == 1),
                comm.any_flag(False), comm.bcast_object({"r": comm.rank}, root=1))

    for r, (rank_, size, local, buf, b, flag1, flag0, obj) in enumerate(_ok(2, _with_fake_mpi(rank))):
        assert (rank_, size, local) == (r, 2, r)
        np.testing.assert_array_equal(buf, 1.5 * np.arange(4.0))
        np.testing.assert_array_equal(b, np.ones(3))
        assert flag1 is True and flag0 is False and obj == {"r": 1}


def test_ncclcomm_uses_the_local_gpu_and_rank0s_unique_id(monkeypatch):
    log = []
    for name, mod in _fake_cupy(2, log).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(D, "_import_mpi", lambda: _FakeMPI)

    def rank(tc, fake):
        comm = D.NCCLComm(fake)
        g = _FakeDeviceArray(np.arange(5, dtype=np.float32) + 10 * comm.rank)
        comm.allreduce_mean(g)
        b = _FakeDeviceArray(np.full(2, comm.rank, np.float64))
        comm.bcast(b, root=0)
        with pytest.raises(TypeError, match="CuPy"):
            comm.allreduce_sum(np.zeros(3))
        return g.a, b.a

    for g, b in _ok(2, _with_fake_mpi(rank)):
        np.testing.assert_array_equal(g, np.arange(5, dtype=np.float32) + 5)
        np.testing.assert_array_equal(b, np.zeros(2))
    assert sorted(e for e in log if e[0] == "device") == [("device", 0, 0), ("device", 1, 1)]
    uids = {e[2] for e in log if e[0] == "init"}
    assert len(uids) == 1                                     # both ranks joined rank 0's NCCL id


def test_ncclcomm_refuses_more_ranks_than_gpus(monkeypatch):
    for name, mod in _fake_cupy(1, []).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(D, "_import_mpi", lambda: _FakeMPI)
    _, errors = run_ranks(2, _with_fake_mpi(lambda tc, fake: D.NCCLComm(fake)))
    assert all(isinstance(e, D.DistributedError) for e in errors)     # both ranks stop, none waits
    assert "rank 1: local rank 1 on its node but the node has only 1 GPU" in str(errors[0])


def test_setup_current_and_on_root(monkeypatch):
    monkeypatch.setattr(D, "_CURRENT", None)
    assert isinstance(D.current(), D.SingleProcess)
    for var in D._SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    comm = D.setup("none")
    assert D.current() is comm
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *a):
            pass

    with D.on_root(Ctx):
        pass
    with D.on_root(Ctx, comm=ThreadComm(1, _Exchange(2))):       # rank 1: not entered
        pass
    assert entered == [True]


# ----------------------------------------------------------------------------- real MPI: training

def _final_params(out):
    from ttfm_np import ckpt
    state = ckpt.load_checkpoint(os.path.join(out, "checkpoint.h5"))
    return state


def _assert_same_state(a, b, rtol=1e-10):
    assert a["step"] == b["step"]
    for group in ("params", "ema"):
        for k in a[group]:
            x, y = a[group][k], b[group][k]
            scale = max(float(np.abs(x).max()), 1e-300)
            assert float(np.abs(x - y).max()) <= rtol * scale, f"{group}.{k} differs"
    assert a["rng_state"]["data"] == b["rng_state"]["data"]


@needs_mpi
@pytest.mark.parametrize("kind", ["teacher", "itvm"])
def test_mpi_two_ranks_equal_one_process_and_resume_across_rank_counts(tmp_path, kind):
    """2 ranks x B/2 = 1 process x B after 5 steps (float64, 1e-10 relative), and a run resumed with
    the other number of ranks (2 -> 1 and 1 -> 2) ends in the same state."""
    one, two, two_one, one_two = (str(tmp_path / n) for n in ("one", "two", "two_one", "one_two"))
    mpirun(0, "train", kind, one, 5)
    mpirun(2, "train", kind, two, 5)
    ref = _final_params(one)
    assert ref["step"] == 5
    moved = max(float(np.abs(ref["params"][k] - v).max()) for k, v in _initial(kind).items())
    assert moved > 1e-3                                      # the runs did train
    _assert_same_state(_final_params(two), ref)
    mpirun(2, "train", kind, two_one, 3)
    mpirun(0, "train", kind, two_one, 5, "resume")
    _assert_same_state(_final_params(two_one), ref)
    mpirun(0, "train", kind, one_two, 3)
    mpirun(2, "train", kind, one_two, 5, "resume")
    _assert_same_state(_final_params(one_two), ref)


def _initial(kind):
    from ttfm_np import model, ttfm
    cfg = model.make_config("mlp-tiny", (2,))
    if kind == "teacher":
        return model.init_model(cfg, 5)
    tp = model.init_model(cfg, 11)
    tp["out.weight"] = np.random.default_rng(12).standard_normal(tp["out.weight"].shape)
    return ttfm.student_from_teacher(tp, cfg)[0]


@needs_mpi
def test_mpi_ctrl_c_on_the_launcher_saves_one_valid_checkpoint_and_ends_every_rank(tmp_path):
    import signal
    import time
    out = str(tmp_path / "run")
    cmd = ["mpiexec", "-n", "2", sys.executable, SCRIPT, "train", "teacher", out, 10**7]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", TTFM_DEVICE="cpu")
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600          # left as soon as the file appears: only a hang waits this long
        while not os.path.exists(os.path.join(out, "checkpoint.h5")) and time.time() < deadline:
            time.sleep(0.1)
        assert os.path.exists(os.path.join(out, "checkpoint.h5")), "no checkpoint appeared"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)                        # Ctrl-C: mpiexec forwards it to every rank
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = _final_params(out)                                 # loads and verifies the checksum
    assert 0 < state["step"] < 10**7
    left = subprocess.run(["pgrep", "-f", out], capture_output=True, text=True).stdout.split()
    assert not left, f"ranks still running: {left}\n{output}"
    assert not [f for f in os.listdir(out) if "tmp" in f], os.listdir(out)


def test_my_batches_split_whole_batches():
    assert D.my_batches(10, 4, comm=D.SingleProcess()) == range(3)
    ex = _Exchange(2)
    parts = [D.my_batches(10, 3, comm=ThreadComm(r, ex)) for r in range(2)]      # 4 batches: 0-1 | 2-3
    assert parts == [range(0, 2), range(2, 4)]
    with pytest.raises(ValueError, match="fewer than the 3 ranks"):
        D.my_batches(4, 2, comm=ThreadComm(0, _Exchange(3)))


def test_two_thread_ranks_with_dropout_train_like_one_process(tmp_path):
    """A tiny U-Net WITH dropout: 2 ranks x B/2 give the parameters of 1 process x B (float64),
    because each rank's dropout counters start at its rows' place in the global batch."""
    from ttfm_np import data, model, train
    from ttfm_np.objectives import FlowMatchingObjective
    images = np.random.default_rng(0).uniform(-1, 1, (16, 3, 8, 8))
    cfg = model.make_config("tiny", (3, 8, 8), dropout=0.2)
    tcfg = train.TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup=0, ema_decay=0.9, seed=5, log_every=1,
                             ckpt_every=0, dtype="float64")

    def run(out, comm):
        return train.train_loop(str(out), model_cfg=cfg, init_params=model.init_model(cfg, 5),
                                objective=FlowMatchingObjective(cfg), tcfg=tcfg, progress=False, comm=comm,
                                data_iter=data.BatchIterator(images, 4, seed=5), run_config=dict(task="teacher"))

    one, _, _ = run(tmp_path / "one", D.SingleProcess())
    results, errors = run_ranks(2, lambda comm: run(tmp_path / "two", comm))
    assert errors == [None, None], errors
    for rank_params, _, step in results:
        assert step == 3
        for k in one:
            np.testing.assert_allclose(rank_params[k], one[k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_thread_ranks_that_call_different_collectives_fail_at_once_without_a_timeout():
    """A rank waiting in a collective that a finished rank never joins raises RankGone immediately
    (no wall-clock timeout, so a slow rank on a loaded machine can never be taken for a hung one)."""
    import time

    def fn(comm):
        comm.barrier()
        if comm.rank == 0:
            comm.barrier()                     # rank 1 has returned: this can never complete
        return comm.rank

    results, errors = run_ranks(2, fn)
    assert results[1] == 1 and errors[1] is None
    assert isinstance(errors[0], RankGone) and "rank(s) [1] ended" in str(errors[0])   # detected, not timed out

    def slow(comm):                            # a rank far slower than the other is only waited for
        if comm.rank == 1:
            time.sleep(0.2)
        return comm.allgather_object(comm.rank)

    assert _ok(2, slow) == [[0, 1], [0, 1]]


def test_setup_silences_log_on_ranks_other_than_0(monkeypatch, capsys):
    """progress.log prints on rank 0 only once setup() chose the communicator (progress itself
    imports nothing of ttfm_np: setup tells it)."""
    from ttfm_np import progress
    monkeypatch.setattr(D, "_CURRENT", None)
    monkeypatch.setattr(progress, "_QUIET", False)
    monkeypatch.setattr(D, "get_communicator", lambda kind, device: ThreadComm(1, _Exchange(2)))
    D.setup("auto")
    progress.log("from rank 1")
    monkeypatch.setattr(D, "get_communicator", lambda kind, device: ThreadComm(0, _Exchange(2)))
    D.setup("auto")
    progress.log("from rank 0")
    assert capsys.readouterr().err == "from rank 0\n"
