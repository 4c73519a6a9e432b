"""Memory and time guards before the first training step (CPU runs).

A run whose batch does not fit in memory is killed by the kernel (rc 137, no
message, nothing saved) after minutes of silence; a run that needs days on the
CPU should say so before it starts. `check_before_training` estimates both from
the network, the batch and the loss, and raises ResourceError with the numbers
and the fixes (--batch-size, --model, --device gpu; --yes starts anyway).

Memory (bytes) of one training process:

    M(B) = M_now + n_params * itemsize * STATE_COPIES + W + a + b * B

    M_now          the process's resident memory now (interpreter, libraries, the
                   data set, the parameters and, for distillation, the teacher)
    W              a U-Net's block worker processes (block_processes.memory_overhead):
                   per worker its interpreter and a copy of the parameters, plus the
                   shared parameter and gradient buffer; 0 on one worker or a GPU
    STATE_COPIES   EMA, Adam m and v, plus what a checkpoint save holds at once
                   (host snapshot of params/EMA/m/v and the in-memory HDF5 image of
                   the four): 3 + 4 + 4 = 11 copies of the parameters, with slack
    a + b B        the peak of one loss-and-gradient pass (every activation and
                   layer cache of the forward, the im2col buffers of the
                   convolutions, the backward's temporaries and the gradients),
                   measured: tracemalloc traces every NumPy allocation, so two
                   probe passes at batch 1 and 2 give b = P(2) - P(1) and
                   a = P(1) - b (the passes' memory is affine in the batch).

The probe runs the objective's own loss_and_grads (teacher or student, any loss)
on the first rows of the data with a throw-away RNG: no state of the run changes.
M(B) - M_now is compared with the memory available: MemAvailable of
/proc/meminfo, or the cgroup's limit minus its usage when that is smaller (a
container), or $TTFM_MEM_AVAILABLE (bytes, or with a K/M/G suffix) when set.
tests/test_guards.py checks M(B) against the measured peak resident memory of
real runs.

Time: the batch-2 probe pass, timed, gives seconds per sample; a step of batch
B costs about B times that (an over-estimate for small networks, whose passes
are dominated by fixed per-call costs, about right for U-Nets whose GEMMs are
already large at batch 1). The run is refused up front only when the estimate
is over TIME_MARGIN times the limit (clearly over, whatever the probe's error)
AND its first three steps would themselves take over PROBE_WAIT_S seconds;
otherwise the training loop's own measurement of steps 2-3 decides (train.py,
NeedsConfirmation), which is exact.

Only CPU runs are guarded (GPU memory is the device's; its runs are fast).
"""
from __future__ import annotations

import os
import re
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

from . import block_processes, parallel

STATE_COPIES = 11          # EMA, Adam m, v, checkpoint snapshot (4) and its HDF5 image (4): see the docstring
SAFETY = 1.2               # the estimate is compared as SAFETY * M(B) - M_now <= available
PROBE_WAIT_S = 30.0        # refuse up front only when 3 steps take longer than this (see the docstring)
TIME_MARGIN = 3.0          # ... and the estimate is over TIME_MARGIN x the limit


class ResourceError(ValueError):
    """The run would not fit in memory or time; nothing was started or saved."""


# ----------------------------------------------------------------------------- what the machine has

def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise ValueError(f"TTFM_MEM_AVAILABLE={text!r}: expected bytes like 8000000000 or 8G")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None          # "max" (no limit) -> None


def available_memory() -> tuple:
    """(bytes this process may still allocate, where that number came from)."""
    if os.environ.get("TTFM_MEM_AVAILABLE"):
        return _parse_bytes(os.environ["TTFM_MEM_AVAILABLE"]), "$TTFM_MEM_AVAILABLE"
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except OSError:
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),                # v2
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):                            # v1
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 1 << 60:
            found.append((max(lim - use, 0), f"the cgroup limit {limit}"))
    if not found:
        return None, "unknown (no /proc/meminfo)"
    return min(found)


