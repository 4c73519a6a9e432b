#!/usr/bin/env python
"""ttfm_np command line: train a flow-matching teacher, distill it into a
two-timed flow model, sample, evaluate, compute FID.

    python cli.py --help
    python cli.py COMMAND --help

Only options, help texts and the translation of library errors live here;
the work is done by ttfm_np.pipeline (callable from Python the same way).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import signal
import sys
import tempfile
import traceback
import warnings

import click

from ttfm_np import backend, pipeline, recipes
from ttfm_np.losses import LFMD_DERIVATIVES, LOSS_DEFAULTS, LOSSES, PAIR_SAMPLINGS, DistillLossConfig

MODEL_CHOICES = ["mlp", "mlp-small", "mlp-tiny", "tiny", "small", "cifar10", "celebahq64"]
SOLVERS = click.Choice(["euler", "heun", "rk4"])
ONE_PROCESS = ("params_cmd", "convert_inception", "plot_metrics", "import_teacher_cmd")   # the others split their work over mpiexec's ranks


def command(fn):
    """Select the device, turn signals into Interrupted and library errors into `Error: ...` lines."""
    @functools.wraps(fn)
    def wrapper(*args, device=None, dist="auto", **kwargs):
        from ttfm_np import ckpt, distributed, runlock, train
        from ttfm_np.train import Interrupted
        for name, value in kwargs.items():          # NaN passes click's ranges (its comparisons are all false)
            if isinstance(value, float) and not math.isfinite(value):
                raise click.BadParameter(f"must be a finite number, got {value}",
                                         param_hint="--" + name.replace("_", "-"))
        # the library's exceptions that mean bad input or a failed run (not a bug): one line, no traceback
        errors = (ValueError, OSError, ckpt.CheckpointError, train.TrainingDiverged, train.NeedsConfirmation,
                  runlock.RunLocked)

        def interrupted(signum, frame):
            raise Interrupted(signum, None)
        old = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            comm = distributed.setup(dist, device)        # first: NCCL makes the rank's own GPU current
            if comm.size > 1 and fn.__name__ in ONE_PROCESS:
                raise click.UsageError("this command runs in one process: start it without mpiexec")
            backend.select_device(device)
            stdout = sys.stdout if comm.is_root else open(os.devnull, "w")    # rank 0 alone prints results
            with warnings.catch_warnings(), distributed.fail_together(comm), contextlib.redirect_stdout(stdout):
                warnings.simplefilter("always")
                warnings.showwarning = lambda m, *a, **k: click.echo(f"Warning: {m}", err=True)
                return fn(*args, **kwargs)
        except (backend.BackendError, distributed.DistributedError) as exc:
            raise click.ClickException(str(exc)) from None
        except Interrupted as exc:
            hint = (f"; state saved in {exc.checkpoint} at step {exc.step}: run the same command with --resume "
                    "to continue" if exc.checkpoint else "; nothing of this command's output is complete")
            click.echo(f"Error: interrupted by {signal.Signals(exc.signum).name}{hint}", err=True)
            sys.exit(exc.exit_code)
        except (click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if isinstance(exc, errors) and _is_bad_input(exc):
                raise click.ClickException(_one_line(exc)) from None
            # a bug (or an error no check of ours anticipated): keep its traceback, in a file
            raise click.ClickException(_internal_error(exc, kwargs.get("out"))) from None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    wrapper = click.option("--device", type=click.Choice(backend.DEVICE_CHOICES), default=None,
                           help="cpu, gpu or auto (default: $TTFM_DEVICE, else auto)")(wrapper)
    wrapper = click.option("--dist", type=click.Choice(["auto", "none", "mpi", "nccl"]), default="auto",
                           help="data parallelism under mpiexec: auto = NCCL on GPUs, MPI on CPUs when "
                                "started with K > 1 ranks, else one process")(wrapper)
    return wrapper


def _is_bad_input(exc) -> bool:
    """True for the library's own errors: raised by a `raise` line of ttfm_np / cli.py, or its own classes.

    A ValueError that numpy (or any other library) raises from inside our code, like "axes don't
    match array", is a bug of ours and is reported as an internal error (_internal_error).
    OSErrors (missing files, full disks, permissions) are always about the environment.
    """
    if isinstance(exc, OSError) or type(exc).__module__.startswith("ttfm_np"):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    ours = os.path.abspath(last.filename).startswith((os.path.dirname(os.path.abspath(backend.__file__)) + os.sep,
                                                      os.path.abspath(__file__)))
    return ours and (last.line or "").lstrip().startswith("raise")


def _one_line(exc) -> str:
    """The message of a library error; full disks get the path and the fix (not a bare "[Errno 28]")."""
    text = str(exc).strip() or exc.__class__.__name__
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) and text.startswith("[Errno"):
        where = f" while writing {exc.filename}" if exc.filename else ""
        text = (f"no space left on the device{where} ({exc.strerror}): free space on that disk (or write to "
                "another one with --out) and run the same command again (a training run: with --resume; "
                "its last checkpoint is intact)")
    return text


def _internal_error(exc, out) -> str:
    """Write the traceback to <run folder>/error.log (else a temp file); the one line says where it is."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        if out and os.path.isdir(out):
            log_path = os.path.join(out, "error.log")
            with open(log_path, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            fd, log_path = tempfile.mkstemp(prefix="ttfm-error-", suffix=".log")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        where = f"the traceback is in {log_path}"
    except OSError:
        where = "the traceback could not be saved:\n" + text
    return (f"internal error ({exc.__class__.__name__}: {str(exc).strip()[:300]}); {where}. This is a bug in "
            "ttfm_np, not in your input: please report it with that file")


def parse_steps(ctx, param, text):
    """'1,2,4,8' -> [1, 2, 4, 8], each a step count >= 1."""
    try:
        steps = [int(v) for v in str(text).split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise click.BadParameter(f"expected comma-separated integers >= 1 like 1,2,4,8, got {text!r}")
    return steps


def options(*opts):
    def deco(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


TRAIN_OPTIONS = options(
    click.option("--steps", type=click.IntRange(1, 10**9), default=None,
                 help="optimizer steps (default: the recipe); may change on --resume"),
    click.option("--batch-size", type=click.IntRange(1), default=None, help="batch size (default: recipe)"),
    click.option("--lr", type=click.FloatRange(0, 10, min_open=True), default=None, help="learning rate (default: recipe)"),
    click.option("--warmup", type=click.IntRange(0), default=None, help="learning-rate warmup steps"),
    click.option("--grad-clip", type=click.FloatRange(0), default=None, help="gradient-norm clip, 0 = off (default 1)"),
    click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=None, help="EMA decay mu (default: distill: the loss's measured best, else the recipe's)"),
    click.option("--seed", type=click.IntRange(0), default=0, help="seed for init, data order, noise, times, dropout"),
    click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32"),
    click.option("--precision", type=click.Choice(["fp32", "tf32"]), default=None,
                 help="matrix products (convolutions, linears, attention): fp32, or tf32 = inputs rounded to "
                 "TF32, fp32 accumulation (GPU tensor cores; emulated on the CPU). Default fp32. distill: the "
                 "student's training; a default teacher that distill trains first is always fp32 (it is shared by "
                 "every run: `train --precision tf32` and --teacher for a TF32 teacher)"),
    click.option("--log-every", type=click.IntRange(1), default=None, help="steps between metrics lines (may change on --resume)"),
    click.option("--ckpt-every", type=click.IntRange(0), default=None, help="steps between checkpoints (may change on --resume)"),
    click.option("--sample-every", type=click.IntRange(0), default=None, help="steps between sample PNGs, 0: end only"),
    click.option("--resume", is_flag=True, help="continue the run in --out; every setting except --steps, "
                 "--log-every, --ckpt-every, --sample-every must equal the run's"),
    click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="folder searched first for datasets"),
    click.option("--yes", is_flag=True, help="start even when a CPU run is estimated to take over an hour or "
                 "more memory than available (the checks before the first step: ttfm_np/resources.py)"),
    click.option("--recipe", type=click.Choice(["quick", "full"]), default=None,
                 help="toy recipes: quick (minutes; the distill default) or full"),
)


def _train_kwargs(kw):
    """Split the shared training options into (pipeline keywords, train overrides)."""
    common = dict(resume=kw.pop("resume"), data_dir=kw.pop("data_dir"),
                  max_cpu_hours=None if kw.pop("yes") else 1.0)
    return common, kw


@click.group(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
def cli():
    """Flow matching and TTFM/ITVM distillation in hand-written NumPy/CuPy."""


@cli.command("params")
@click.option("--model", "model_name", type=click.Choice(MODEL_CHOICES), default="cifar10", help="network preset")
@click.option("--channels", type=click.IntRange(1, 16), default=3, help="image channels")
@click.option("--resolution", type=click.IntRange(4, 1024), default=None, help="image size (default 32; 64 for celebahq64)")
@click.option("--two-time/--one-time", default=False, help="student (s, t) or teacher (t)")
@command
def params_cmd(model_name, channels, resolution, two_time):
    """Print the parameter count of a preset, per top-level block."""
    groups, total, shape = pipeline.parameter_table(model_name, channels, resolution, two_time)
    for name, n in groups:
        click.echo(f"{name:28s} {n:>12,d}")
    click.echo(f"{'total':28s} {total:>12,d}   ({model_name}, input {shape})")


@cli.command()
@click.option("--data", required=True, help="toy:checkerboard|moons|8gaussians|spirals, points:FILE.npy, fashion-mnist, cifar10, imagefolder:PATH")
@click.option("--model", "model_name", type=click.Choice(MODEL_CHOICES), default=None,
              help="network (default: mlp for 2-D data, small for fashion-mnist, cifar10 for cifar10)")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="run folder (default: <data root>/teachers/<data>-<model>, where distill looks)")
@click.option("--time-sampling", type=click.Choice(["uniform", "logit_normal"]), default="uniform",
              help="distribution of t in the flow-matching loss")
@click.option("--flip/--no-flip", default=False, help="random horizontal flips of images")
@click.option("--resolution", type=click.IntRange(4, 1024), default=None,
              help="image size, imagefolder data only (default: the images' own size up to 32 px, else 64)")
@click.option("--time-scale", type=click.FloatRange(0, None, min_open=True), default=None,
              help="frequency of the network's sinusoidal time features (default: the preset's, 1000); 1 feeds "
                   "t in [0, 1] unscaled, what MeanFlow students need (docs/method.md §5.8); needs --out")
@TRAIN_OPTIONS
@command
def train(data, model_name, out, time_sampling, flip, resolution, time_scale, recipe, **kw):
    """Train a flow-matching teacher v(x, t)."""
    common, overrides = _train_kwargs(kw)
    res = pipeline.train_teacher(data, model_name=model_name, out=out, quick=recipe == "quick",
                                 time_sampling=time_sampling, flip=flip, resolution=resolution,
                                 time_scale=time_scale, **common, **overrides)
    click.echo(f"checkpoint: {res.checkpoint}")


d = DistillLossConfig()          # distill's loss options: every default comes from losses.DistillLossConfig
LOSS_OPTIONS = options(
    click.option("--loss", type=click.Choice(LOSSES), default=d.loss, help="distillation loss (docs/method.md §5)"),
    click.option("--lambda-init", type=click.FloatRange(0), default=d.lambda_init, help="ITVM initial-velocity weight"),
    click.option("--lambda-term", type=click.FloatRange(0), default=d.lambda_term, help="ITVM terminal-velocity weight"),
    click.option("--delta", type=click.FloatRange(0, 1, min_open=True), default=d.delta, help="absolute teacher step Delta (ITVM, ECD)"),
    click.option("--delta-mode", type=click.Choice(["absolute", "relative"]), default=d.delta_mode,
                 help="ITVM: Delta absolute, or relative: Delta = kappa (t - s)"),
    click.option("--kappa", type=click.FloatRange(0, 1, min_open=True), default=d.kappa, help="relative Delta fraction"),
    click.option("--target-solver", type=click.Choice(["euler", "heun"]), default=d.target_solver,
                 help="teacher step in the ITVM target"),
    click.option("--ema-target/--no-ema-target", default=d.ema_target, help="targets from the EMA student (ITVM, ECD)"),
    click.option("--fd-step", type=click.FloatRange(0, 0.5, min_open=True, max_open=True), default=d.fd_step,
                 help="LFMD finite-difference step in t, with --lfmd-derivative fd (default: 0.1 / the time-feature frequency)"),
    click.option("--lfmd-derivative", type=click.Choice(LFMD_DERIVATIVES), default=d.lfmd_derivative,
                 help="LFMD's d/dt phi: jvp (exact, forward mode) or fd (finite difference) "
                      f"[default: {LOSS_DEFAULTS['lfmd']['lfmd_derivative']}]"),
    click.option("--meanflow-p", type=click.FloatRange(0, 2), default=d.meanflow_p,
                 help="MeanFlow's adaptive weight 1 / (||u - u_tgt||^2 + 1e-3)^p per sample; 0 = plain squared error "
                      f"[default: {LOSS_DEFAULTS['meanflow']['meanflow_p']}]"),
    click.option("--lfmd-teacher-grad/--no-lfmd-teacher-grad", default=d.lfmd_teacher_grad,
                 help="LFMD: back-propagate through the teacher's input"),
    click.option("--pairs", type=click.Choice(PAIR_SAMPLINGS), default=d.pairs, help="time-pair sampling (docs/method.md §4)"),
    click.option("--frac-t1", type=click.FloatRange(0, 1), default=d.frac_t1, help="fraction of time pairs with t = 1"),
    click.option("--max-gap", type=click.FloatRange(0, 1, min_open=True), default=d.max_gap, help="restrict t - s"),
)


@cli.command()
@click.option("--data", default="toy:checkerboard", help="dataset (see train); the default runs offline in minutes")
@click.option("--teacher", type=click.Path(), default=None,
              help="teacher checkpoint or run folder (default: the dataset's default teacher; trained first if missing)")
@click.option("--model", "model_name", type=click.Choice(MODEL_CHOICES), default=None,
              help="preset of the default teacher (default: the dataset's recipe)")
@LOSS_OPTIONS
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="run folder (default runs/distill-<data>-<loss>: reused when finished with the same settings)")
@click.option("--eval-steps", default="1,2,4,8", callback=parse_steps, help="step counts for the final evaluation")
@click.option("--eval-n", type=click.IntRange(2), default=None, help="noise samples in the final evaluation (default 2000 for 2-D data, 256 images)")
@click.option("--eval-n-ref", type=click.IntRange(2), default=256, help="Heun steps of the evaluation's reference")
@click.option("--resolution", type=click.IntRange(4, 1024), default=None,
              help="image size, imagefolder data only (default: the teacher's; a new default teacher: the "
                   "images' own size up to 32 px, else 64)")
