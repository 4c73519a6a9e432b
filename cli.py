#!/usr/bin/env python
"""ttfm_np command line: train a flow-matching teacher, distill it into a
two-timed flow model, sample, evaluate, compute FID.

    python cli.py --help
    python cli.py COMMAND --help
"""
from __future__ import annotations

import os

import click

from ttfm_np import backend

DEVICE_OPTION = click.option("--device", type=click.Choice(backend.DEVICE_CHOICES), default=None,
                             help="cpu, gpu or auto (default: $TTFM_DEVICE, else auto)")


def use_device(device):
    """Select numpy/cupy; a GPU request without a GPU is a clear error."""
    try:
        return backend.select_device(device)
    except backend.BackendError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
def cli():
    """Flow matching and TTFM/ITVM distillation in hand-written NumPy/CuPy."""


@cli.command("params")
@click.option("--model", "model_name", type=click.Choice(["tiny", "small", "cifar10", "celebahq64", "mlp", "mlp-tiny"]),
              default="cifar10", help="network preset")
@click.option("--channels", type=click.IntRange(1, 16), default=3, help="image channels")
@click.option("--resolution", type=click.IntRange(4, 1024), default=None,
              help="image size (default 32; 64 for celebahq64)")
@click.option("--two-time/--one-time", default=False, help="student (s, t) or teacher (t)")
def params_cmd(model_name, channels, resolution, two_time):
    """Print the parameter count of a preset, per top-level block."""
    from ttfm_np import model, params
    if model_name.startswith("mlp"):
        shape = (2,)
    else:
        res = resolution or (64 if model_name == "celebahq64" else 32)
        shape = (channels, res, res)
    try:
        cfg = model.make_config(model_name, shape, two_time=two_time)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    p = model.init_model(cfg)
    groups = {}
    for k, v in p.items():
        top = k.split(".")[0] + ("." + k.split(".")[1] if k.split(".")[0] in ("enc", "dec") else "")
        groups[top] = groups.get(top, 0) + int(v.size)
    for k, n in groups.items():
        click.echo(f"{k:28s} {n:>12,d}")
    click.echo(f"{'total':28s} {params.count(p):>12,d}   ({model_name}, input {shape})")


# ----------------------------------------------------------------------------- shared helpers

MODEL_CHOICES = ["mlp", "mlp-tiny", "tiny", "small", "cifar10", "celebahq64"]


def _fail(exc):
    raise click.ClickException(str(exc)) from exc


def _load_data(data, data_dir, split="train", resolution=None, n=None):
    from ttfm_np import data as D
    try:
        return D.load_dataset(data, split=split, data_dir=data_dir, resolution=resolution, n=n)
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)


def _parse_steps(text):
    try:
        steps = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,2,4,8, got {text!r}")
    if not steps or min(steps) < 1:
        raise click.BadParameter(f"step counts must be integers >= 1, got {text!r}")
    return steps


def _train_config(recipe, **given):
    """TrainConfig from a recipe, with every option the user gave taking precedence."""
    from ttfm_np.train import TrainConfig
    kw = {k: v for k, v in recipe.items() if k in TrainConfig.__dataclass_fields__}
    kw.update({k: v for k, v in given.items() if v is not None})
    try:
        return TrainConfig(**kw).validate()
    except ValueError as exc:
        _fail(exc)


TRAIN_OPTIONS = [
    click.option("--steps", type=click.IntRange(1), default=None, help="optimizer steps (default: the dataset's recipe)"),
    click.option("--batch-size", type=click.IntRange(1), default=None, help="batch size (default: recipe)"),
    click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="learning rate (default: recipe)"),
    click.option("--warmup", type=click.IntRange(0), default=None, help="learning-rate warmup steps"),
    click.option("--grad-clip", type=click.FloatRange(0), default=None, help="gradient-norm clip, 0 = off (default 1)"),
    click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=None, help="EMA decay mu"),
    click.option("--seed", type=int, default=0, help="seed for init, data order, noise, times, dropout"),
    click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32"),
    click.option("--log-every", type=click.IntRange(1), default=None, help="steps between metrics lines"),
    click.option("--ckpt-every", type=click.IntRange(0), default=None, help="steps between checkpoints"),
    click.option("--sample-every", type=click.IntRange(0), default=None, help="steps between sample PNGs (0: end only)"),
    click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoint"),
    click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="where datasets are looked for first"),
    DEVICE_OPTION,
]