def resident_memory() -> int:
    """This process's resident set size now (bytes); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ----------------------------------------------------------------------------- the estimate

@dataclass
class Estimate:
    now: int                 # resident bytes before training
    state: int               # parameter-sized copies (EMA, Adam, checkpoint)
    pass_fixed: int          # a: peak of a probe pass not proportional to the batch
    per_sample: int          # b: peak bytes per sample of a pass
    batch: int               # this process's rows of every batch
    seconds_per_sample: float

    def total(self, batch: int | None = None) -> int:
        """M(B) in bytes (module docstring)."""
        b = self.batch if batch is None else batch
        return int(self.now + self.state + self.pass_fixed + self.per_sample * b)

    def largest_batch(self, available: int) -> int:
        """The largest batch whose estimate fits `available` (0: none does)."""
        room = (available + self.now) / SAFETY - self.now - self.state - self.pass_fixed
        return max(int(room // max(self.per_sample, 1)), 0)


def _probe_pass(objective, params, x, seed):
    """(peak traced bytes, seconds) of one loss-and-gradient pass on the rows x."""
    rng = np.random.default_rng(seed)
    # tracemalloc sees this process only: the probe keeps a U-Net's blocks on threads (block_processes.py),
    # which hold the same activations as the worker processes would, all of them traced here
    processes = block_processes.set_enabled(False)
    tracemalloc.start()
    try:
        t = time.perf_counter()
        out = objective.loss_and_grads(params, params, x, rng, None)
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        block_processes.set_enabled(processes)
    del out
    return peak, seconds


def estimate(objective, params: dict, data, batch: int, dtype) -> Estimate:
    """Measure two probe passes (batch 1 and 2) and extrapolate to `batch` rows (module docstring)."""
    from . import backend
    xp = backend.get_xp()
    dtype = np.dtype(dtype)
    p = {k: backend.to_device(np.asarray(v), xp).astype(dtype) for k, v in params.items()}
    n_params = sum(int(v.size) for v in p.values())
    rows = [backend.to_device(np.array(data[:k]), xp).astype(dtype) for k in (1, 2)]
    peak1, _ = _probe_pass(objective, p, rows[0], 0)
    peak2, seconds2 = _probe_pass(objective, p, rows[1], 1)
    per_sample = max(peak2 - peak1, 0)
    processes = block_processes.memory_overhead(getattr(objective, "cfg", None), n_params * dtype.itemsize,
                                                parallel.workers(), not backend.is_cupy(xp))
    return Estimate(now=resident_memory(), state=n_params * dtype.itemsize * STATE_COPIES + processes,
                    pass_fixed=max(peak1 - per_sample, 0), per_sample=per_sample, batch=batch,
                    seconds_per_sample=seconds2 / 2)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _hours(seconds: float) -> str:
    """4.2 min, 3.5 h, 12 days, 5.4 years."""
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600)):
        if seconds >= 2 * size if unit != "h" else seconds >= size:
            return f"{seconds / size:.2g} {unit}" if seconds < 10 * size else f"{seconds / size:.0f} {unit}"
    return f"{seconds / 60:.1f} min"


def problems(est: Estimate, steps: int, available: int | None, source: str, max_hours: float | None) -> list:
    """The refusals (texts) for an estimate: memory over `available`, time over `max_hours`."""
    out = []
    need = est.total()
    if available is not None and SAFETY * need - est.now > available:
        fit = est.largest_batch(available)
        batch_fix = (f"--batch-size {fit} or less (about {_gb(est.total(fit))})" if fit >= 1 else
                     "(no --batch-size fits)")
        out.append(f"this run needs about {_gb(need)} of memory (now {_gb(est.now)}, parameters and optimizer "
                   f"state {_gb(est.state)}, one training pass {_gb(est.pass_fixed)} + {_gb(est.per_sample)} per "
                   f"sample x batch {est.batch}), more than the {_gb(available)} available ({source}); nothing was "
                   f"started. Use {batch_fix}, a smaller --model, or --device gpu (--yes starts it anyway)")
    step_s = est.seconds_per_sample * est.batch
    total_s = step_s * steps
    if max_hours is not None and total_s > TIME_MARGIN * max_hours * 3600 and 3 * step_s > PROBE_WAIT_S:
        out.append(f"this run needs about {_hours(total_s)} on the CPU (a timed probe pass: "
                   f"{est.seconds_per_sample:.2f} s per sample x batch {est.batch} x {steps} steps), far over "
                   f"the {max_hours:g} h allowed without --yes; nothing was started. Use --device gpu, a smaller "
                   "--batch-size or --model, fewer --steps, or pass --yes to run it anyway")
    return out


def check_before_training(objective, params: dict, data, batch: int, steps: int, dtype,
                          max_hours: float | None, comm=None) -> Estimate | None:
    """Raise ResourceError when the run would exceed the memory available or `max_hours` (CPU only).

    batch: this process's rows of every step's batch; steps: the steps still to run.
    comm: the ranks agree (one refuses: all do). Returns the estimate (None on a GPU).
    """
    from . import backend, distributed
    if backend.is_cupy(backend.get_xp()) or steps <= 0:
        return None
    comm = comm or distributed.current()
    est = estimate(objective, params, data, batch, dtype)
    available, source = available_memory()
    found = problems(est, steps, available, source, max_hours)
    if comm.any_flag(bool(found)):
        raise ResourceError("; ".join(found) if found else
                            "another rank estimates that this run does not fit its memory or time: see its message")
    return est


__all__ = ["ResourceError", "Estimate", "available_memory", "resident_memory", "estimate", "problems",
           "check_before_training", "STATE_COPIES", "SAFETY"]