@TRAIN_OPTIONS
@command
def distill(data, teacher, model_name, out, eval_steps, eval_n, eval_n_ref, resolution, recipe, **kw):
    """Distill a teacher into a two-timed flow model, then evaluate it.

    With no arguments: toy:checkerboard with the quick recipe (teacher trained first if there is none).
    """
    loss_fields = set(DistillLossConfig.__dataclass_fields__)
    loss = DistillLossConfig(**{k: kw.pop(k) for k in list(kw) if k in loss_fields})
    common, overrides = _train_kwargs(kw)
    quick = (recipe or ("quick" if recipes.family(data) == "toy" else "full")) == "quick"
    pipeline.distill(data, teacher=teacher, model_name=model_name, loss=loss, out=out, quick=quick,
                     eval_steps=eval_steps, eval_n=eval_n, eval_n_ref=eval_n_ref, resolution=resolution,
                     **common, **overrides)


@cli.command()
@click.option("--ckpt", required=True, type=click.Path(), help="checkpoint.h5 (teacher or student) or its run folder")
@click.option("--steps", type=click.IntRange(1, 100_000), default=8, help="sampling steps (network evaluations for a student)")
@click.option("--solver", type=SOLVERS, default="euler", help="ODE solver (teachers)")
@click.option("--n", type=click.IntRange(1, 1_000_000), default=64, help="number of samples")
@click.option("--seed", type=click.IntRange(0), default=0, help="noise seed")
@click.option("--weights", type=click.Choice(["ema", "params"]), default="ema", help="EMA or raw weights")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG file to write")
@command
def sample(ckpt, steps, solver, n, seed, weights, out):
    """Draw samples and write a PNG (image grid, or a scatter plot for 2-D data)."""
    info = pipeline.sample(ckpt, out=out, steps=steps, solver=solver, n=n, seed=seed, weights=weights)
    if "sliced_w2" in info:
        click.echo(f"sliced-W2 to {n} held-out {info['heldout']} points: {info['sliced_w2']:.4f}")
    click.echo(f"wrote {out}: {n} samples, {steps} steps ({info['kind']})")


