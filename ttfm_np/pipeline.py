"""The pipeline as plain functions: what `cli.py` and `experiments/` call.

    from ttfm_np import pipeline
    from ttfm_np.losses import DistillLossConfig

    teacher = pipeline.ensure_teacher("toy:moons")                   # trains one when none is found
    result = pipeline.distill("toy:moons", teacher=teacher,
                              loss=DistillLossConfig(loss="itvm"), steps=500)
    print(pipeline.format_table(result.rows))

Each function validates its inputs and raises ordinary exceptions with a
message that names the problem and the fix (ValueError, FileNotFoundError,
ckpt.CheckpointError, train.TrainingDiverged, runlock.RunLocked ...);
train.Interrupted after Ctrl-C/SIGTERM, with the state saved. The CLI turns
them into one-line errors and exit codes.

This module owns the run-folder layout:

    <run>/checkpoint.h5, checkpoint.prev.h5   the run's state (train.py), two generations
    <run>/metrics.jsonl                       one JSON line per log interval
    <run>/samples/step_<k>.png                progress pictures
    <run>/eval/eval.json, eval/*.png          the evaluation `distill` runs at the end
    <run>/.lock                               held while a process writes the run
    <data root>/teachers/<data>-<model>/      default teachers (recipes.default_teacher_dir)
    <teacher>/reference_cache/                the teacher's cached reference solutions
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings

import numpy as np
from dataclasses import dataclass

from . import backend, blas, ckpt, data as datasets, evaluate as evaluation, images, losses, metrics, model, recipes
from . import atomic, inputs, jsonio, resources
from . import params as P
from . import distributed, parallel, sampling, train, ttfm
from .ckpt import CHECKPOINT_NAME
from .objectives import DistillObjective, FlowMatchingObjective
from .progress import log
from .runlock import RunLock

format_table = evaluation.format_table
TRAIN_FIELDS = tuple(f for f in train.TrainConfig.__dataclass_fields__)


@dataclass
class RunResult:
    out: str                 # the run folder
    checkpoint: str          # its checkpoint.h5
    step: int                # optimizer steps done
    teacher: str | None = None
    rows: list | None = None  # evaluation rows (distill)
    reused: bool = False     # an existing finished run was reused


def checkpoint_path(run: str) -> str:
    """A run folder or a checkpoint file -> the checkpoint file's path (it may not exist yet)."""
    return os.path.join(run, CHECKPOINT_NAME) if os.path.isdir(run) or not run.endswith(".h5") else run


def train_config(recipe: dict, **overrides) -> train.TrainConfig:
    """TrainConfig from a recipe; every override that is not None wins."""
    unknown = set(overrides) - set(TRAIN_FIELDS)
    if unknown:
        raise ValueError(f"unknown training settings {sorted(unknown)}; known: {', '.join(TRAIN_FIELDS)}")
    kw = {k: v for k, v in recipe.items() if k in TRAIN_FIELDS}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return train.TrainConfig(**kw).validate()


def image_resolution(data: str, resolution: int | None = None) -> int | None:
    """The --resolution of imagefolder data: as given, else recipes.imagefolder_resolution of the
    images' own size (so 32-pixel images train at 32 with the CIFAR-10 recipe, not at 64)."""
    if resolution is not None or not data.startswith("imagefolder:"):
        return resolution
    native = datasets.imagefolder_native_size(data.split(":", 1)[1])
    return recipes.imagefolder_resolution(native) if native else None      # None: the loader names the problem


def _load_data(data, data_dir=None, split="train", resolution=None, n=None):
    if resolution is not None and not data.startswith("imagefolder:"):
        warnings.warn(f"--resolution {resolution} applies only to imagefolder data; ignored for {data}")
        resolution = None
    return datasets.load_dataset(data, split=split, data_dir=data_dir, resolution=resolution, n=n)


