"""Step time and memory of every objective on a real GPU, against PyTorch eager (run by gpu_check.sh).

    python benchmarks/gpu_check.py --out runs/gpu_check            # writes gpu_check.json, appends the table

For the `small` and `cifar10` presets (3x32x32, batch 128 by default) and each
objective (teacher flow matching; ITVM, LFMD, ECD distillation; float32):

* ours: median seconds of one full step (loss_and_grads + clip + Adam + EMA) after
  warm-up, TFLOP/s from the analytic GEMM FLOPs, the fraction of the card's peak
  (dense fp32 and tf32 peaks from a table by device name, else not reported);
* PyTorch eager on the same GPU, same network (benchmarks/torch_reference.py), fp32
  and tf32: time of one forward without grad (t_f) and of one forward+backward
  (t_fb); a loss's torch-equivalent time is n_fb t_fb + n_f t_f with its pass counts
  (teacher 1+0, ITVM 2+4 with its default Heun target, LFMD 4+2 incl. the teacher backward,
  ECD 1+2) -
  torch has no implementation of these losses, so this is the cost of the same
  network passes, not a measured torch loss;
* the CuPy memory pool's peak (total_bytes after free_all_blocks before the run) per
  objective at the batch, beside the CuPy stand-in's figure for the same step
  (tests/test_gpu_memory.py's measure, computed here in a subprocess on the CPU).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import numpy as np  # noqa: E402

from ttfm_np import backend, losses, model, objectives, optim, ttfm  # noqa: E402
from ttfm_np import params as P  # noqa: E402

KINDS = ("teacher", "itvm", "lfmd", "ecd")
# (forward+backward passes, forward-only passes) of one step of each objective
PASSES = {"teacher": (1, 0), "itvm": (2, 4), "lfmd": (4, 2), "ecd": (1, 2)}   # ITVM: Heun target (the default)
# dense peak TFLOP/s (no sparsity): fp32, tf32
PEAKS = {"H100 SXM": (67.0, 495.0), "H100 PCIe": (51.0, 378.0), "H100 NVL": (60.0, 418.0),
         "H200": (67.0, 495.0), "A100": (19.5, 156.0)}


def _peak(name):
    for key, peak in PEAKS.items():
        if all(part in name for part in key.split()):
            return peak
    return None


def _sync(xp):
    if backend.is_cupy(xp):
        xp.cuda.Device().synchronize()


def time_ours(kind, preset, batch, warmup, iters, xp, shape=(3, 32, 32)):
    """(median seconds of one full step, the CuPy pool's bytes or None on the CPU) for one objective."""
    tcfg = model.make_config(preset, shape)
    host = model.init_model(tcfg, 0)
    teacher = (P.to_device(host, xp), tcfg)
    if kind == "teacher":
        objective, params, ema = objectives.FlowMatchingObjective(tcfg), P.to_device(host, xp), P.to_device(host, xp)
    else:
        shost, scfg = ttfm.student_from_teacher(host, tcfg)
        loss, _, derivative = kind.partition(":")          # e.g. lfmd:fd, lfmd:jvp (--lfmd-derivative)
        opts = losses.DistillLossConfig(loss=loss, **({"lfmd_derivative": derivative} if derivative else {}))
        objective = objectives.DistillObjective(scfg, teacher, opts)
        params, ema = P.to_device(shost, xp), P.to_device(shost, xp)
    state = optim.adam_init(params)
    x1 = xp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch,) + tuple(shape)).astype(np.float32))
    pool = xp.get_default_memory_pool() if backend.is_cupy(xp) else None
    _sync(xp)
    if pool is not None:
        pool.free_all_blocks()
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        loss, grads, _ = objective.loss_and_grads(params, ema, x1, np.random.default_rng(i), i)
        optim.clip_grad_norm(grads, 1.0)
        optim.adam_step(params, grads, state, 1e-4)
        optim.ema_update(ema, params, 0.999)
        del grads
        _sync(xp)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), (pool.total_bytes() if pool is not None else None)