@cli.command("eval")
@click.option("--teacher", required=True, type=click.Path(), help="teacher checkpoint or run folder")
@click.option("--student", type=click.Path(), default=None, help="student checkpoint (omit: teacher baselines only)")
@click.option("--steps", default="1,2,4,8", callback=parse_steps, help="comma-separated step counts")
@click.option("--n", type=click.IntRange(2, 1_000_000), default=1024, help="noise samples")
@click.option("--n-ref", type=click.IntRange(2, 100_000), default=256, help="Heun steps of the reference solution")
@click.option("--seed", type=click.IntRange(0), default=0, help="noise seed")
@click.option("--out", type=click.Path(file_okay=False), default="runs/eval", help="folder for eval.json and PNGs")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@command
def eval_cmd(teacher, student, steps, n, n_ref, seed, out, data_dir):
    """Flow-map error of N-step sampling against the teacher's reference solution."""
    pipeline.evaluate_models(teacher, student, steps=steps, n=n, n_ref=n_ref, out=out, seed=seed, data_dir=data_dir)


@cli.command("convert-inception")
@click.argument("pth", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="HDF5 file (default <data root>/inception_fid.h5)")
@command
def convert_inception(pth, out):
    """Convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth to HDF5 (no torch needed)."""
    from ttfm_np import inception
    click.echo(f"wrote {inception.convert_weights(pth, out)}")