def train_options(f):
    for opt in reversed(TRAIN_OPTIONS):
        f = opt(f)
    return f


def _run_teacher_training(data, model_name, out, tcfg, time_sampling, flip, resume, data_dir, resolution=None):
    from ttfm_np import model, train
    from ttfm_np import data as D
    from ttfm_np.objectives import FlowMatchingObjective
    ds = _load_data(data, data_dir, resolution=resolution)
    try:
        cfg = model.make_config(model_name, ds.shape)
    except ValueError as exc:
        _fail(exc)
    it = D.BatchIterator(ds.data, tcfg.batch_size, seed=tcfg.seed, flip=flip)
    objective = FlowMatchingObjective(cfg, time_sampling=time_sampling, sample_kind=ds.kind,
                                      heldout=ds.data[:1000] if ds.kind == "toy" else None)
    click.echo(f"teacher: {model_name} on {data} ({len(ds.data)} samples of shape {ds.shape}), "
               f"{tcfg.steps} steps of batch {tcfg.batch_size}, device {backend.device_name()}, out {out}")
    try:
        return train.train_loop(out, model_cfg=cfg, init_params=model.init_model(cfg, tcfg.seed),
                                objective=objective, data_iter=it, tcfg=tcfg, resume=resume,
                                run_config=dict(task="teacher", data=data, time_sampling=time_sampling,
                                                resolution=ds.shape[-1] if ds.kind == "image" else None))
    except (train.TrainingDiverged, FileExistsError, ValueError) as exc:
        _fail(exc)


# ----------------------------------------------------------------------------- train

@cli.command()
@click.option("--data", required=True, help="toy:checkerboard|moons|8gaussians|spirals, fashion-mnist, cifar10, imagefolder:PATH")
@click.option("--model", "model_name", type=click.Choice(MODEL_CHOICES), default=None,
              help="network (default: mlp for toys, small for fashion-mnist, cifar10 for cifar10)")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="run folder (default: data/teachers/<data>-<model>, where distill looks)")
@click.option("--time-sampling", type=click.Choice(["uniform", "logit_normal"]), default="uniform",
              help="distribution of t in the flow-matching loss")
@click.option("--flip/--no-flip", default=False, help="random horizontal flips of images")
@click.option("--resolution", type=click.IntRange(4, 1024), default=None, help="image size for imagefolder data (default 64)")
@train_options
def train(data, model_name, out, time_sampling, flip, resolution, resume, data_dir, device, **kw):
    """Train a flow-matching teacher v(x, t)."""
    from ttfm_np import recipes
    use_device(device)
    try:
        recipe = dict(recipes.TEACHER_RECIPES[recipes.family(data)])
    except ValueError as exc:
        _fail(exc)
    model_name = model_name or recipe.pop("model")
    recipe.pop("model", None)
    tcfg = _train_config(recipe, **kw)
    out = out or recipes.default_teacher_dir(data, model_name)
    _run_teacher_training(data, model_name, out, tcfg, time_sampling, flip, resume, data_dir, resolution)
    click.echo(f"checkpoint: {os.path.join(out, 'checkpoint.h5')}")


# ----------------------------------------------------------------------------- sample

