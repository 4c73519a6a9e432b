"""Data-parallel training over K processes: MPI on the CPU, NCCL on the GPU.

Launch K copies of the same command under an MPI launcher:

    mpiexec -n 8 python cli.py distill --data cifar10 ...

Every process ("rank") holds a full copy of the parameters, the EMA and the
Adam moments. One step with global batch B:

    rank r takes rows [lo_r, hi_r) of the global batch   (shard_range: a pure function of B, r, K)
    g_r = d/dtheta (mean loss over its n_r = hi_r - lo_r rows)
    g   = sum_r (n_r / B) g_r          one all-reduce of one flat buffer (GradBucket)
        = d/dtheta (mean loss over all B rows)     because mean_B = sum_r (n_r / B) mean_{n_r}
    then the same clip, Adam and EMA update on every rank (identical inputs -> identical parameters).

The noise and times of a step are drawn for the whole global batch from the
step's host Generator and every rank keeps its rows (ShardedGenerator), so K
ranks with B/K rows each compute the update of one process with B rows, up to
the order of floating-point additions.

Communicators (one small interface, three implementations):

    SingleProcess   K = 1, every collective is a no-op
    MPIComm         mpi4py on host (NumPy) buffers; CuPy buffers are staged through the host
    NCCLComm        cupy.cuda.nccl on device (CuPy) buffers, one GPU per rank (device = local rank);
                    the NCCL unique id and the small host-side messages go over MPI

get_communicator("auto") picks SingleProcess unless the process was started by
an MPI launcher with K > 1 ranks (it reads the launcher's environment, so
mpi4py is imported only then), and then NCCL when the device is a GPU, MPI
otherwise.

Failure handling: an exception on one rank while the others wait in a
collective would hang the job, so fail_together() turns any exception into
MPI_Abort of the whole job (mpi4py.run.set_abort_status). SIGINT to mpiexec is
forwarded to every rank by the launcher; the training loop folds the stop
request into the step's all-reduce so that all ranks stop after the same step.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os

import numpy as np

from . import backend, progress

KINDS = ("auto", "none", "mpi", "nccl")

# World size as set by common launchers: MPICH/Intel MPI (Hydra) and Slurm's PMI, Open MPI, MVAPICH.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

_INSTALL_HINT = "install the optional extra with `pip install -e .[mpi]` (mpi4py and mpich)"


class DistributedError(RuntimeError):
    """A distributed run cannot be set up or the ranks disagree; the message says why."""


def launcher_world_size() -> int:
    """K as announced by the MPI launcher's environment, 1 when not launched by one."""
    for var in _SIZE_VARS:
        value = os.environ.get(var)
        if value:
            try:
                return int(value)
            except ValueError:
                raise DistributedError(f"environment variable {var}={value!r} is not an integer")
    return 1


# ----------------------------------------------------------------------------- communicators

class SingleProcess:
    """K = 1: the interface of a communicator, doing nothing."""

    kind = "none"
    rank, size, local_rank, local_size = 0, 1, 0, 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, buf):
        """buf <- sum over ranks of buf, in place (flat contiguous array); returns buf."""
        return buf

    def allreduce_mean(self, buf):
        """buf <- mean over ranks of buf, in place; returns buf."""
        return buf

    def bcast(self, buf, root: int = 0):
        """buf <- root's buf, in place; returns buf."""
        return buf

    def bcast_object(self, obj, root: int = 0):
        """root's (small, picklable) object, on every rank."""
        return obj

    def allgather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (small objects)."""
        return [obj]

    def barrier(self):
        pass

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when flag is True on at least one rank (stop / NaN agreement)."""
        return bool(flag)

    def abort_on_exit(self, status: int = 1):
        """Make this process's exit abort the whole job (no-op without MPI)."""

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedError(f"MPI was requested but mpi4py is not importable ({exc}); {_INSTALL_HINT}")
    return MPI


def _check_flat(buf):
    if buf.ndim != 1 or not buf.flags.c_contiguous:
        raise ValueError(f"collectives take a flat contiguous buffer, got shape {buf.shape} "
                         f"(contiguous={buf.flags.c_contiguous}); pack arrays with GradBucket")


