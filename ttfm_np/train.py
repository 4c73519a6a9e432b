"""One training loop for teacher training and distillation.

Each step:  x1 = next data batch  ->  (loss, grads) = objective(params, ema, x1, rng)
            -> NaN/Inf guard -> clip -> Adam (with warmup) -> EMA update.

What a user gets in OUT_DIR:
    checkpoint.h5   params, EMA, Adam moments, step, data-order state, config (atomic writes)
    metrics.jsonl   one JSON line every log_every steps (loss, grad norm, lr, it/s)
    samples/        PNG grids (images) or scatter plots (2-D) every sample_every steps

Randomness is derived from (seed, step) for every step (noise, times,
dropout), so resuming from a checkpoint replays exactly the same numbers; the
only stateful stream is the data order, whose state is stored.
Ctrl-C or SIGTERM finishes the current step, saves, and exits cleanly.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass

import click
import numpy as np

from . import backend, ckpt, optim
from . import params as P

CHECKPOINT_NAME = "checkpoint.h5"


class TrainingDiverged(RuntimeError):
    """Loss or gradients became NaN/Inf; the last good checkpoint is kept."""


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

    def validate(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        return self


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for one (run seed, step, stream): resumable without RNG state."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:              # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:                  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        click.echo(f"\nsignal {signum}: finishing this step, saving a checkpoint, then stopping", err=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _all_finite(xp, grads) -> bool:
    return all(bool(xp.isfinite(g).all()) for g in grads.values())


def _truncate_metrics(path: str, step: int):
    """Drop metrics lines logged after the checkpoint we resume from (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def train_loop(out_dir: str, *, model_cfg, init_params: dict, objective, data_iter, tcfg: TrainConfig,
               run_config: dict, resume: bool = False, progress: bool = True, xp=None):
    """Run (or resume) training; returns (params, ema, step).

    init_params: NumPy parameters to start from (ignored when resuming).
    objective: has loss_and_grads(params, ema, x1, rng, dropout_rng) -> (loss, grads, metrics)
               and save_samples(params, path) (may do nothing).
    data_iter: has next() -> NumPy batch, state_dict(), load_state_dict(d).
    run_config: JSON-able dict stored in the checkpoint (model, data, losses ...).
    """
    tcfg.validate()
    xp = xp or backend.get_xp()
    dtype = np.dtype(tcfg.dtype)
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    config = dict(run_config, model=model_cfg.to_dict(), train=asdict(tcfg))

    if os.path.exists(ckpt_path):
        if not resume:
            raise FileExistsError(f"{ckpt_path} already exists: pass --resume to continue that run, "
                                  "or choose another --out (nothing was overwritten)")
        state = ckpt.load_checkpoint(ckpt_path)
        saved_model = state["config"].get("model")
        if saved_model != config["model"]:
            raise ValueError(f"cannot resume: the checkpoint's model {saved_model} differs from the "
                             f"requested {config['model']}")
        ckpt.check_params_match(init_params, state["params"])
        params = P.to_device(P.astype(state["params"], dtype), xp)
        ema = P.to_device(P.astype(state["ema"], dtype), xp)
        opt = optim.adam_state_to_device(state["opt_state"], xp, dtype)
        step = int(state["step"])
        data_iter.load_state_dict(state["rng_state"]["data"])
        _truncate_metrics(metrics_path, step)
        click.echo(f"resumed {ckpt_path} at step {step}", err=True)
    else:
        if resume:
            click.echo(f"--resume: no checkpoint in {out_dir} yet, starting from step 0", err=True)
        params = P.to_device(P.astype(init_params, dtype), xp)
        ema = P.copy(params)
        opt = optim.adam_init(params)
        step = 0

    def save():
        ckpt.save_checkpoint(ckpt_path, params, ema=ema, opt_state=opt, step=step,
                             rng_state={"seed": tcfg.seed, "data": data_iter.state_dict()}, config=config)

    def save_samples():
        objective.save_samples(ema, os.path.join(out_dir, "samples", f"step_{step:07d}.png"))

    if step >= tcfg.steps:
        click.echo(f"already trained for {step} >= {tcfg.steps} steps", err=True)
        return params, ema, step

    t_start, n_done = time.perf_counter(), 0
    last = {"loss": float("nan")}
    with contextlib.ExitStack() as stack:
        sink = None if progress else stack.enter_context(open(os.devnull, "w"))
        bar = stack.enter_context(click.progressbar(
            length=tcfg.steps - step, label="train", file=sink, show_eta=True,
            item_show_func=lambda _: f"loss {last['loss']:.4g}  {last.get('it_s', 0):.2f} it/s"))
        stop = stack.enter_context(_StopRequest())
        mlog = stack.enter_context(open(metrics_path, "a"))
        while step < tcfg.steps:
            x1 = backend.to_device(data_iter.next(), xp).astype(dtype, copy=False)
            rng = backend.default_rng(step_seed(tcfg.seed, step, 0), xp)
            drop_rng = backend.default_rng(step_seed(tcfg.seed, step, 1), xp)
            loss, grads, metrics = objective.loss_and_grads(params, ema, x1, rng, drop_rng)
            if not math.isfinite(loss) or not _all_finite(xp, grads):
                raise TrainingDiverged(
                    f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step} "
                    f"(loss {loss}); the last good checkpoint {ckpt_path} is kept. "
                    "Lower --lr, raise --warmup or use --grad-clip.")
            grad_norm = optim.clip_grad_norm(grads, tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf"))
            lr = optim.warmup_lr(tcfg.lr, step + 1, tcfg.warmup)
            optim.adam_step(params, grads, opt, lr, weight_decay=tcfg.weight_decay)
            optim.ema_update(ema, params, tcfg.ema_decay)
            step += 1
            n_done += 1
            elapsed = time.perf_counter() - t_start
            last.update(loss=loss, it_s=n_done / max(elapsed, 1e-9))
            bar.update(1)
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                rec = dict(step=step, loss=loss, grad_norm=float(grad_norm), lr=lr, it_per_s=last["it_s"],
                           time_s=elapsed, **{k: float(v) for k, v in metrics.items() if k != "loss"})
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
            if tcfg.ckpt_every and step % tcfg.ckpt_every == 0:
                save()
            if tcfg.sample_every and step % tcfg.sample_every == 0:
                save_samples()
            if stop.requested:
                break
    save()
    if step == tcfg.steps or stop.requested:
        save_samples()
    if stop.requested:
        click.echo(f"stopped at step {step}; resume with the same command plus --resume", err=True)
    return params, ema, step
