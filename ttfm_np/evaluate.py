"""Few-step evaluation (docs/method.md section 9): flow-map error against the teacher's
reference ODE solution, and distribution distances for 2-D data.

For a fixed noise batch z:
    x_ref   = teacher's reference solution from z (Heun, n_ref steps)
    x_N     = student's N-step sample from z                (N network evaluations)
    teacher = teacher's own Euler with N steps and Heun with N/2 steps (same N evaluations)
    report  MSE(x, x_ref) and PSNR (data range 2 for images in [-1, 1]),
            and for 2-D data sliced-W2 and the 2-D histogram total variation
            (metrics.hist2d_tv) of each sample set to held-out data.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np

from . import atomic, backend, blas, flow, jsonio, metrics, sampling
from .images import save_image_grid, save_panels, scatter_image


def _row(method, nfe, x, x_ref, heldout):
    r = dict(method=method, nfe=nfe, mse=metrics.mse(x, x_ref), psnr=metrics.psnr(x, x_ref))
    if heldout is not None:
        r["sw2"] = metrics.sliced_w2(backend.to_numpy(x), heldout)
        # sees blurred or filled-in shapes that sliced-W2 rates at its floor; defined for d = 2 only (None: n/a)
        r["hist_tv"] = metrics.hist2d_tv(backend.to_numpy(x), heldout) if heldout.shape[1] == 2 else None
    return r


def teacher_solution(teacher, z, n_steps: int, solver: str = "heun", cache_dir: str | None = None):
    """The teacher's ODE solution from noise z with n_steps of `solver` (euler | heun).

    Every student of a teacher is compared with the same teacher solutions (the
    reference, Euler N, Heun N/2), and the reference is the costly part of an
    evaluation (2 n_ref teacher passes per sample), so with cache_dir they are
    kept on disk. The key covers everything the solution depends on: the
    checkpoint file (size and modification time), the solver, n_steps, the dtype
    and the bytes of z; any change recomputes. A cache that cannot be written
    costs a warning, never the evaluation.
    """
    if cache_dir is None:
        return teacher.generate(z, n_steps, solver)
    xp = backend.array_module(z)
    z_host = np.ascontiguousarray(backend.to_numpy(z))
    st = os.stat(teacher.path)
    key = hashlib.sha1(json.dumps([os.path.abspath(teacher.path), st.st_size, st.st_mtime_ns, n_steps,
                                   str(z_host.dtype), z_host.shape]).encode())
    key.update(z_host.tobytes())
    path = os.path.join(cache_dir, f"{solver}{n_steps}-{key.hexdigest()[:20]}.npy")
    if os.path.exists(path):
        x = np.load(path)
        if x.shape == z_host.shape:
            return xp.asarray(x)
    x = teacher.generate(z, n_steps, solver)
    try:
        with atomic.write(path, "wb") as f:                    # atomic: never a half-written cache
            np.save(f, backend.to_numpy(x))
    except OSError as exc:
        warnings.warn(f"could not cache the teacher's {solver} {n_steps}-step solution in {cache_dir} ({exc}); "
                      "it will be recomputed")
    return x


def reference_solution(teacher, z, n_ref: int, cache_dir: str | None = None):
    """x_ref = the teacher's Heun solution with n_ref steps from noise z (cached: teacher_solution)."""
    return teacher_solution(teacher, z, n_ref, "heun", cache_dir)