class MPIComm(SingleProcess):
    """mpi4py over COMM_WORLD. Buffers are NumPy arrays; a CuPy buffer is copied to the
    host, reduced there and copied back (use NCCLComm to keep it on the GPU)."""

    kind = "mpi"

    def __init__(self, comm=None):
        MPI = _import_mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # ranks on this node: the shared-memory sub-communicator (portable across MPI libraries)
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()

    def _host_op(self, buf, fn):
        _check_flat(buf)
        if isinstance(buf, np.ndarray):
            fn(buf)
            return buf
        host = backend.to_numpy(buf)          # CuPy: stage through the host
        fn(host)
        buf.set(host)
        return buf

    def allreduce_sum(self, buf):
        return self._host_op(buf, lambda b: self.comm.Allreduce(self.MPI.IN_PLACE, b, op=self.MPI.SUM))

    def allreduce_mean(self, buf):
        self.allreduce_sum(buf)
        buf /= self.size
        return buf

    def bcast(self, buf, root: int = 0):
        return self._host_op(buf, lambda b: self.comm.Bcast(b, root=root))

    def bcast_object(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj) -> list:
        return self.comm.allgather(obj)

    def barrier(self):
        self.comm.Barrier()

    def any_flag(self, flag: bool) -> bool:
        return bool(self.comm.allreduce(int(bool(flag)), op=self.MPI.MAX))

    def abort_on_exit(self, status: int = 1):
        # At interpreter exit mpi4py then calls MPI_Abort instead of MPI_Finalize: the launcher
        # kills the other ranks instead of leaving them blocked in a collective.
        import mpi4py.run
        mpi4py.run.set_abort_status(status)


class NCCLComm(MPIComm):
    """NCCL collectives on CuPy buffers; one GPU per rank (device = local rank).

    MPI starts the processes, carries NCCL's unique id from rank 0 to the others
    and the small host messages (objects, flags, barrier)."""

    kind = "nccl"

    def __init__(self, comm=None):
        super().__init__(comm)
        problem = None
        try:
            import cupy
            from cupy.cuda import nccl
            n_dev = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:   # ImportError, CuPy built without NCCL, or no CUDA driver
            problem = (f"--dist nccl needs CuPy with NCCL and a GPU ({exc.__class__.__name__}: {exc}); "
                       "install `pip install -e .[gpu,mpi]` or use --dist mpi")
        else:
            if self.local_rank >= n_dev:
                problem = (f"local rank {self.local_rank} on its node but the node has only {n_dev} GPU(s): "
                           f"start at most {n_dev} ranks per node (mpiexec -ppn {max(n_dev, 1)}) or use --dist mpi")
        # decided together: a rank that raised alone would leave the others waiting for the NCCL id
        problems = [(r, p) for r, p in enumerate(self.comm.allgather(problem)) if p]
        if problems:
            raise DistributedError("cannot start NCCL: " + "; ".join(f"rank {r}: {p}" for r, p in problems))
        cupy.cuda.Device(self.local_rank).use()      # before any array is created on this rank
        self.cupy, self.nccl_mod = cupy, nccl
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                        np.dtype(np.int32): nccl.NCCL_INT32, np.dtype(np.int64): nccl.NCCL_INT64,
                        np.dtype(np.uint8): nccl.NCCL_UINT8}

    def _args(self, buf):
        _check_flat(buf)
        if isinstance(buf, np.ndarray):
            raise TypeError("NCCLComm reduces device (CuPy) buffers; move the array to the GPU first")
        if buf.dtype not in self._dtypes:
            raise TypeError(f"NCCLComm: unsupported dtype {buf.dtype}")
        stream = self.cupy.cuda.get_current_stream().ptr
        return buf.data.ptr, buf.size, self._dtypes[buf.dtype], stream

    def allreduce_sum(self, buf):
        ptr, n, dt, stream = self._args(buf)
        # enqueued on the current stream, so later CuPy work on that stream sees the result
        self.nccl.allReduce(ptr, ptr, n, dt, self.nccl_mod.NCCL_SUM, stream)
        return buf

    def bcast(self, buf, root: int = 0):
        ptr, n, dt, stream = self._args(buf)
        self.nccl.bcast(ptr, n, dt, root, stream)
        return buf