@cli.command()
@click.option("--ckpt", required=True, type=click.Path(), help="checkpoint.h5 (teacher or student) or its run folder")
@click.option("--steps", type=click.IntRange(1), default=8, help="sampling steps (network evaluations for a student)")
@click.option("--solver", type=click.Choice(["euler", "heun", "rk4"]), default="euler", help="ODE solver (teachers)")
@click.option("--n", type=click.IntRange(1), default=64, help="number of samples")
@click.option("--seed", type=int, default=0, help="noise seed")
@click.option("--weights", type=click.Choice(["ema", "params"]), default="ema", help="EMA or raw weights")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG file to write")
@DEVICE_OPTION
def sample(ckpt, steps, solver, n, seed, weights, out, device):
    """Draw samples and write a PNG (image grid, or a scatter plot for 2-D data)."""
    from ttfm_np import images, sampling
    use_device(device)
    try:
        sampler = sampling.load_sampler(ckpt, steps, solver, weights)
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)
    x = sampler(n, seed)
    kind = "student" if sampler.model.is_student else f"teacher/{solver}"
    data = sampler.model.config.get("data", "")
    if x.ndim == 2:
        heldout = _load_data(data, None, split="test", n=n).data if data.startswith("toy:") else None
        images.save_scatter(x, out, reference=heldout, title=f"{kind}, {steps} steps")
        if heldout is not None:
            from ttfm_np import metrics
            click.echo(f"sliced-W2 to {n} held-out {data} points: {metrics.sliced_w2(x, heldout):.4f}")
    else:
        images.save_image_grid(x, out, upscale=2)
    click.echo(f"wrote {out}: {n} samples, {steps} steps ({kind})")


# ----------------------------------------------------------------------------- distill

@cli.command()
@click.option("--data", default="toy:checkerboard", help="dataset (see train); the default runs offline in minutes")
@click.option("--teacher", type=click.Path(), default=None,
              help="teacher checkpoint (default: data/teachers/<data>-<model>; trained first if missing)")
@click.option("--model", "model_name", type=click.Choice(MODEL_CHOICES), default=None,
              help="teacher preset used to find or train the default teacher (default: the dataset's recipe)")
@click.option("--loss", type=click.Choice(["itvm", "lfmd", "ecd"]), default="itvm", help="distillation loss")
@click.option("--lambda-init", type=click.FloatRange(0), default=1.0, help="ITVM initial-velocity weight")
@click.option("--lambda-term", type=click.FloatRange(0), default=1.0, help="ITVM terminal-velocity weight")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True), default=1 / 64, help="teacher step Delta (ITVM, ECD)")
@click.option("--delta-mode", type=click.Choice(["absolute", "relative"]), default="absolute",
              help="Delta absolute, or relative: Delta = kappa (t - s)")
@click.option("--kappa", type=click.FloatRange(0, 1, min_open=True), default=0.25, help="relative Delta fraction")
@click.option("--target-solver", type=click.Choice(["euler", "heun"]), default="euler", help="teacher step in the ITVM target")
@click.option("--ema-target/--no-ema-target", default=True, help="targets from the EMA student (ITVM, ECD)")
@click.option("--fd-step", type=click.FloatRange(0, 0.5, min_open=True, max_open=True), default=1e-3,
              help="LFMD finite-difference step in t")
@click.option("--lfmd-teacher-grad/--no-lfmd-teacher-grad", default=True,
              help="LFMD: back-propagate through the teacher's input")