@cli.command("import-teacher")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--arch", default="torchcfm-unet-cifar10", show_default=True,
              help="torchcfm-unet-cifar10, or a .json file of torchcfm UNetModelWrapper keyword arguments")
@click.option("--data", default="cifar10", show_default=True, help="the dataset the checkpoint was trained on")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="teacher run folder to write")
@command
def import_teacher_cmd(checkpoint, arch, data, out):
    """Import a torchcfm checkpoint (.pt) as a teacher for `distill --teacher OUT` (no torch needed)."""
    from ttfm_np import import_teacher
    info = import_teacher.import_torchcfm(checkpoint, out, arch=arch, data=data)
    weights = "EMA weights (ema_model) as the teacher, net_model as params" if info["weights"]["ema"] else \
        "the file's only weights"
    click.echo(f"wrote {info['checkpoint']}: {info['arch']}, {weights}, torchcfm step {info['torchcfm_step']}, "
               f"sha256 {info['sha256'][:16]}...")


@cli.command("fid-stats")
@click.option("--data", required=True, help="dataset (fashion-mnist, cifar10, imagefolder:PATH) or a folder of PNGs")
@click.option("--split", type=click.Choice(["train", "test"]), default="train")
@click.option("--n", type=click.IntRange(2), default=None, help="use only the first n images")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=100)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="default <data root>/fid_stats/<data>-<split>.npz")
@click.option("--resolution", type=click.IntRange(4, 1024), default=None, help="image size for imagefolder data")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@command
def fid_stats(data, split, n, batch_size, out, resolution, data_dir):
    """Inception statistics (mu, sigma) of a dataset, cached under <data root>/fid_stats/."""
    path, count = pipeline.fid_stats(data, split=split, n=n, batch_size=batch_size, out=out,
                                     resolution=resolution, data_dir=data_dir)
    click.echo(f"wrote {path} ({count} images)")


