"""One training loop for teacher training and distillation.

Each step:  x1 = next data batch  ->  (loss, grads) = objective(params, ema, x1, rng, dropout_seed)
            -> divergence guard -> clip -> Adam (with warmup) -> EMA update.

What a user gets in OUT_DIR:
    checkpoint.h5        params, EMA, Adam moments, step, data-order state, config (atomic writes)
    checkpoint.prev.h5   the generation before it (also complete and valid)
    metrics.jsonl        one JSON line every log_every steps (loss, grad norm, lr, it/s)
    samples/             PNG grids (images) or scatter plots (2-D) every sample_every steps

Randomness is derived from (seed, step) for every step, so resuming replays the
same numbers; the only stateful stream is the data order, whose state is
stored. The step's noise and times come from a HOST numpy Generator (moved to
the device afterwards), so a GPU run draws the same numbers as a CPU run;
dropout masks are a hash of an integer dropout seed (dropout.py).

Which states are saved (the divergence guard). A state is written only after
it has been shown to be sane: the loss of the NEXT step is computed with
exactly those parameters, so a save due at step k happens after step k+1's
loss is known to be finite and not exploding (at the end of training or on
Ctrl-C one extra loss evaluation does that check). "Exploding" means

    loss > explode_factor * max(best smoothed loss so far, EXPLODE_FLOOR)

(the smoothed loss is an EMA over steps with weight 0.1; its best value is
stored in the checkpoint, so the test survives a resume). The floor keeps
the test meaningful for distillation, whose loss starts near 0 at the warm
start (student = teacher) and legitimately grows; with the default factor
1e4 a run is stopped only when its loss is 10^4 times above its best level
and above 10, far beyond the noise of a healthy run and far below what an
exploded network produces (1e10 and more). A non-finite loss or gradient
norm, or an exploding loss, stops training at once with TrainingDiverged and
nothing of the bad state is written.

Host synchronisation: one per step for the loss and one for the global
gradient norm (which is non-finite iff some gradient entry is), whatever the
number of parameter tensors.

Ctrl-C / SIGTERM: the current step finishes, the state is saved (after the
same sanity check), and Interrupted is raised so that the caller stops the
whole command and can exit with 130 / 143.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import atomic, backend, ckpt, distributed, flatparams, optim, precision, progress as _progress, seeds
from . import params as P
from .ckpt import CHECKPOINT_NAME
from .losses import VALUE_BEFORE_OPTION, DistillLossConfig
from .progress import Progress, format_seconds, log

PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.h5"
EXPLODE_FLOOR = 1e-3            # the divergence guard's smallest reference loss (see the module docstring)
METRICS_NAME = "metrics.jsonl"

# TrainConfig fields that a resume may change: they do not alter what one step computes.
RESUME_SAFE_FIELDS = ("steps", "log_every", "ckpt_every", "sample_every")


class TrainingDiverged(RuntimeError):
    """Loss or gradients became non-finite or exploded; no bad state was saved."""


class ResumeMismatch(ValueError):
    """--resume with run-defining settings that differ from the checkpoint's."""