def _training_data(data, data_dir=None, resolution=None, comm=None):
    """The training set; under K > 1 ranks, image data is shared through a memory-mapped file.

    Rank 0 decodes the images once and writes them (atomically) to
    <data root>/cache/<data>-<key>.npy, the key covering the source files (names, sizes and
    times: data.source_files) and the resolution, so a later start finds the file without
    decoding anything; every rank then maps that file, so the BatchIterator's `data[rows]`
    reads only the rows of the rank's shard of each batch instead of every rank decoding and
    holding the whole set.
    """
    comm = comm or distributed.current()
    if comm.size == 1:
        return _load_data(data, data_dir, resolution=resolution)
    path = None
    if comm.is_root:
        files = datasets.source_files(data, data_dir=data_dir)
        if files:                                                   # image data
            listing = [(os.path.abspath(f), st.st_size, st.st_mtime_ns) for f, st in zip(files, map(os.stat, files))]
            key = hashlib.sha1(json.dumps([data, resolution, listing]).encode()).hexdigest()[:16]
            path = os.path.join(recipes.data_root(), "cache", f"{recipes.slug(data)}-{key}.npy")
            if not os.path.exists(path):
                decoded = _load_data(data, data_dir, resolution=resolution).data
                with atomic.write(path, "wb") as f:                # atomic: never a half-written cache
                    np.save(f, np.ascontiguousarray(decoded))
                del decoded
    path = comm.bcast_object(path)
    if path is None:                                                # toys and points: small, generated or read
        return _load_data(data, data_dir, resolution=resolution)
    return datasets.Dataset(data, np.load(path, mmap_mode="r"), "image")


def _heldout_points(data, data_dir, n):
    """Held-out points (toys, points: files of any d) for sliced-W2 (any d) and histogram TV (d = 2), else None."""
    if not data.startswith(("toy:", "points:")):
        return None
    return _load_data(data, data_dir, split="test", n=n).data


POINTS_MAX_ABS = 1e4        # points: data beyond this is refused (the flow starts from N(0, I) noise)


def _check_points_scale(ds):
    """Refuse points: data far from unit scale up front: its loss overflows (or training diverges) and
    the divergence guard could only blame the learning rate. Warn at 100 (poor fits, no failure)."""
    if ds.kind not in ("toy", "points") or not ds.name.startswith("points:") or len(ds.data) == 0:
        return
    big = float(np.abs(ds.data).max())
    if big > POINTS_MAX_ABS:
        raise ValueError(f"{ds.name} holds values up to {big:.3g} in magnitude: the data is the problem, not the "
                         "learning rate. The flow starts from N(0, I) noise, so standardise the points first "
                         "(x = (x - x.mean(0)) / x.std(0); np.save) to values within about [-4, 4]")
    if big > 100:
        warnings.warn(f"{ds.name} holds values up to {big:.3g}: the flow starts from N(0, I) noise, so "
                      "standardised data (within about [-4, 4]) trains much better")


def _heldout(ds):
    return ds.data[:1000] if ds.kind in ("toy", "points") else None


class BatchTooLarge(ValueError):
    """The batch size is larger than the data set."""


def _batches(ds, tcfg, flip=False):
    if tcfg.batch_size > len(ds.data):
        raise BatchTooLarge(f"--batch-size {tcfg.batch_size} is larger than {ds.name} ({len(ds.data)} samples): "
                         f"use --batch-size {len(ds.data)} or less, or more data")
    return datasets.BatchIterator(ds.data, tcfg.batch_size, seed=tcfg.seed, flip=flip)


def _check_inputs_unchanged(out: str, hashes: dict, resume: bool) -> int:
    """On --resume, refuse inputs whose contents changed since the run started (inputs.py: old -> new).

    Returns the step the run will resume from (0 for a new run).
    """
    path = os.path.join(out, CHECKPOINT_NAME)
    if resume and os.path.exists(path):
        state = ckpt.load_checkpoint(path)
        inputs.check_unchanged(state["config"].get("inputs"), hashes, path)
        return int(state["step"])
    return 0