@click.option("--frac-t1", type=click.FloatRange(0, 1), default=0.0, help="fraction of time pairs with t = 1")
@click.option("--max-gap", type=click.FloatRange(0, 1, min_open=True), default=None, help="restrict t - s")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="run folder (default runs/distill-<data>-<loss>)")
@click.option("--eval-steps", default="1,2,4,8", help="step counts for the final evaluation")
@click.option("--eval-n", type=click.IntRange(2), default=None, help="noise samples in the final evaluation")
@click.option("--eval-n-ref", type=click.IntRange(2), default=256, help="Heun steps of the evaluation's reference")
@train_options
def distill(data, teacher, model_name, loss, lambda_init, lambda_term, delta, delta_mode, kappa, target_solver,
            ema_target, fd_step, lfmd_teacher_grad, frac_t1, max_gap, out, eval_steps, eval_n, eval_n_ref, resume,
            data_dir, device, **kw):
    """Distill a teacher into a two-timed flow model, then evaluate it.

    With no arguments: toy:checkerboard, training the teacher first if there is none.
    """
    from ttfm_np import data as D
    from ttfm_np import losses, recipes, sampling, train, ttfm
    from ttfm_np import params as P
    from ttfm_np.objectives import DistillObjective
    use_device(device)
    steps_list = _parse_steps(eval_steps)
    try:
        fam = recipes.family(data)
    except ValueError as exc:
        _fail(exc)
    if teacher is None:
        teacher_recipe = dict(recipes.TEACHER_RECIPES[fam])
        tmodel = model_name or teacher_recipe.pop("model")
        teacher_recipe.pop("model", None)
        tdir = recipes.default_teacher_dir(data, tmodel)
        teacher = os.path.join(tdir, "checkpoint.h5")
        tcfg_t = _train_config(teacher_recipe, seed=kw["seed"], dtype=kw["dtype"])
        done = False
        if os.path.exists(teacher):
            from ttfm_np import ckpt
            done = int(ckpt.load_checkpoint(teacher)["step"]) >= tcfg_t.steps
        if not done:
            click.echo(f"no trained teacher at {teacher}: training one with the {fam} recipe "
                       f"({tmodel}, {tcfg_t.steps} steps) first")
            _run_teacher_training(data, tmodel, tdir, tcfg_t, "uniform", False, True, data_dir)
    try:
        tm = sampling.load_model(teacher, weights="ema", dtype=kw["dtype"])
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)
    if tm.is_student:
        _fail(ValueError(f"{teacher} is a two-timed student; --teacher needs a flow-matching teacher checkpoint"))
    teacher_data = tm.config.get("data")
    if teacher_data and teacher_data != data:
        _fail(ValueError(f"the teacher was trained on {teacher_data}, not {data}: pass --data {teacher_data}"))
    tcfg = _train_config(recipes.DISTILL_RECIPES[fam], **kw)
    opts = losses.DistillLossConfig(loss=loss, lambda_init=lambda_init, lambda_term=lambda_term, delta=delta,
                                    delta_mode=delta_mode, kappa=kappa, target_solver=target_solver,
                                    ema_target=ema_target, fd_step=fd_step, lfmd_teacher_grad=lfmd_teacher_grad)
    try:
        opts.validate()
    except ValueError as exc:
        _fail(exc)
    ds = _load_data(data, data_dir, resolution=tm.config.get("resolution") if data.startswith("imagefolder:") else None)
    student_params, scfg = ttfm.student_from_teacher(P.to_numpy(tm.params), tm.cfg)
    heldout = ds.data[:1000] if ds.kind == "toy" else None
    objective = DistillObjective(scfg, (tm.params, tm.cfg), opts, frac_t1=frac_t1, max_gap=max_gap,
                                 sample_kind=ds.kind, heldout=heldout)
    out = out or os.path.join("runs", f"distill-{recipes.slug(data)}-{loss}")
    it = D.BatchIterator(ds.data, tcfg.batch_size, seed=tcfg.seed)
    click.echo(f"distill: {loss} from {teacher} on {data}, {tcfg.steps} steps of batch {tcfg.batch_size}, out {out}")
    try:
        train.train_loop(out, model_cfg=scfg, init_params=student_params, objective=objective, data_iter=it,
                         tcfg=tcfg, resume=resume,
                         run_config=dict(task="student", data=data, teacher=os.path.abspath(teacher),
                                         loss=opts.to_dict(), frac_t1=frac_t1, max_gap=max_gap))
    except (train.TrainingDiverged, FileExistsError, ValueError) as exc:
        _fail(exc)
    _evaluate(teacher, os.path.join(out, "checkpoint.h5"), steps_list,
              eval_n or (2000 if ds.kind == "toy" else 256), eval_n_ref, os.path.join(out, "eval"), 0, data_dir,
              kw["dtype"])