def teacher_solutions_needed(steps, n_ref: int) -> list:
    """[(solver, n_steps)] of every teacher solution generate_samples computes: the reference
    (Heun n_ref), Euler N and, for even N, Heun N/2 (tests/test_evaluate.py checks the two agree)."""
    plan = [("heun", n_ref)]
    for n in steps:
        plan.append(("euler", n))
        if n % 2 == 0:
            plan.append(("heun", n // 2))
    return plan


def precompute_teacher_solutions(teacher_path: str, n: int, seed: int, steps, n_ref: int, dtype: str,
                                 cache_dir: str) -> None:
    """Fill cache_dir with the teacher's solutions an evaluation of (n, seed, steps, n_ref) will read.

    Run by pipeline.distill in a child process on the CPU while the student trains (the teacher is
    fixed by then): on a 2-core machine the reference solve then costs no wall time after training.
    Same noise (sampling.LoadedModel.noise), same cache keys as evaluate_models: a cache hit there.
    The model is loaded on the current device (the child process selects the CPU first).
    """
    tm = sampling.load_model(teacher_path, weights="ema", dtype=dtype, role="teacher")
    z = tm.noise(n, seed)
    with blas.single_threaded_small_gemms(tm.cfg.kind == "mlp"):
        for solver, n_steps in teacher_solutions_needed(steps, n_ref):
            teacher_solution(tm, z, n_steps, solver, cache_dir)


def generate_samples(teacher, student, z, steps=(1, 2, 4, 8), n_ref: int = 256, cache_dir: str | None = None):
    """Every sample set the table compares, from noise z: {name: (N, ...) array}, in table order.

    "reference" (teacher Heun n_ref), "student_N" (N-step student), "euler_N" (teacher Euler N),
    "heun_N/2" for even N (teacher Heun with N/2 steps: the same N network evaluations).
    Each sample depends only on its own noise row, so z may be any slice of the noise (data parallel).
    """
    samples = {"reference": reference_solution(teacher, z, n_ref, cache_dir)}
    for n in steps:
        if student is not None:
            samples[f"student_{n}"] = student.generate(z, n)
        samples[f"euler_{n}"] = teacher_solution(teacher, z, n, "euler", cache_dir)
        if n % 2 == 0:
            samples[f"heun_{n // 2}"] = teacher_solution(teacher, z, n // 2, "heun", cache_dir)
    return samples


def table_rows(samples: dict, n_ref: int, heldout=None) -> list:
    """The rows of the evaluation table from generate_samples' output (MSE/PSNR against the reference)."""
    x_ref = samples["reference"]
    rows = []
    if heldout is not None:
        rows.append(_row(f"teacher heun {n_ref} (reference)", flow.nfe("heun", n_ref), x_ref, x_ref, heldout))
    for name, x in samples.items():
        kind, _, n = name.partition("_")
        if kind == "student":
            rows.append(_row(f"student {n}-step", int(n), x, x_ref, heldout))
        elif kind == "euler":
            rows.append(_row(f"teacher euler {n}", flow.nfe("euler", int(n)), x, x_ref, heldout))
        elif kind == "heun":
            rows.append(_row(f"teacher heun {n}", flow.nfe("heun", int(n)), x, x_ref, heldout))
    return rows


def flow_map_table(teacher, student, z, steps=(1, 2, 4, 8), n_ref: int = 256, heldout=None,
                   cache_dir: str | None = None):
    """Rows of the evaluation table and the samples behind them (one process).

    teacher, student: sampling.LoadedModel (student may be None: teacher baselines only).
    heldout: NumPy held-out data (2-D) for sliced-W2, or None.
    cache_dir: where the teacher's solutions are cached (see teacher_solution), or None.
    """
    samples = generate_samples(teacher, student, z, steps, n_ref, cache_dir)
    return table_rows(samples, n_ref, heldout), samples


def format_table(rows) -> str:
    has_sw2 = any("sw2" in r for r in rows)
    has_tv = any("hist_tv" in r for r in rows)
    head = (f"{'method':32s} {'NFE':>5s} {'MSE':>11s} {'PSNR dB':>8s}" + (f" {'SW2':>9s}" if has_sw2 else "")
            + (f" {'hist TV':>8s}" if has_tv else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['method']:32s} {r['nfe']:5d} {r['mse']:11.3e} {r['psnr']:8.2f}"
        if has_sw2:
            line += f" {r['sw2']:9.4f}"
        if has_tv:
            line += f" {r['hist_tv']:8.4f}" if r.get("hist_tv") is not None else f" {'n/a':>8s}"
        lines.append(line)
    return "\n".join(lines)


def write_outputs(out_dir: str, rows, samples, image_data: bool, heldout=None, extra: dict | None = None):
    """PNGs of the samples (grids or scatter panels), then eval.json (rows + extra).

    Every file is written atomically (atomic.py); eval.json comes last, so a failed write
    leaves the previous eval.json beside whichever PNGs were already replaced.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    if image_data:
        for name, x in samples.items():
            p = os.path.join(out_dir, f"samples_{name}.png")
            save_image_grid(x[:64], p, upscale=2)
            paths.append(p)
    else:
        panels = [scatter_image(x, reference=heldout, size=320, title=name) for name, x in samples.items()]
        p = os.path.join(out_dir, "samples.png")
        save_panels(panels, p)
        paths.append(p)
    with atomic.write(os.path.join(out_dir, "eval.json"), "w") as f:     # all or nothing (atomic.py)
        # strict JSON: an infinite PSNR becomes null, listed under "non_finite_as_null" (see jsonio)
        jsonio.dump_json(dict(rows=rows, **(extra or {})), f, indent=2,
                         note="psnr is +inf where the samples equal the reference exactly")
    return paths