@cli.command("fid")
@click.option("--ckpt", type=click.Path(), default=None, help="checkpoint to sample from")
@click.option("--folder", type=click.Path(file_okay=False), default=None, help="or: a folder of PNGs to score")
@click.option("--steps", type=click.IntRange(1, 100_000), default=1, help="sampling steps")
@click.option("--solver", type=SOLVERS, default="euler", help="ODE solver (teachers)")
@click.option("--n", type=click.IntRange(2, 10_000_000), default=50000, help="samples to generate")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=100)
@click.option("--ref", type=click.Path(), default=None,
              help="reference statistics .npz or a PNG folder (default: the checkpoint's dataset, train split)")
@click.option("--seed", type=click.IntRange(0), default=0)
@command
def fid_cmd(ckpt, folder, steps, solver, n, batch_size, ref, seed):
    """FID of a checkpoint's samples (or of a PNG folder) against reference statistics."""
    r = pipeline.fid_score(ckpt_path=ckpt, folder=folder, steps=steps, solver=solver, n=n, batch_size=batch_size,
                           ref=ref, seed=seed)
    click.echo(f"FID {r['fid']:.3f}  ({r['n']} images, {r['source']}, ref {r['ref']})")


@cli.command("plot-metrics")
@click.argument("metrics", type=click.Path(exists=True))
@click.option("--key", default="loss", help="metric to plot")
@click.option("--smooth", type=click.IntRange(1), default=10, help="moving-average window (logged points)")
@click.option("--log-y/--linear-y", default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG to write")
@command
def plot_metrics(metrics, key, smooth, log_y, out):
    """Plot a metric of a run's metrics.jsonl (or a run folder) against the step."""
    click.echo(f"wrote {pipeline.plot_metrics(metrics, out=out, key=key, smooth=smooth, log_y=log_y)}")


if __name__ == "__main__":
    cli()