def _evaluate(teacher_path, student_path, steps, n, n_ref, out, seed, data_dir, dtype="float32"):
    from ttfm_np import evaluate, sampling
    try:
        tm = sampling.load_model(teacher_path, weights="ema", dtype=dtype)
        sm = sampling.load_model(student_path, weights="ema", dtype=dtype) if student_path else None
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)
    if sm is not None and sm.sample_shape != tm.sample_shape:
        _fail(ValueError(f"student samples have shape {sm.sample_shape}, the teacher's {tm.sample_shape}: "
                         "they were not trained on the same data"))
    heldout = None
    data = tm.config.get("data", "")
    if data.startswith("toy:"):
        heldout = _load_data(data, data_dir, split="test", n=n).data
    z = tm.noise(n, seed)
    rows, samples = evaluate.flow_map_table(tm, sm, z, steps, n_ref=n_ref, heldout=heldout,
                                            cache_dir=os.path.join(os.path.dirname(tm.path), "reference_cache"))
    click.echo(evaluate.format_table(rows))
    paths = evaluate.write_outputs(out, rows, samples, image_data=heldout is None, heldout=heldout,
                                   extra=dict(teacher=teacher_path, student=student_path, n=n, n_ref=n_ref, seed=seed))
    click.echo(f"wrote {os.path.join(out, 'eval.json')} and {', '.join(paths)}")
    return rows


# ----------------------------------------------------------------------------- eval

@cli.command("eval")
@click.option("--teacher", required=True, type=click.Path(), help="teacher checkpoint")
@click.option("--student", type=click.Path(), default=None, help="student checkpoint (omit: teacher baselines only)")
@click.option("--steps", "steps_text", default="1,2,4,8", help="comma-separated step counts")
@click.option("--n", type=click.IntRange(2), default=1024, help="noise samples")
@click.option("--n-ref", type=click.IntRange(2), default=256, help="Heun steps of the reference solution")
@click.option("--seed", type=int, default=0, help="noise seed")
@click.option("--out", type=click.Path(file_okay=False), default="runs/eval", help="folder for eval.json and PNGs")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@DEVICE_OPTION
def eval_cmd(teacher, student, steps_text, n, n_ref, seed, out, data_dir, device):
    """Flow-map error of N-step sampling against the teacher's reference solution."""
    use_device(device)
    _evaluate(teacher, student, _parse_steps(steps_text), n, n_ref, out, seed, data_dir)


# ----------------------------------------------------------------------------- FID

@cli.command("convert-inception")
@click.argument("pth", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="HDF5 file (default data/inception_fid.h5)")
def convert_inception(pth, out):
    """Convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth to HDF5 (no torch needed)."""
    from ttfm_np import inception
    if not os.path.exists(pth):
        _fail(FileNotFoundError(f"{pth} does not exist; it is published at {inception.WEIGHTS_URL}"))
    try:
        path = inception.convert_weights(pth, out)
    except (ValueError, OSError) as exc:
        _fail(exc)
    click.echo(f"wrote {path}")


def _feature_batches(images, batch_size):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