def time_torch(preset, batch, warmup, iters, tf32):
    import torch
    import torch_reference as tr
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    cfg = model.make_config(preset, (3, 32, 32))
    net = tr.load_params(tr.build_torch_model(cfg), model.init_model(cfg, 0)).cuda()
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    t = torch.rand(batch, device="cuda")

    def run(fn):
        out = []
        for i in range(warmup + iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if i >= warmup:
                out.append(time.perf_counter() - t0)
        return statistics.median(out)

    def fb():
        net.zero_grad(set_to_none=True)
        (net(x, t) ** 2).mean().backward()

    def f():
        with torch.no_grad():
            net(x, t)
    return run(f), run(fb)


def standin_memory(batch):
    """Bytes at `batch` per objective by the CuPy stand-in's measure (a CPU subprocess, ~30 s)."""
    code = ("import sys, json; sys.path[:0] = ['tests/cupy_standin', 'tests']; import test_gpu_memory as m; "
            f"print(json.dumps({{k: m.extrapolate(k, 'cifar10', {batch})['at_batch'] for k in {list(KINDS)!r}}}))")
    env = dict(os.environ, TTFM_CUPY_STANDIN="1")
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-500:]}
    except Exception as exc:
        return {"error": repr(exc)}


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="runs/gpu_check")
@click.option("--batch", type=click.IntRange(1), default=128)
@click.option("--warmup", type=click.IntRange(0), default=2)
@click.option("--iters", type=click.IntRange(1), default=5)
@click.option("--presets", default="small,cifar10")
@click.option("--no-torch", is_flag=True)
@click.option("--standin-json", type=click.Path(dir_okay=False), default=None,
              help="the stand-in's figures computed beforehand (gpu_check.sh does it in the background)")
def main(out, batch, warmup, iters, presets, no_torch, standin_json):
    from unet_step import forward_flops
    os.makedirs(out, exist_ok=True)
    xp = backend.select_device("gpu")
    props = xp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    peak = _peak(name)
    rec = dict(device=name, cupy=xp.__version__, batch=batch, peak_tflops_fp32_tf32=peak, rows=[])
    if standin_json and os.path.exists(standin_json) and os.path.getsize(standin_json):
        with open(standin_json) as f:
            rec["standin_bytes_cifar10"] = json.loads(f.read().strip().splitlines()[-1])
    else:
        rec["standin_bytes_cifar10"] = standin_memory(batch)
    for preset in presets.split(","):
        cfg = model.make_config(preset, (3, 32, 32))
        f1 = forward_flops(cfg, batch)
        torch_t = {}
        if not no_torch:
            for tf32 in (False, True):
                try:
                    torch_t[tf32] = time_torch(preset, batch, warmup, iters, tf32)
                except Exception as exc:                   # no torch with CUDA here: say so in the record
                    rec.setdefault("torch_error", repr(exc))
        for kind in KINDS:
            n_fb, n_f = PASSES[kind]
            flops = n_fb * 3 * f1 + n_f * f1
            row = dict(preset=preset, objective=kind, step_tflop=flops / 1e12)
            try:
                sec, pool_bytes = time_ours(kind, preset, batch, warmup, iters, xp)
                row.update(ours_s=sec, ours_tflops=flops / sec / 1e12, pool_peak_bytes=pool_bytes)
                if peak:
                    row["ours_frac_fp32_peak"] = flops / sec / 1e12 / peak[0]
            except Exception as exc:
                row["ours_error"] = repr(exc)
            for tf32, (t_f, t_fb) in torch_t.items():
                key = "torch_tf32" if tf32 else "torch_fp32"
                row[f"{key}_s"] = n_fb * t_fb + n_f * t_f
                row[f"{key}_tflops"] = flops / row[f"{key}_s"] / 1e12
            if preset == "cifar10" and isinstance(rec["standin_bytes_cifar10"].get(kind), (int, float)):
                row["standin_bytes"] = rec["standin_bytes_cifar10"][kind]
            rec["rows"].append(row)
            click.echo(json.dumps(row))
            _write(out, rec, name, batch)          # after every row: a timeout later keeps what was measured
    click.echo(open(os.path.join(out, "gpu_check.md")).read())


def _write(out, rec, name, batch):
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(rec, f, indent=1)
    lines = [f"GPU check on {name} (CuPy {rec['cupy']}), batch {batch}, float32", "",
             "| preset | objective | ours s/step | ours TFLOP/s | frac fp32 peak | torch fp32 s | torch tf32 s | "
             "pool peak GiB | stand-in GiB |", "|---|---|---|---|---|---|---|---|---|"]
    g = lambda r, k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "-")  # noqa: E731
    for r in rec["rows"]:
        lines.append(f"| {r['preset']} | {r['objective']} | {g(r, 'ours_s', '{:.3f}')} | {g(r, 'ours_tflops', '{:.1f}')} | "
                     f"{g(r, 'ours_frac_fp32_peak', '{:.0%}')} | {g(r, 'torch_fp32_s', '{:.3f}')} | "
                     f"{g(r, 'torch_tf32_s', '{:.3f}')} | "
                     f"{(r['pool_peak_bytes'] / 2**30) if r.get('pool_peak_bytes') else float('nan'):.1f} | "
                     f"{(r['standin_bytes'] / 2**30) if r.get('standin_bytes') else float('nan'):.1f} |")
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