class NeedsConfirmation(RuntimeError):
    """A CPU run estimated to take longer than the caller allowed without --yes."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the state was saved (when there was one to save)."""

    def __init__(self, signum: int, checkpoint: str | None, step: int | None = None):
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        where = f"; checkpoint {checkpoint} (step {step}) saved" if checkpoint else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name}{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum             # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


@dataclass
class TrainConfig:
    steps: int = 1000               # total optimizer steps
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100               # linear learning-rate warmup steps
    grad_clip: float = 1.0          # global gradient-norm clip (0 = off)
    ema_decay: float = 0.999        # theta_ema <- mu theta_ema + (1 - mu) theta after every step
    weight_decay: float = 0.0       # decoupled (AdamW) weight decay
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    sample_every: int = 0           # 0: samples only at the end
    dtype: str = "float32"
    precision: str = "fp32"        # GEMM inputs: fp32, or tf32 (rounded to TF32, fp32 accumulation; precision.py)
    explode_factor: float = 1e4     # divergence guard: loss > factor * max(best smoothed loss, 1e-3) stops the run

    def validate(self):
        nonfinite = {k: v for k, v in asdict(self).items() if isinstance(v, float) and not math.isfinite(v)}
        if nonfinite:                    # NaN passes every range test (its comparisons are all false)
            raise ValueError(f"training settings must be finite numbers, got {nonfinite}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be >= 1")
        if self.steps > 10**9:
            raise ValueError(f"--steps {self.steps} is more than 10^9 optimizer steps; "
                             "that would never finish: pass a realistic number")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
        if not (self.grad_clip >= 0 and self.weight_decay >= 0):
            raise ValueError(f"grad_clip and weight_decay must be >= 0, got {self.grad_clip}, {self.weight_decay}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        precision.check_mode(self.precision)
        if self.precision == "tf32" and self.dtype != "float32":
            raise ValueError(f"--precision tf32 rounds float32 matrix products; with --dtype {self.dtype} "
                             "use --precision fp32")
        if not self.explode_factor > 1:
            raise ValueError(f"explode_factor must be > 1, got {self.explode_factor}")
        return self


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for one (run seed, step, stream): resumable without RNG state."""
    return seeds.derive(seed, "step", step, stream)


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.signum = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:              # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:                  # a second Ctrl-C stops at once (the last saved state stays)
            raise Interrupted(signum, None)
        self.signum = signum
        log(f"\nsignal {signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _truncate_metrics(path: str, step: int):
    """Drop metrics lines logged after the checkpoint we resume from (they will be redone).

    A cut-off LAST line (the process was killed, or the disk filled, while appending it) is dropped
    too: it was logged after the checkpoint. A damaged line before it is an error naming the line.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        raw = [l for l in f if l.strip()]
    lines = []
    for number, line in enumerate(raw, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(raw):
                break
            raise ValueError(f"{path} line {number} is not JSON: {line.strip()[:80]!r}; repair or delete that "
                             "line, then resume again") from None
        if row.get("step", 0) <= step:
            lines.append(line if line.endswith("\n") else line + "\n")
    with atomic.write(path, "w") as f:          # temp file, fsync, rename (atomic.py)
        f.writelines(lines)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _added_at_default(key: str, value) -> bool:
    """True for 'train.X' / 'loss.X' at the default of TrainConfig / DistillLossConfig field X."""
    section, _, name = key.partition(".")
    owner = {"train": TrainConfig, "loss": DistillLossConfig}.get(section)
    fields = getattr(owner, "__dataclass_fields__", {})
    if section == "loss" and name in VALUE_BEFORE_OPTION:
        # runs from before the option existed used VALUE_BEFORE_OPTION (LFMD: the finite difference)
        return value in (fields[name].default, VALUE_BEFORE_OPTION[name])
    return name in fields and value == fields[name].default


def _unset_label(key: str) -> str:
    """How a difference names a setting the checkpoint lacks (with the value it had in effect, if known)."""
    section, _, name = key.partition(".")
    if section == "loss" and name in VALUE_BEFORE_OPTION:
        return f"(not set: {VALUE_BEFORE_OPTION[name]} before the option existed)"
    return "(not set)"


def config_differences(saved: dict, requested: dict) -> list:
    """['train.lr: 0.001 -> 0.002', ...] for every run-defining setting that differs."""
    safe = {f"train.{k}" for k in RESUME_SAFE_FIELDS}
    a, b = _flatten(saved), _flatten(requested)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in safe:
            continue
        if key not in a and (_added_at_default(key, b[key]) or key.startswith("inputs.")):
            continue                 # a setting (or input hash) added after the checkpoint was written
        old, new = a.get(key, _unset_label(key)), b.get(key, "(not set)")
        if isinstance(old, list):
            old = tuple(old)
        if isinstance(new, list):
            new = tuple(new)
        if old != new:
            diffs.append(f"{key}: {old} -> {new}")
    return diffs


class _Guard:
    """The divergence test: finite, and not `factor` times above the best smoothed loss."""

    def __init__(self, factor: float, state: dict | None = None):
        self.factor = factor
        state = state or {}
        self.smoothed = state.get("smoothed")
        self.best = state.get("best")

    def problem(self, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient (norm {grad_norm})"
        reference = max(self.best, EXPLODE_FLOOR) if self.best is not None else None
        if reference is not None and loss > self.factor * reference:
            return (f"exploding loss ({loss:.4g}, more than {self.factor:g} x max(best smoothed loss "
                    f"{self.best:.4g}, {EXPLODE_FLOOR:g}))")
        return None

    def record(self, loss: float):
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        self.best = self.smoothed if self.best is None else min(self.best, self.smoothed)

    def state(self) -> dict:
        return {"smoothed": self.smoothed, "best": self.best}


@distributed.with_comm_guard(coordinated=(Interrupted, TrainingDiverged, NeedsConfirmation))
def train_loop(out_dir: str, *, model_cfg, init_params: dict, objective, data_iter, tcfg: TrainConfig,
               run_config: dict, resume: bool = False, progress: bool = True, xp=None,
               max_cpu_hours: float | None = None, comm=None):
    """Run (or resume) training; returns (params, ema, step).

    init_params: NumPy parameters to start from (ignored when resuming).
    objective: has loss_and_grads(params, ema, x1, rng, dropout_seed) -> (loss, grads, metrics)
               (rng: host numpy Generator) and save_samples(params, path) (may do nothing).
    data_iter: has next() -> NumPy batch, state_dict(), load_state_dict(d).
    run_config: JSON-able dict stored in the checkpoint (data, teacher, loss ...); together
               with the model and train settings it defines the run, and a resume must match it.
    max_cpu_hours: on the CPU, measure the first steps and raise NeedsConfirmation (before
               anything is saved) when the whole run is estimated to take longer.
    Raises Interrupted after saving on SIGINT/SIGTERM, TrainingDiverged on divergence.
    comm: the data-parallel communicator (default distributed.current(): one process unless the
               CLI ran under mpiexec). With K ranks each takes B/K rows of every global batch and
               the gradients are averaged over the K ranks before the (identical) updates; rank 0
               alone writes checkpoints, metrics, samples and the progress bar.
    """
    tcfg.validate()
    comm = comm or distributed.current()
    dp = distributed.DataParallel(comm, tcfg.batch_size)     # this rank's rows [lo, hi) of every batch
    dp.shard_iterator(data_iter)
    log = _progress.log if comm.is_root else (lambda *a, **k: None)   # rank 0 speaks for all
    xp = xp or backend.get_xp()
    if not backend.is_cupy(xp):
        # freed activations stay in the heap for the next step instead of page-faulting back in (backend.py):
        # select_device does this for the CLI; a script that calls train_loop directly gets it here
        backend.tune_cpu_allocator()
    dtype = np.dtype(tcfg.dtype)
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)
    metrics_path = os.path.join(out_dir, METRICS_NAME)
    config = dict(run_config, model=model_cfg.to_dict(), train=asdict(tcfg))
    fresh_folder = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    # parameters, EMA, moments and (in loss_at) gradients each in one buffer (flatparams.pack): Adam, the
    # EMA and the gradient norm then run once per step over all parameters, not once per tensor
    if os.path.exists(ckpt_path):
        if not resume:
            raise FileExistsError(f"{ckpt_path} already exists: pass --resume to continue that run, "
                                  "or choose another --out (nothing was overwritten)")
        state = ckpt.load_checkpoint(ckpt_path)
        diffs = config_differences(state["config"], json.loads(json.dumps(config)))
        if diffs:
            raise ResumeMismatch(
                f"cannot resume {ckpt_path}: these settings differ from the run's ("
                + "; ".join(diffs) + "). Resume with the run's own settings (only --steps, --log-every, "
                "--ckpt-every, --sample-every may change), or start a new run with another --out.")
        ckpt.check_params_match(init_params, state["params"])
        params = flatparams.pack(P.to_device(P.astype(state["params"], dtype), xp))
        ema = flatparams.pack(P.to_device(P.astype(state["ema"], dtype), xp), like=params)
        loaded = optim.adam_state_to_device(state["opt_state"], xp, dtype)
        opt = optim.AdamState(step=loaded.step, m=flatparams.pack(loaded.m, like=params),
                              v=flatparams.pack(loaded.v, like=params))
        step = int(state["step"])
        data_iter.load_state_dict(state["rng_state"]["data"])
        guard = _Guard(tcfg.explode_factor, state["rng_state"].get("guard"))
        if comm.is_root:
            _truncate_metrics(metrics_path, step)
        log(f"resumed {ckpt_path} at step {step}")
    else:
        if resume:
            log(f"--resume: no checkpoint in {out_dir} yet, starting from step 0")
        params = flatparams.pack(P.to_device(P.astype(init_params, dtype), xp))
        ema = params.copy()                                       # a FlatParams with its own buffer
        opt = optim.adam_init(params)                             # moments in one buffer each, like params
        step = 0
        guard = _Guard(tcfg.explode_factor)

    # every rank must now hold the same state (same seed / same checkpoint): compared bit for bit
    distributed.check_replicas(comm, {"params": params, "ema": ema, "adam_m": opt.m, "adam_v": opt.v,
                                      "adam_step": opt.step, "step": step, "data": data_iter.state_dict()})
    if step >= tcfg.steps:
        log(f"already trained for {step} >= {tcfg.steps} steps")
        return params, ema, step

    def snapshot():
        """A host copy of everything a checkpoint holds, taken now, written once shown sane."""
        if not comm.is_root:             # only rank 0 writes; the others keep the step to check
            return dict(step=step)
        return dict(params=P.to_numpy(params), ema=P.to_numpy(ema),
                    opt_state=optim.AdamState(step=opt.step, m=P.to_numpy(opt.m), v=P.to_numpy(opt.v)),
                    step=step, rng_state={"seed": tcfg.seed, "data": data_iter.state_dict(),
                                          "guard": guard.state()})

    def write(snap):
        if comm.is_root:
            ckpt.save_checkpoint(ckpt_path, snap["params"], ema=snap["ema"], opt_state=snap["opt_state"],
                                 step=snap["step"], rng_state=snap["rng_state"], config=config,
                                 keep_previous=True)

    def loss_at(step_index):
        """(loss, grads, metrics) of the current parameters on the next batch of step `step_index`."""
        x1 = backend.to_device(data_iter.next(), xp).astype(dtype, copy=False)
        # noise/times drawn for the global batch, this rank's rows kept (K-independent numbers)
        rng = dp.step_rng(np.random.default_rng(step_seed(tcfg.seed, step_index, 0)))
        loss, grads, metrics = objective.loss_and_grads(params, ema, x1, rng,
                                                        dp.dropout_seed(step_seed(tcfg.seed, step_index, 1)))
        # g = sum_r (n_r / B) g_r: the global-batch mean, the same on every rank (one all-reduce)
        loss, grads, metrics, _ = dp.reduce(loss, grads, metrics)
        return loss, flatparams.pack(grads, like=params), metrics

    def diverged(problem, at_step):
        saved = ckpt_path if os.path.exists(ckpt_path) else None
        where = (f"the last good checkpoint is {saved} (step {ckpt.load_checkpoint(saved)['step']}, "
                 "finite weights); nothing after it was saved" if saved else
                 "no checkpoint had been saved yet in this run")
        return TrainingDiverged(f"{problem} at step {at_step}: {where}. "
                                "Lower --lr, raise --warmup or use --grad-clip.")

    def save_checked(snap):
        """Write `snap` after one extra loss evaluation of its parameters (no update)."""
        data_state = data_iter.state_dict()
        loss, grads, _ = loss_at(snap["step"])
        norm = optim.global_grad_norm(grads)
        del grads
        data_iter.load_state_dict(data_state)
        problem = guard.problem(loss, norm)
        if problem:
            raise diverged(problem, snap["step"])
        write(snap)

    pending = None                       # a snapshot waiting for the next loss to prove it sane
    t_start, n_done = time.perf_counter(), 0
    first_timed = None
    stopping = False                     # a stop request on any rank, agreed after every step
    with Progress(tcfg.steps - step, "train", enabled=progress and comm.is_root) as bar, \
            _StopRequest() as stop, precision.using(tcfg.precision), \
            open(metrics_path if comm.is_root else os.devnull, "a") as mlog:
        while step < tcfg.steps:
            loss, grads, metrics = loss_at(step)
            grad_norm = optim.clip_grad_norm(grads, tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf"))
            problem = guard.problem(loss, grad_norm)
            if problem:
                raise diverged(problem, step)
            if pending is not None:      # this loss was computed with the pending state's parameters
                write(pending)
                pending = None
            guard.record(loss)
            lr = optim.warmup_lr(tcfg.lr, step + 1, tcfg.warmup)
            optim.adam_step(params, grads, opt, lr, weight_decay=tcfg.weight_decay)
            del grads
            optim.ema_update(ema, params, tcfg.ema_decay)
            step += 1
            n_done += 1
            elapsed = time.perf_counter() - t_start
            it_s = n_done / max(elapsed, 1e-9)
            bar.update(1, status=f"loss {loss:.4g}")
            if n_done == 1:
                first_timed = time.perf_counter()
            elif n_done == 3 and max_cpu_hours is not None and not backend.is_cupy(xp):
                per_step = (time.perf_counter() - first_timed) / 2     # steps 2 and 3 (step 1 warms up)
                estimate_h = per_step * (tcfg.steps - step) / 3600
                if comm.any_flag(estimate_h > max_cpu_hours):      # the ranks' timings differ: agree
                    mlog.close()
                    if comm.is_root:
                        _abandon(out_dir, metrics_path, fresh_folder, ckpt_path)
                    # a resumed run, or --ckpt-every 1 or 2, has a checkpoint now: say so (and how to go on)
                    saved = (f"its checkpoint {ckpt_path} is kept: run the same command with --resume --yes to "
                             "continue it" if os.path.exists(ckpt_path) else "nothing was saved. Pass --yes "
                             "to run it anyway")
                    raise NeedsConfirmation(
                        f"this run needs about {format_seconds(estimate_h * 3600)} on the CPU "
                        f"({per_step:.2f} s/step x {tcfg.steps - step} steps, measured); {saved}, use "
                        "--device gpu, or ask for fewer --steps.")
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                rec = dict(step=step, loss=loss, grad_norm=float(grad_norm), lr=lr, it_per_s=it_s,
                           time_s=elapsed, **{k: float(v) for k, v in metrics.items() if k != "loss"})
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
            stopping = comm.any_flag(stop.requested)     # Ctrl-C reaches every rank, a scheduler's signal maybe one
            if (tcfg.ckpt_every and step % tcfg.ckpt_every == 0) or step == tcfg.steps or stopping:
                pending = snapshot()
            if tcfg.sample_every and step % tcfg.sample_every == 0 and comm.is_root:
                objective.save_samples(ema, os.path.join(out_dir, "samples", f"step_{step:07d}.png"))
            if stopping:
                break
        save_checked(pending)            # the final (or interrupted) state, checked by one more loss
    # Rank 0 alone writes the checkpoint; the others must not go on (evaluate it, train on with it,
    # distill from it) before the file is complete, or they read nothing or an older step.
    comm.barrier()
    if stopping:
        raise Interrupted(stop.signum or signal.SIGTERM, ckpt_path, step)
    if comm.is_root:
        objective.save_samples(ema, os.path.join(out_dir, "samples", f"step_{step:07d}.png"))
    return params, ema, step


def _abandon(out_dir, metrics_path, fresh_folder, ckpt_path):
    """Undo what a run that never saved wrote (the metrics lines of its probe steps)."""
    if os.path.exists(ckpt_path):
        return
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    if fresh_folder:
        try:
            os.rmdir(out_dir)
        except OSError:
            pass