@cli.command("fid-stats")
@click.option("--data", required=True, help="dataset (fashion-mnist, cifar10, imagefolder:PATH) or a folder of PNGs")
@click.option("--split", type=click.Choice(["train", "test"]), default="train")
@click.option("--n", type=click.IntRange(2), default=None, help="use only the first n images")
@click.option("--batch-size", type=click.IntRange(1), default=100)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="default data/fid_stats/<data>-<split>.npz")
@click.option("--resolution", type=click.IntRange(4, 1024), default=None, help="image size for imagefolder data")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@DEVICE_OPTION
def fid_stats(data, split, n, batch_size, out, resolution, data_dir, device):
    """Inception statistics (mu, sigma) of a dataset, cached under data/fid_stats/."""
    from ttfm_np import fid, inception
    use_device(device)
    try:
        model = inception.load_inception()
        if os.path.isdir(data):                       # a folder of PNGs, read batch by batch
            files = fid.png_files(data)[:n]
            total, batches = len(files), fid.iter_png_batches(files, batch_size)
        else:
            images = _load_data(data, data_dir, split, resolution=resolution, n=n).data
            total, batches = len(images), _feature_batches(images, batch_size)
        fid.warn_if_few(total)
        stats = fid.stats_of_images(model, batches, f"inception features ({total} images)", -(-total // batch_size))
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)
    out = out or fid.default_stats_path(data if not os.path.isdir(data) else "folder-" + os.path.basename(os.path.normpath(data)), split)
    fid.save_stats(out, stats.mu, stats.sigma, stats.n, f"{data}:{split}")
    click.echo(f"wrote {out} ({stats.n} images)")


@cli.command("fid")
@click.option("--ckpt", type=click.Path(), default=None, help="checkpoint to sample from")
@click.option("--folder", type=click.Path(file_okay=False), default=None, help="or: a folder of PNGs to score")
@click.option("--steps", type=click.IntRange(1), default=1, help="sampling steps")
@click.option("--solver", type=click.Choice(["euler", "heun", "rk4"]), default="euler", help="ODE solver (teachers)")
@click.option("--n", type=click.IntRange(2), default=50000, help="samples to generate")
@click.option("--batch-size", type=click.IntRange(1), default=100)
@click.option("--ref", type=click.Path(), default=None,
              help="reference statistics .npz or a PNG folder (default: the checkpoint's dataset, train split)")
@click.option("--seed", type=int, default=0)
@DEVICE_OPTION
def fid_cmd(ckpt, folder, steps, solver, n, batch_size, ref, seed, device):
    """FID of a checkpoint's samples (or of a PNG folder) against reference statistics."""
    from ttfm_np import fid, inception, sampling
    use_device(device)
    if (ckpt is None) == (folder is None):
        raise click.UsageError("give exactly one of --ckpt and --folder")
    try:
        model = inception.load_inception()
        if ref is None:
            if ckpt is None:
                raise click.UsageError("--ref is required with --folder")
            data = sampling.load_model(ckpt).config.get("data", "")
            ref = fid.default_stats_path(data, "train")
            if not os.path.exists(ref):
                raise FileNotFoundError(f"no reference statistics {ref}: run `python cli.py fid-stats --data {data}` first")
        if os.path.isdir(ref):                        # a PNG folder as the reference side
            files = fid.png_files(ref)
            rs = fid.stats_of_images(model, fid.iter_png_batches(files, batch_size),
                                     f"reference features ({len(files)} images)", -(-len(files) // batch_size))
            mu_r, sigma_r = rs.mu, rs.sigma
        else:
            mu_r, sigma_r, _ = fid.load_stats(ref)
        if folder:
            files = fid.png_files(folder)
            batches, total = fid.iter_png_batches(files, batch_size), len(files)
        else:
            sampler = sampling.load_sampler(ckpt, steps, solver, batch_size=batch_size)
            total = n
            batches = (sampler(min(batch_size, n - i), seed * 1000003 + i) for i in range(0, n, batch_size))
        fid.warn_if_few(total)
        stats = fid.stats_of_images(model, batches, f"FID features ({total} images)", -(-total // batch_size))
        score = fid.frechet_distance(stats.mu, stats.sigma, mu_r, sigma_r)
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)
    click.echo(f"FID {score:.3f}  ({total} images, {'folder ' + folder if folder else f'{steps} steps'}, ref {ref})")


@cli.command("plot-metrics")
@click.argument("metrics", type=click.Path(exists=True))
@click.option("--key", default="loss", help="metric to plot")
@click.option("--smooth", type=click.IntRange(1), default=10, help="moving-average window (logged points)")
@click.option("--log-y/--linear-y", default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG to write")
def plot_metrics(metrics, key, smooth, log_y, out):
    """Plot a metric of a run's metrics.jsonl (or a run folder) against the step."""
    import json as _json
    from ttfm_np import images
    path = os.path.join(metrics, "metrics.jsonl") if os.path.isdir(metrics) else metrics
    rows = [_json.loads(l) for l in open(path) if l.strip()]
    rows = [r for r in rows if key in r]
    if len(rows) < 2:
        _fail(ValueError(f"{path} has fewer than 2 lines with {key!r}"))
    img = images.line_plot([r["step"] for r in rows], [r[key] for r in rows], f"{key} vs step ({path})",
                           log_y=log_y, smooth=smooth)
    images._save(img, out)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    cli()