def _check_resources(objective, params, ds, tcfg, done: int, max_cpu_hours, mlp: bool):
    """Refuse before the first step a CPU run over the memory available or the time allowed (resources.py).

    Skipped when max_cpu_hours is None (--yes; library calls that set no limit).
    """
    if max_cpu_hours is None or tcfg.steps <= done:
        return
    comm = distributed.current()
    batch = -(-tcfg.batch_size // comm.size)                 # this rank's rows of every batch
    log("estimating memory and time from two probe passes (batch 1 and 2) ...")
    with blas.single_threaded_small_gemms(mlp):
        resources.check_before_training(objective, params, ds.data, batch, tcfg.steps - done, tcfg.dtype,
                                        max_cpu_hours, comm)


@contextlib.contextmanager
def _locked_run(out: str):
    """Hold the run folder's lock while training; a run that saved nothing leaves no folder behind."""
    fresh = not os.path.exists(out)
    try:
        with distributed.on_root(RunLock, out):          # one lock per run, held by rank 0
            yield
    except train.NeedsConfirmation:
        if fresh and distributed.current().is_root and set(os.listdir(out)) <= {".lock"}:
            shutil.rmtree(out, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- teacher

def train_teacher(data: str, *, model_name: str | None = None, out: str | None = None, quick: bool = False,
                  time_sampling: str = "uniform", flip: bool = False, resolution: int | None = None,
                  data_dir: str | None = None, resume: bool = False, progress: bool = True,
                  max_cpu_hours: float | None = None, time_scale: float | None = None,
                  **train_overrides) -> RunResult:
    """Train a flow-matching teacher v(x, t) with the dataset's recipe (overrides win).

    time_scale: the frequency of the network's sinusoidal time features (None: the preset's, 1000).
    MeanFlow students need smooth ones (1: t fed in [0, 1] unscaled; docs/method.md §5.8)."""
    if time_scale is not None and not 0.0 < time_scale < float("inf"):
        raise ValueError(f"time_scale must be a positive number, got {time_scale}")
    if time_scale is not None and out is None:
        raise ValueError("--time-scale needs --out: a teacher with other time features is not the dataset's "
                         "default teacher (pass it to distill with --teacher)")
    resolution = image_resolution(data, resolution)
    recipe = recipes.teacher_recipe(data, quick, resolution)
    model_name = model_name or recipe["model"]
    tcfg = train_config(recipe, **train_overrides)
    out = out or recipes.default_teacher_dir(data, model_name, quick)
    ds = _training_data(data, data_dir, resolution=resolution)
    _check_points_scale(ds)
    cfg = model.make_config(model_name, ds.shape, **({} if time_scale is None else dict(time_scale=time_scale)))
    batches = _batches(ds, tcfg, flip)
    objective = FlowMatchingObjective(cfg, time_sampling=time_sampling, sample_kind=ds.kind, heldout=_heldout(ds))
    log(f"teacher: {model_name} on {data} ({len(ds.data)} samples of shape {ds.shape}), {tcfg.steps} steps "
        f"of batch {tcfg.batch_size}, device {backend.device_name()}, out {out}")
    run_config = dict(task="teacher", data=data, time_sampling=time_sampling, flip=flip,
                      resolution=ds.shape[-1] if ds.kind == "image" else None,
                      inputs=inputs.input_hashes(data, data_dir))             # content, not just paths
    done = _check_inputs_unchanged(out, run_config["inputs"], resume)
    init_params = model.init_model(cfg, tcfg.seed)
    _check_resources(objective, init_params, ds, tcfg, done, max_cpu_hours, cfg.kind == "mlp")
    with _locked_run(out), blas.single_threaded_small_gemms(cfg.kind == "mlp"):
        _, _, step = train.train_loop(out, model_cfg=cfg, init_params=init_params,
                                      objective=objective, data_iter=batches, tcfg=tcfg, resume=resume,
                                      run_config=run_config, progress=progress, max_cpu_hours=max_cpu_hours)
    return RunResult(out=out, checkpoint=os.path.join(out, CHECKPOINT_NAME), step=step)


def ensure_teacher(data: str, *, model_name: str | None = None, quick: bool = False, seed: int = 0,
                   dtype: str = "float32", data_dir: str | None = None, progress: bool = True,
                   max_cpu_hours: float | None = None, resolution: int | None = None) -> str:
    """The default teacher's checkpoint for `data`, trained (or finished) first when needed."""
    resolution = image_resolution(data, resolution)
    recipe = recipes.teacher_recipe(data, quick, resolution)
    model_name = model_name or recipe["model"]
    out = recipes.default_teacher_dir(data, model_name, quick)
    path = os.path.join(out, CHECKPOINT_NAME)
    steps = recipe["steps"]
    if os.path.exists(path):
        try:
            done = int(ckpt.load_checkpoint(path)["step"])
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(f"the default teacher is unusable: {exc}. Delete {out} to train a new "
                                       "one, or pass --teacher") from None
        if done >= steps:
            return path
        log(f"the default teacher at {path} stopped at step {done} of {steps}: continuing it")
    else:
        log(f"no trained teacher at {path}: training one with the {recipes.family(data)} recipe "
            f"({model_name}, {steps} steps) first")
    try:
        train_teacher(data, model_name=model_name, out=out, quick=quick, data_dir=data_dir, resolution=resolution,
                      resume=os.path.exists(path), progress=progress, max_cpu_hours=max_cpu_hours, seed=seed,
                      dtype=dtype)
    except BatchTooLarge as exc:            # distill's --batch-size is the student's: say how to size the teacher's
        raise BatchTooLarge(f"the default teacher's recipe: {exc}. distill's --batch-size sets the student's "
                            f"batch only: train a teacher first (python cli.py train --data {data} --batch-size "
                            "N ...) and pass it with --teacher") from None
    return path


# ----------------------------------------------------------------------------- distillation

def _is_preset(cfg, model_name: str) -> bool:
    """True when the network config `cfg` is the preset `model_name` (at cfg's sample shape)."""
    try:
        return model.make_config(model_name, cfg.sample_shape, two_time=cfg.two_time).to_dict() == cfg.to_dict()
    except ValueError:                            # e.g. an MLP preset for image samples
        return False


def _default_run_dir(data, loss, quick):
    return os.path.join(recipes.RUNS_DIR, f"distill-{recipes.slug(data)}-{loss}" + ("-quick" if quick else ""))


def _choose_run_dir(default: str, config: dict, tcfg) -> tuple:
    """(folder, mode) for a run without --out: 'new', 'resume' (same run, unfinished) or 'reuse' (finished)."""
    candidate, k = default, 1
    while os.path.exists(os.path.join(candidate, CHECKPOINT_NAME)):
        state = ckpt.load_checkpoint(os.path.join(candidate, CHECKPOINT_NAME))
        same = not train.config_differences(state["config"], config)
        if same:
            return candidate, ("reuse" if int(state["step"]) >= tcfg.steps else "resume")
        k += 1
        candidate = f"{default}-{k}"
    return candidate, "new"


def distill(data: str = "toy:checkerboard", *, teacher: str | None = None, model_name: str | None = None,
            loss: losses.DistillLossConfig | None = None, out: str | None = None, quick: bool = False,
            resume: bool = False, eval_steps=(1, 2, 4, 8), eval_n: int | None = None, eval_n_ref: int = 256,
            eval_seed: int = 0, data_dir: str | None = None, progress: bool = True,
            max_cpu_hours: float | None = None, evaluate: bool = True, resolution: int | None = None,
            **train_overrides) -> RunResult:
    """Distill a teacher into a two-timed student, then (by default) evaluate it.

    teacher None: the dataset's default teacher, trained first when missing.
    resolution: imagefolder data only; default the teacher's (a given teacher must have been trained at it).
    out None: runs/distill-<data>-<loss>; a finished identical run there is reused, an unfinished
    one continued, a different one left alone (the new run goes to <folder>-2, -3, ...).
    """
    loss = (loss or losses.DistillLossConfig()).validate()
    if evaluate:
        eval_steps = check_step_counts(eval_steps)      # before training (and the teacher-solutions process)
    model_given = None
    if train_overrides.get("ema_decay") is None and loss.student_ema_decay is not None:
        train_overrides["ema_decay"] = loss.student_ema_decay      # the loss's measured best EMA rate
    if resolution is not None and not data.startswith("imagefolder:"):
        warnings.warn(f"--resolution {resolution} applies only to imagefolder data; ignored for {data}")
        resolution = None
    if teacher is None:
        teacher = ensure_teacher(data, model_name=model_name, quick=quick, seed=train_overrides.get("seed") or 0,
                                 dtype=train_overrides.get("dtype") or "float32", data_dir=data_dir,
                                 progress=progress, max_cpu_hours=max_cpu_hours, resolution=resolution)
    elif model_name is not None:
        model_given = model_name                   # checked against the given teacher's network below
    teacher = checkpoint_path(teacher)
    tm = sampling.load_model(teacher, weights="ema", dtype=train_overrides.get("dtype") or "float32",
                             role="teacher", data=data)
    teacher = os.path.abspath(tm.path)
    if data.startswith("imagefolder:"):                     # the student works at its teacher's resolution
        trained = tm.config.get("resolution")
        if resolution is not None and trained is not None and resolution != trained:
            raise ValueError(f"--resolution {resolution}, but the teacher {teacher} was trained at {trained}x"
                             f"{trained}: omit --resolution, or pass a teacher trained at {resolution}")
        resolution = trained or image_resolution(data, resolution)
    tcfg = train_config(recipes.distill_recipe(data, quick, resolution), **train_overrides)
    if model_given is not None and not _is_preset(tm.cfg, model_given):
        raise ValueError(f"--model {model_given} is not the network of the teacher {teacher}: the student copies "
                         "its teacher's network, so omit --model, or pass a teacher trained with "
                         f"--model {model_given}")
    if (loss.loss == "lfmd" and loss.lfmd_derivative == "fd" and loss.fd_step is not None
            and loss.fd_step * tm.cfg.time_scale > 1.0):
        warnings.warn(f"--fd-step {loss.fd_step} is coarse for time features of frequency {tm.cfg.time_scale:g}: "
                      "the finite difference will damp them (see docs/method.md)")
    if loss.loss == "meanflow" and tm.cfg.time_scale > losses.MEANFLOW_MAX_TIME_SCALE:
        # measured on toy:checkerboard: time_scale 1 learns at the recipe's lr, 1000 does not (docs/results.md)
        warnings.warn(f"MeanFlow on a student whose time features have frequency {tm.cfg.time_scale:g}: its "
                      "stop-gradient update amplifies fast ripples in time unless the learning rate is 20-40x smaller "
                      "(docs/method.md §5.8, 'Why it needs smooth time features'); MeanFlow learns from a teacher "
                      "with smooth time features: train one with `train --time-scale 1 --out DIR`")
    ds = _training_data(data, data_dir, resolution=resolution)
    _check_points_scale(ds)
    eval_n = eval_n or (2000 if ds.kind == "toy" else 256)
    if tuple(ds.shape) != tuple(tm.sample_shape):
        raise ValueError(f"the teacher {teacher} models samples of shape {tm.sample_shape}, but {data} has "
                         f"{ds.shape}: train a teacher on this data")
    student_params, scfg = ttfm.student_from_teacher(P.to_numpy(tm.params), tm.cfg)
    run_config = dict(task="student", data=data, teacher=teacher, loss=loss.to_dict(),
                      inputs=inputs.input_hashes(data, data_dir, teacher))    # content, not just paths
    config = json.loads(json.dumps(dict(run_config, model=scfg.to_dict(),
                                        train=dict(vars(tcfg)))))
    reused = False
    if out is None:
        out, mode = _choose_run_dir(_default_run_dir(data, loss.loss, quick), config, tcfg)
        if mode == "reuse":
            log(f"reusing the finished run in {out} (same settings; pass --out DIR to train a new one)")
            reused = True
        elif mode == "resume":
            log(f"continuing the unfinished run in {out}")
            resume = True
        elif out != _default_run_dir(data, loss.loss, quick):
            log(f"{_default_run_dir(data, loss.loss, quick)} holds a run with other settings: writing to {out}")
    step = tcfg.steps
    if not reused:
        done = _check_inputs_unchanged(out, run_config["inputs"], resume)
        objective = DistillObjective(scfg, (tm.params, tm.cfg), loss, sample_kind=ds.kind, heldout=_heldout(ds))
        _check_resources(objective, student_params, ds, tcfg, done, max_cpu_hours, scfg.kind == "mlp")
        log(f"distill: {loss.loss} from {teacher} on {data}, {tcfg.steps} steps of batch {tcfg.batch_size}, "
            f"device {backend.device_name()}, out {out}")
        ahead = evaluate and _solve_teacher_ahead(tm.cfg)
        with _locked_run(out), blas.single_threaded_small_gemms(scfg.kind == "mlp"), \
                _teacher_solutions_ahead(ahead, teacher, eval_n, eval_seed, eval_steps, eval_n_ref, tcfg.dtype):
            _, _, step = train.train_loop(out, model_cfg=scfg, init_params=student_params, objective=objective,
                                          data_iter=_batches(ds, tcfg), tcfg=tcfg, resume=resume,
                                          run_config=run_config, progress=progress, max_cpu_hours=max_cpu_hours)
    result = RunResult(out=out, checkpoint=os.path.join(out, CHECKPOINT_NAME), step=step, teacher=teacher,
                       reused=reused)
    if evaluate:                                          # split over the ranks under mpiexec
        result.rows = evaluate_models(teacher, result.checkpoint, steps=eval_steps,
                                      n=eval_n, n_ref=eval_n_ref,
                                      out=os.path.join(out, "eval"), seed=eval_seed, data_dir=data_dir,
                                      dtype=tcfg.dtype)
    return result


def _solve_teacher_ahead(teacher_cfg) -> bool:
    """Compute the evaluation's teacher solutions in a second process while the student trains?

    For an MLP teacher on the CPU, in one process, with at least two CPUs to run on: the student
    then trains on one BLAS thread (blas.single_threaded_small_gemms) and leaves a core idle, where
    the teacher's 256-step reference solve (about a seventh of the main job) costs no wall time.
    Not for U-Nets (their training uses every core) nor under mpiexec (the ranks split the evaluation).
    """
    return (teacher_cfg.kind == "mlp" and not backend.is_cupy(backend.get_xp())
            and distributed.current().size == 1 and parallel.usable_cpus() >= 2)


def _precompute_in_child(*args):
    """The child's entry point: Ctrl-C is the parent's to handle (it stops the child), not a second traceback."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    backend.select_device("cpu")                       # _solve_teacher_ahead: only CPU runs get here
    evaluation.precompute_teacher_solutions(*args)


@contextlib.contextmanager
def _teacher_solutions_ahead(enabled: bool, teacher: str, n: int, seed: int, steps, n_ref: int, dtype: str):
    """While the block runs, a child process writes the teacher solutions that evaluate_models(teacher,
    n=n, seed=seed, steps=steps, n_ref=n_ref) reads from the teacher's reference cache
    (evaluate.precompute_teacher_solutions). The block's end waits for the child; if the child failed,
    a warning says so and the evaluation computes the solutions itself. An error in the block stops it."""
    if not enabled:
        yield
        return
    import multiprocessing
    cache_dir = os.path.join(os.path.dirname(os.path.abspath(teacher)), "reference_cache")
    # spawn, not fork: a fresh interpreter, whatever threads (OpenBLAS, workers) this process runs
    child = multiprocessing.get_context("spawn").Process(
        target=_precompute_in_child, name="ttfm-teacher-solutions", daemon=True,
        args=(teacher, n, seed, tuple(steps), n_ref, dtype, cache_dir))
    child.start()
    try:
        yield
    except BaseException:
        child.terminate()
        child.join()
        raise
    child.join()
    if child.exitcode != 0:
        warnings.warn(f"the teacher's evaluation solutions were not computed ahead (the background process "
                      f"ended with exit code {child.exitcode}); the evaluation computes them now")


# ----------------------------------------------------------------------------- evaluation and sampling

def evaluate_models(teacher: str, student: str | None = None, *, steps=(1, 2, 4, 8), n: int = 1024,
                    n_ref: int = 256, out: str = "runs/eval", seed: int = 0, data_dir: str | None = None,
                    dtype: str = "float32", comm=None) -> list:
    """Flow-map error table of N-step sampling against the teacher's reference; writes eval.json + PNGs.

    comm: the data-parallel communicator (default distributed.current()); rank 0 writes the outputs.
    """
    steps = check_step_counts(steps)
    tm = sampling.load_model(teacher, weights="ema", dtype=dtype, role="teacher")
    sm = sampling.load_model(student, weights="ema", dtype=dtype, role="student") if student else None
    if sm is not None:
        if sm.sample_shape != tm.sample_shape:
            raise ValueError(f"the student's samples have shape {sm.sample_shape}, the teacher's "
                             f"{tm.sample_shape}: they were not trained on the same data")
        if sm.data and tm.data and sm.data != tm.data:
            raise ValueError(f"the student was distilled on {sm.data}, the teacher trained on {tm.data}")
        _warn_if_not_its_teacher(sm, tm)
    heldout = _heldout_points(tm.data, data_dir, n)
    # data parallel: every rank draws the same noise (host, from the seed) and generates its rows [lo, hi);
    # the samples are gathered on every rank in rank order, so the table equals one process's
    comm = comm or distributed.current()
    lo, hi = distributed.shard_range(n, comm.rank, comm.size)
    z = tm.noise(n, seed)[lo:hi]
    with blas.single_threaded_small_gemms(tm.cfg.kind == "mlp"):
        local = evaluation.generate_samples(tm, sm, z, steps, n_ref=n_ref,
                                            cache_dir=os.path.join(os.path.dirname(tm.path), "reference_cache"))
    for name, x in local.items():
        sampling.check_finite(x, f"{'the student' if name.startswith('student') else 'the teacher'} ({name})")
    parts = comm.allgather_object({k: backend.to_numpy(v) for k, v in local.items()})
    samples = {k: np.concatenate([part[k] for part in parts]) for k in local}
    rows = evaluation.table_rows(samples, n_ref, heldout)
    if not comm.is_root:
        return rows
    print(evaluation.format_table(rows), flush=True)
    shown = {k: v for k, v in samples.items() if not k.startswith("heun_")}   # pictures: reference, student, Euler
    paths = evaluation.write_outputs(out, rows, shown, image_data=heldout is None, heldout=heldout,
                                     extra=dict(teacher=teacher, student=student, n=n, n_ref=n_ref, seed=seed))
    log(f"wrote {os.path.join(out, 'eval.json')} and {', '.join(paths)}")
    return rows


def _warn_if_not_its_teacher(sm, tm):
    """A student's checkpoint records its teacher (path and sha256): warn when `tm` is another one."""
    recorded = sm.config.get("teacher")
    recorded_hash = (sm.config.get("inputs") or {}).get("teacher")
    if recorded_hash is not None:
        given_hash = inputs.sha256_file(tm.path)
        if given_hash != recorded_hash:
            warnings.warn(f"the student {sm.path} was distilled from the teacher {recorded} (sha256 "
                          f"{recorded_hash[:12]}), but the teacher given, {tm.path}, has other contents (sha256 "
                          f"{given_hash[:12]}): the table measures the student against another teacher's solutions")
    elif recorded and os.path.abspath(recorded) != os.path.abspath(tm.path):
        warnings.warn(f"the student {sm.path} was distilled from the teacher {recorded}, not from {tm.path}: "
                      "the table measures it against another teacher's solutions (unless that file is a copy)")


def check_step_counts(steps) -> list:
    steps = [int(s) for s in steps]
    if not steps or min(steps) < 1:
        raise ValueError(f"step counts must be integers >= 1, got {steps}")
    if max(steps) > 100_000:
        raise ValueError(f"step counts above 100000 are not sensible for few-step sampling, got {max(steps)}")
    return steps


def _generate_split(m, n: int, steps: int, solver: str, seed: int, comm, batch_size: int = 256):
    """n samples (NumPy), the rows of every noise batch split over the ranks and gathered in order.

    Batch b's noise comes from (seed, b) on every rank (host draws), and each rank generates
    its rows [lo, hi) of it: the result equals one process's, whatever the number of ranks.
    """
    mine = []
    for b, start in enumerate(range(0, n, batch_size)):
        z = m.noise(min(batch_size, n - start), seed, b)
        lo, hi = comm.rank * len(z) // comm.size, (comm.rank + 1) * len(z) // comm.size
        x = m.generate(z[lo:hi], steps, solver) if hi > lo else None
        mine.append(None if x is None else sampling.check_finite(backend.to_numpy(x), m.path))
    per_rank = comm.allgather_object(mine)
    return np.concatenate([part[b] for b in range(len(mine)) for part in per_rank if part[b] is not None])


def sample(ckpt_path: str, *, out: str, steps: int = 8, solver: str = "euler", n: int = 64, seed: int = 0,
           weights: str = "ema", comm=None) -> dict:
    """Draw n samples and write a PNG (image grid, or a scatter plot + sliced-W2 for 2-D data).

    Under mpiexec every rank generates its rows of each noise batch; rank 0 writes the PNG.
    """
    if os.path.splitext(out)[1].lower() != ".png":
        raise ValueError(f"--out {out!r} must be a .png file name (e.g. samples.png)")
    comm = comm or distributed.current()
    m = sampling.load_model(ckpt_path, weights)
    with blas.single_threaded_small_gemms(m.cfg.kind == "mlp"):
        x = _generate_split(m, n, steps, solver, seed, comm)
    kind = "student" if m.is_student else f"teacher/{solver}"
    info = dict(path=out, kind=kind, n=n, steps=steps, samples=x)
    if not comm.is_root:
        return info
    if x.ndim == 2:
        heldout = _heldout_points(m.data, None, n)
        images.save_scatter(x, out, reference=heldout, title=f"{kind}, {steps} steps")
        if heldout is not None:
            info["sliced_w2"] = metrics.sliced_w2(x, heldout)
            info["heldout"] = m.data
    else:
        images.save_image_grid(x, out, upscale=2)
    return info


# ----------------------------------------------------------------------------- FID

def fid_stats(data: str, *, split: str = "train", n: int | None = None, batch_size: int = 100,
              out: str | None = None, resolution: int | None = None, data_dir: str | None = None) -> tuple:
    """Inception statistics (mu, sigma) of a dataset or a folder of PNGs; returns (path, count)."""
    from . import fid, inception
    net = inception.load_inception()
    if os.path.isdir(data):                                  # a folder of PNGs, read batch by batch
        files = fid.png_files(data)[:n]
        mine = distributed.my_batches(len(files), batch_size)       # this rank's batches (all: one process)
        total = len(files)
        batches = fid.iter_png_batches(files[mine.start * batch_size:mine.stop * batch_size], batch_size)
        name = "folder-" + os.path.basename(os.path.normpath(data))
    else:
        imgs = _load_data(data, data_dir, split, resolution=image_resolution(data, resolution), n=n).data
        mine = distributed.my_batches(len(imgs), batch_size)
        total, batches = len(imgs), (imgs[b * batch_size:(b + 1) * batch_size] for b in mine)
        name = data
    fid.warn_if_few(total)
    comm = distributed.current()
    stats = fid.stats_of_images(net, batches, f"inception features ({total} images)" if comm.is_root else None,
                                len(mine))
    stats = fid.merge_feature_stats(comm, stats)                   # float64 sums over the ranks
    out = out or fid.default_stats_path(name, split)
    if comm.is_root:
        fid.save_stats(out, stats.mu, stats.sigma, stats.n, f"{data}:{split}")
    comm.barrier()                                                  # the file exists for every rank now
    return out, stats.n


def fid_score(*, ckpt_path: str | None = None, folder: str | None = None, steps: int = 1, solver: str = "euler",
              n: int = 50000, batch_size: int = 100, ref: str | None = None, seed: int = 0) -> dict:
    """FID of a checkpoint's samples (or of a PNG folder) against reference statistics."""
    from . import fid, inception
    if (ckpt_path is None) == (folder is None):
        raise ValueError("give exactly one of --ckpt and --folder")
    m = sampling.load_model(ckpt_path) if ckpt_path else None
    if ref is None:
        if m is None:
            raise ValueError("--ref is required with --folder")
        ref = fid.default_stats_path(m.data, "train")
        if not os.path.exists(ref):
            raise FileNotFoundError(f"no reference statistics {ref}: run `python cli.py fid-stats --data {m.data}` first")
    net = inception.load_inception()
    if os.path.isdir(ref):                                   # a PNG folder as the reference side
        files = fid.png_files(ref)
        rs = fid.stats_of_images(net, fid.iter_png_batches(files, batch_size),
                                 f"reference features ({len(files)} images)", -(-len(files) // batch_size))
        mu_r, sigma_r = rs.mu, rs.sigma
    else:
        mu_r, sigma_r, _ = fid.load_stats(ref)
    if folder:
        files = fid.png_files(folder)
        mine = distributed.my_batches(len(files), batch_size)       # this rank's batches (all: one process)
        batches, total = fid.iter_png_batches(files[mine.start * batch_size:mine.stop * batch_size],
                                              batch_size), len(files)
    else:
        total = n
        mine = distributed.my_batches(n, batch_size)                # batch b's noise comes from (seed, b)
        batches = (m.sample(min(batch_size, n - b * batch_size), steps, solver, seed, batch_size=batch_size,
                            first_batch=b) for b in mine)
    fid.warn_if_few(total)
    comm = distributed.current()
    stats = fid.stats_of_images(net, batches, f"FID features ({total} images)" if comm.is_root else None,
                                len(mine))
    stats = fid.merge_feature_stats(comm, stats)                   # float64 sums over the ranks
    score = fid.frechet_distance(stats.mu, stats.sigma, mu_r, sigma_r)
    return dict(fid=score, n=total, ref=ref, source=folder or f"{ckpt_path}, {steps} steps")


# ----------------------------------------------------------------------------- small tools

def plot_metrics(run_or_file: str, *, out: str, key: str = "loss", smooth: int = 10, log_y: bool = True) -> str:
    """A PNG of one metric of a run's metrics.jsonl against the step."""
    if os.path.splitext(out)[1].lower() != ".png":
        raise ValueError(f"--out {out!r} must be a .png file name")
    path = os.path.join(run_or_file, train.METRICS_NAME) if os.path.isdir(run_or_file) else run_or_file
    rows = [r for r in jsonio.read_jsonl(path) if key in r and "step" in r]
    if len(rows) < 2:
        raise ValueError(f"{path} has fewer than 2 lines with {key!r}")
    img = images.line_plot([r["step"] for r in rows], [r[key] for r in rows], f"{key} vs step ({path})",
                           log_y=log_y, smooth=smooth)
    images.save_image(img, out)
    return out


def parameter_table(model_name: str, channels: int = 3, resolution: int | None = None,
                    two_time: bool = False) -> tuple:
    """([(block, count), ...], total, sample_shape) of a preset."""
    if model_name.startswith("mlp"):
        shape = (2,)
    else:
        res = resolution or (64 if model_name == "celebahq64" else 32)
        shape = (channels, res, res)
    cfg = model.make_config(model_name, shape, two_time=two_time)
    p = model.init_model(cfg)
    groups = {}
    for k, v in p.items():
        parts = k.split(".")
        top = parts[0] + ("." + parts[1] if parts[0] in ("enc", "dec") else "")
        groups[top] = groups.get(top, 0) + int(v.size)
    return list(groups.items()), P.count(p), shape


__all__ = ["RunResult", "checkpoint_path", "train_config", "train_teacher", "ensure_teacher", "distill",
           "evaluate_models", "sample", "fid_stats", "fid_score", "plot_metrics", "parameter_table",
           "format_table", "check_step_counts"]