def get_communicator(kind: str = "auto", device: str | None = None):
    """The communicator for this process.

    kind: "auto" (default), "none" (single process), "mpi" or "nccl".
      auto: SingleProcess unless an MPI launcher started K > 1 ranks; then NCCL when the
            device is a GPU, MPI otherwise.
    device: "cpu", "gpu", "auto" or None ($TTFM_DEVICE, default auto), as in backend.select_device;
      only used by kind="auto" to choose between MPI and NCCL.

    Call it before creating arrays: NCCLComm makes GPU number local_rank current.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown --dist {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "none":
        return SingleProcess()
    if kind == "auto":
        if launcher_world_size() <= 1:
            return SingleProcess()
        kind = "nccl" if _wants_gpu(device) else "mpi"
    if kind == "mpi":
        return MPIComm()
    return NCCLComm()


_CURRENT = None          # the process's communicator once setup() ran (one per process, like MPI itself)


def setup(kind: str = "auto", device: str | None = None):
    """get_communicator(kind, device), remembered as this process's communicator (see current()).

    The CLI calls it once, before choosing the device; library code then finds it with
    current() instead of threading a comm argument through every function.
    """
    global _CURRENT
    _CURRENT = get_communicator(kind, device)
    progress.set_quiet(not _CURRENT.is_root)          # rank 0 speaks for all ranks (progress.log)
    return _CURRENT


def current():
    """The communicator setup() chose, or SingleProcess when it was not called."""
    return _CURRENT if _CURRENT is not None else SingleProcess()


def on_root(make_context, *args, comm=None, **kwargs):
    """make_context(*args, **kwargs) on rank 0 and a do-nothing context elsewhere.

    For what exactly one process may hold, e.g. the run folder's lock:
        with distributed.on_root(RunLock, out): ...
    """
    comm = comm or current()
    return make_context(*args, **kwargs) if comm.is_root else contextlib.nullcontext()


def _wants_gpu(device) -> bool:
    device = (device or os.environ.get("TTFM_DEVICE", "auto")).strip().lower()
    if device == "cpu":
        return False
    if device == "gpu":
        return True
    try:                   # auto: a GPU is present (counting devices creates no CUDA context)
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def fail_together(comm, coordinated=()):
    """Context manager: an exception (or a non-zero exit) on this rank aborts every rank.

    Without it a rank that fails while the others wait in an all-reduce leaves them
    blocked forever. Exceptions of the `coordinated` types are raised by all ranks
    together and pass through without an abort. With K = 1 it does nothing.
    """
    @contextlib.contextmanager
    def guard():
        try:
            yield
        except tuple(coordinated):
            raise
        except SystemExit as exc:
            if exc.code not in (None, 0):
                comm.abort_on_exit(exc.code if isinstance(exc.code, int) else 1)
            raise
        except BaseException as exc:
            comm.abort_on_exit(getattr(exc, "exit_code", 1))    # e.g. 130 for an interrupted run
            raise
    return guard()


def with_comm_guard(coordinated=()):
    """Decorator: run fn(..., comm=None) inside fail_together(comm or current()) when K > 1.

    coordinated: exception types that every rank raises at the same point (decided on
    all-reduced numbers, e.g. the training loop's divergence and stop): they end the
    ranks normally instead of aborting the job.
    """
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            comm = kwargs.get("comm") or current()
            if comm.size == 1:
                return fn(*args, **kwargs)
            with fail_together(comm, coordinated):
                return fn(*args, **kwargs)
        return wrapper
    return decorate


# ----------------------------------------------------------------------------- sharding

def shard_range(n: int, rank: int, size: int) -> tuple:
    """Rows [lo, hi) of n that rank takes: contiguous, sizes differ by at most 1.

    lo = floor(rank n / K), hi = floor((rank + 1) n / K).
    """
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside 0..{size - 1}")
    if n < size:
        raise ValueError(f"cannot split {n} rows over {size} ranks: use a global batch >= the number of ranks")
    return rank * n // size, (rank + 1) * n // size


class ShardedGenerator:
    """A host Generator whose batch-shaped draws are made for the global batch and sliced.

    Every rank draws exactly the numbers a single process would draw for the
    global batch (same stream position afterwards) and keeps rows [lo, hi), so
    the noise and times of a sample do not depend on the number of ranks.
    A draw whose first dimension is not the local batch size is refused, since
    it could not be matched to the single-process stream.
    """

    def __init__(self, rng: np.random.Generator, n_global: int, lo: int, hi: int):
        if not 0 <= lo < hi <= n_global:
            raise ValueError(f"bad shard [{lo}, {hi}) of a batch of {n_global}")
        self.rng, self.n_global, self.lo, self.hi = rng, n_global, lo, hi

    def _global_size(self, size, what):
        shape = (size,) if np.isscalar(size) else tuple(size or ())
        if not shape or shape[0] != self.hi - self.lo:
            raise ValueError(f"{what}: a sharded step Generator only draws batch-shaped arrays whose first "
                             f"dimension is the local batch ({self.hi - self.lo}), got size={size}")
        return (self.n_global,) + shape[1:]

    def _draw(self, method, size, what, **kw):
        full = getattr(self.rng, method)(size=self._global_size(size, what), **kw)
        return full[self.lo:self.hi]

    def random(self, size=None, dtype=np.float64):
        return self._draw("random", size, "random", dtype=dtype)

    def standard_normal(self, size=None, dtype=np.float64):
        return self._draw("standard_normal", size, "standard_normal", dtype=dtype)

    def normal(self, loc=0.0, scale=1.0, size=None):
        return self._draw("normal", size, "normal", loc=loc, scale=scale)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self._draw("uniform", size, "uniform", low=low, high=high)

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        return self._draw("integers", size, "integers", low=low, high=high, dtype=dtype, endpoint=endpoint)


def my_batches(total: int, batch_size: int, comm=None) -> range:
    """This rank's batch numbers b (items [b B, min((b + 1) B, total))) of ceil(total / B) batches.

    Contiguous runs of whole batches, so that batch b is the same with any number of ranks
    (generated samples take their noise from (seed, b)). All batches with one process.
    """
    comm = comm or current()
    n_batches = -(-int(total) // int(batch_size))
    if comm.size == 1:
        return range(n_batches)
    if n_batches < comm.size:
        raise ValueError(f"{total} items in batches of {batch_size} make {n_batches} batches, fewer than the "
                         f"{comm.size} ranks: use a smaller --batch-size or fewer ranks")
    return range(*shard_range(n_batches, comm.rank, comm.size))


# ----------------------------------------------------------------------------- gradient bucket

class GradBucket:
    """Packs a dict of arrays (plus a few scalars) into one flat buffer and back.

    One all-reduce of the bucket per step replaces one per tensor (hundreds of
    small messages -> one large one, which is what ring all-reduce is fast at).
    The layout (sorted keys, offsets) is the same on every rank.
    """

    def __init__(self, template: dict, n_scalars: int = 0):
        if not template:
            raise ValueError("GradBucket needs at least one array")
        self.keys = sorted(template)
        first = template[self.keys[0]]
        self.xp, self.dtype = backend.array_module(first), first.dtype
        self.shapes, self.offsets, off = {}, {}, 0
        for k in self.keys:
            a = template[k]
            if a.dtype != self.dtype:
                raise ValueError(f"GradBucket: {k} is {a.dtype}, the others {self.dtype}; use one dtype")
            self.shapes[k], self.offsets[k] = tuple(a.shape), off
            off += int(np.prod(a.shape, dtype=np.int64))
        self.n_params, self.n_scalars = off, n_scalars
        self.buffer = self.xp.empty(off + n_scalars, dtype=self.dtype)

    def pack(self, arrays: dict, scalars=(), scale: float = 1.0):
        """buffer = [scale * arrays[k] for sorted k] + [scale * scalars]; returns the buffer."""
        if set(arrays) != set(self.keys):
            missing, extra = sorted(set(self.keys) - set(arrays)), sorted(set(arrays) - set(self.keys))
            raise ValueError(f"GradBucket.pack: missing {missing}, unexpected {extra}")
        if len(scalars) != self.n_scalars:
            raise ValueError(f"GradBucket.pack: expected {self.n_scalars} scalars, got {len(scalars)}")
        for k in self.keys:
            a, o = arrays[k], self.offsets[k]
            if tuple(a.shape) != self.shapes[k]:
                raise ValueError(f"GradBucket.pack: {k} has shape {tuple(a.shape)}, expected {self.shapes[k]}")
            if a.dtype != self.dtype:
                raise ValueError(f"GradBucket.pack: {k} is {a.dtype}, the bucket {self.dtype}")
            self.xp.multiply(a.reshape(-1), scale, out=self.buffer[o:o + a.size])
        if self.n_scalars:
            s = self.xp.asarray(np.asarray(scalars, dtype=np.float64) * scale).astype(self.dtype)
            self.buffer[self.n_params:] = s
        return self.buffer

    def unpack(self) -> tuple:
        """(dict of views into the buffer with the original shapes, list of float scalars)."""
        arrays = {k: self.buffer[self.offsets[k]:self.offsets[k] + int(np.prod(self.shapes[k], dtype=np.int64))]
                  .reshape(self.shapes[k]) for k in self.keys}
        scalars = [float(v) for v in backend.to_numpy(self.buffer[self.n_params:])]
        return arrays, scalars


# ----------------------------------------------------------------------------- replica check

def _digest(arrays: dict) -> dict:
    """sha256 of every array's bytes (host copy), keyed like the dict: bitwise identity."""
    return {k: hashlib.sha256(np.ascontiguousarray(backend.to_numpy(arrays[k])).tobytes()).hexdigest()
            for k in sorted(arrays)}


def check_replicas(comm, state: dict, what: str = "parameters"):
    """Raise DistributedError on every rank unless all ranks hold bitwise-identical state.

    state: {"params": dict, "ema": dict, ..., "step": int, ...}: dicts of arrays are
    hashed tensor by tensor, other values compared as they are. Rank 0's digest is
    broadcast and every rank compares its own; all ranks then agree on the outcome.
    """
    if comm.size == 1:
        return
    mine = {name: (_digest(v) if isinstance(v, dict) else v) for name, v in state.items()}
    root = comm.bcast_object(mine, root=0)
    bad = []
    for name, value in mine.items():
        ref = root.get(name)
        if isinstance(value, dict) and isinstance(ref, dict):
            diff = sorted(k for k in set(value) | set(ref) if value.get(k) != ref.get(k))
            if diff:
                bad.append(f"{name}: {len(diff)} tensor(s) differ, e.g. {diff[:3]}")
        elif value != ref:
            bad.append(f"{name}: {value!r} here, {ref!r} on rank 0")
    reports = comm.allgather_object(bad)
    problems = [f"rank {r}: " + "; ".join(b) for r, b in enumerate(reports) if b]
    if problems:
        raise DistributedError(
            f"the {comm.size} ranks do not hold the same {what}: " + " | ".join(problems) + ". All ranks must "
            "start from the same seed and read the same checkpoint (put --out on a filesystem every node sees).")


# ----------------------------------------------------------------------------- one data-parallel step

class DataParallel:
    """What the training loop needs per step, for K >= 1 ranks.

        dp = DataParallel(comm, batch_size)
        dp.shard_iterator(data_iter)                     # the iterator yields this rank's rows only
        rng = dp.step_rng(host_generator)                # noise/times of the global batch, this rank's rows
        seed = dp.dropout_seed(step_dropout_seed)        # independent masks on every rank
        loss, grads, metrics, stop = dp.reduce(loss, grads, metrics, stop_requested)

    With K = 1 every call returns its input unchanged (no copies).
    """

    def __init__(self, comm, global_batch: int):
        self.comm, self.global_batch = comm, int(global_batch)
        self.lo, self.hi = shard_range(self.global_batch, comm.rank, comm.size)
        self.weight = (self.hi - self.lo) / self.global_batch         # n_r / B
        self._bucket = None
        self._metric_keys = None

    @property
    def active(self) -> bool:
        return self.comm.size > 1

    def shard_iterator(self, data_iter):
        if self.active:
            if not hasattr(data_iter, "set_shard"):
                raise DistributedError(f"{type(data_iter).__name__} cannot be split across ranks: it needs "
                                       "set_shard(lo, hi) (see data.BatchIterator)")
            data_iter.set_shard(self.lo, self.hi)
        return data_iter

    def step_rng(self, rng):
        return ShardedGenerator(rng, self.global_batch, self.lo, self.hi) if self.active else rng

    def dropout_seed(self, seed):
        """This rank's dropout seed: (seed, first row of its shard).

        Dropout masks are a hash of (seed, site, element counter); the counter of this rank's
        rows starts where they sit in the global batch (dropout.py), so K ranks drop exactly
        the units one process with the whole batch drops.
        """
        if not self.active or seed is None:
            return seed
        return (int(seed), self.lo)

    def reduce(self, loss: float, grads: dict, metrics: dict, stop: bool = False):
        """Weighted all-reduce: g = sum_r (n_r / B) g_r, the same for loss and metrics.

        The stop request rides in the same buffer (any rank -> all ranks). A NaN/Inf on one
        rank becomes NaN/Inf on all after the sum, so the finiteness check agrees too.
        Returns (loss, grads, metrics, stop) identical on every rank.
        """
        if not self.active:
            return loss, grads, metrics, bool(stop)
        keys = sorted(k for k in metrics if k != "loss")
        if self._bucket is None:
            self._metric_keys = keys
            self._bucket = GradBucket(grads, n_scalars=len(keys) + 2)
        elif keys != self._metric_keys:
            raise DistributedError(f"metric names changed from {self._metric_keys} to {keys} between steps")
        vals = [float(loss)] + [float(metrics[k]) for k in keys]
        self._bucket.pack(grads, vals + [float(bool(stop)) / self.weight], scale=self.weight)
        self.comm.allreduce_sum(self._bucket.buffer)
        g, scalars = self._bucket.unpack()
        out_metrics = dict(zip(keys, scalars[1:-1]))
        return scalars[0], g, out_metrics, scalars[-1] > 0.5
