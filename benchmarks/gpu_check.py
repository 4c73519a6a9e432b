"""Step time, memory and FLOPs of every objective on a GPU, against PyTorch eager (run by gpu_check.sh).

    python benchmarks/gpu_check.py steps --out DIR            # DIR/steps.json, written after every row
    python benchmarks/gpu_check.py warmup                     # compile every project kernel once
    python benchmarks/gpu_check.py summarize --work W --out OUT   # gpu_check.sh's last stage

`steps`: for the `cifar10` preset (3x32x32) at --batch (128) and each objective
(teacher flow matching; ITVM, LFMD, ECD, MeanFlow distillation), in fp32 and in
TF32 (--precision tf32: GEMM inputs rounded to TF32, fp32 accumulation, ttfm_np/precision.py):

* ours: median seconds of one full step (loss_and_grads + clip + Adam + EMA) after
  warm-up; the GEMM FLOPs and GEMM bytes of that step COUNTED while it runs (every
  matrix product of linear, conv and attention goes through precision.matmul /
  tensordot, which are wrapped for one step), so the count is of the passes the
  code really makes on this device (LFMD's recomputed forwards included);
  TFLOP/s and the share of the card's dense peak (table PEAKS by device name);
* the performance model: predicted = FLOPs / (MODEL_FLOP_SHARE x peak)
  + GEMM bytes / (MODEL_BW_SHARE x HBM bandwidth) (elementwise kernels are not
  modelled, so measured/predicted above 1 is their cost plus what the GEMMs lose);
* the CuPy memory pool's size after the step (its high-water mark: freed blocks
  stay cached in the pool), per objective and precision;
* PyTorch eager on the same device and the same network (benchmarks/torch_reference.py,
  same weights), fp32 and TF32 (torch.backends allow_tf32): one forward without grad
  (t_f) and one forward+backward (t_fb). PyTorch has no implementation of these
  losses, so a loss's torch time is n_fb t_fb + n_f t_f with the loss's network
  passes (PASSES below): the cost of the same network passes in torch;
* a TF32 self-check: the relative error of one 512^3 product in fp32 and tf32 mode
  against float64 (tf32 should be ~1e3 times larger: otherwise TF32 was not on).

With GPU_CHECK_DRY=1 (gpu_check.sh) the same code runs on the CuPy stand-in with the
`tiny` preset at batch 2 and torch on the CPU: CI checks the whole script that way.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import numpy as np  # noqa: E402

from ttfm_np import backend, flatparams, losses, model, objectives, optim, precision, ttfm  # noqa: E402
from ttfm_np import params as P  # noqa: E402

KINDS = ("itvm", "teacher", "lfmd", "ecd", "meanflow")    # (the order rows are measured in: the main job first)
# Network passes of one step, as (forward+backward, forward only), for the torch-equivalent time
# (defaults of losses.DistillLossConfig, the GPU path):
#   teacher   v fwd+bwd
#   itvm      init: teacher fwd, u(s,s) fwd+bwd; terminal: EMA phi fwd, teacher Heun 2 fwd, u(s,t) fwd+bwd
#   lfmd      jvp (default): phi and its tangent (~2 fwd) and reverse over forward (~2 bwd) = 2 fwd+bwd,
#             teacher fwd.   (fd: phi(t+-h) fwd, phi(t) fwd, teacher fwd, phi(t+-h) again fwd+bwd = (2, 4);
#             the old count (4, 2) assumed four backwards: 14 forward-equivalents instead of 10)
#   ecd       teacher fwd, EMA phi fwd, phi fwd+bwd
#   meanflow  teacher fwd, student jvp without cache (~2 fwd), u fwd+bwd
PASSES = {"teacher": (1, 0), "itvm": (2, 4), "lfmd": (2, 1), "ecd": (1, 2), "meanflow": (1, 3)}

# Dense (no sparsity) peaks by device name, most specific first:
#   (fp32 TFLOP/s, TF32 tensor-core TFLOP/s, HBM TB/s) from NVIDIA's data sheets.
PEAKS = (("H200 NVL", (60.0, 417.5, 4.8)), ("H200", (67.0, 494.7, 4.8)),
         ("H100 NVL", (60.0, 417.5, 3.9)), ("H100 PCIe", (51.0, 378.0, 2.0)),
         ("H100", (67.0, 494.7, 3.35)),          # SXM5, e.g. "NVIDIA H100 80GB HBM3"
         ("A100", (19.5, 156.0, 2.0)))
MODEL_FLOP_SHARE = 0.4     # the model's assumed share of the GEMM peak (docs/performance.md)
MODEL_BW_SHARE = 0.6       # and of the HBM bandwidth for the GEMM operands


def peak_of(name: str):
    """(fp32, tf32, HBM TB/s) for a CUDA device name, or None when the table does not know it."""
    for key, peak in PEAKS:
        if all(part in name for part in key.split()):
            return peak
    return None


def predicted_seconds(flops, gemm_bytes, peak, mode):
    """The performance model's step time: GEMM FLOPs at MODEL_FLOP_SHARE of the mode's peak plus
    GEMM operand bytes at MODEL_BW_SHARE of the bandwidth."""
    tflops = peak[0] if mode == "fp32" else peak[1]
    return flops / (MODEL_FLOP_SHARE * tflops * 1e12) + gemm_bytes / (MODEL_BW_SHARE * peak[2] * 1e12)


# ----------------------------------------------------------------------------- counting GEMMs

@contextlib.contextmanager
def count_gemms(totals: dict):
    """Wrap precision.matmul / tensordot everywhere ttfm_np bound them: add each product's FLOPs
    (2 M N K) and bytes (operands and result) to totals["flops"], totals["bytes"], totals["calls"]."""
    real_mm, real_td = precision.matmul, precision.tensordot

    def mm(a, b):
        c = real_mm(a, b)
        k = a.shape[-1]                                    # (..., M, K) @ (..., K, N) (or vectors)
        totals["flops"] += 2.0 * c.size * k
        totals["bytes"] += a.nbytes + b.nbytes + c.nbytes
        totals["calls"] += 1
        return c

    def td(a, b, axes):
        c = real_td(a, b, axes)
        ax_a = axes[0] if isinstance(axes, (tuple, list)) else list(range(a.ndim - axes, a.ndim))
        ax_a = [ax_a] if isinstance(ax_a, int) else ax_a
        k = int(np.prod([a.shape[i] for i in ax_a]))
        totals["flops"] += 2.0 * c.size * k
        totals["bytes"] += a.nbytes + b.nbytes + c.nbytes
        totals["calls"] += 1
        return c

    patched = []
    for mod in list(sys.modules.values()):
        if not getattr(mod, "__name__", "").startswith("ttfm_np"):
            continue
        for name, value in list(vars(mod).items()):
            if value is real_mm or value is real_td:
                patched.append((mod, name, value))
                setattr(mod, name, mm if value is real_mm else td)
    try:
        yield totals
    finally:
        for mod, name, value in patched:
            setattr(mod, name, value)


# ----------------------------------------------------------------------------- ours

def _sync(xp):
    if backend.is_cupy(xp):
        xp.cuda.Device().synchronize()


def time_ours(kind, preset, batch, warmup, iters, xp, shape=(3, 32, 32), precision_mode="fp32", counts=None):
    """(median seconds of one full step, the CuPy pool's bytes or None on the CPU) for one objective.

    counts: a dict that receives the GEMM totals of the first step (flops, bytes, calls)."""
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
    # one buffer each for parameters, EMA, moments and gradients, as train.train_loop keeps them
    params, ema = flatparams.pack(params), flatparams.pack(ema, like=params)
    state = optim.adam_init(params)
    x1 = xp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch,) + tuple(shape)).astype(np.float32))
    pool = xp.get_default_memory_pool() if backend.is_cupy(xp) else None
    _sync(xp)
    if pool is not None:
        pool.free_all_blocks()
    times = []
    with precision.using(precision_mode):
        for i in range(warmup + iters):
            totals = dict(flops=0.0, bytes=0.0, calls=0)
            with (count_gemms(totals) if (i == 0 and counts is not None) else contextlib.nullcontext()):
                t0 = time.perf_counter()
                loss, grads, _ = objective.loss_and_grads(params, ema, x1, np.random.default_rng(i), i)
                grads = flatparams.pack(grads, like=params)
                optim.clip_grad_norm(grads, 1.0)
                optim.adam_step(params, grads, state, 1e-4)
                optim.ema_update(ema, params, 0.999)
                del grads
                _sync(xp)
                elapsed = time.perf_counter() - t0
            if i == 0 and counts is not None:
                counts.update(totals)
            if i >= warmup:
                times.append(elapsed)
    return statistics.median(times), (pool.total_bytes() if pool is not None else None)


def tf32_self_check(xp, n=512):
    """Relative error (max |C - C64| / max |C64|) of one n^3 product in fp32 and in tf32 mode."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    out = {}
    for mode in ("fp32", "tf32"):
        with precision.using(mode):
            c = backend.to_numpy(precision.matmul(xp.asarray(a), xp.asarray(b)))
        out[f"rel_err_{mode}"] = float(np.abs(c - exact).max() / np.abs(exact).max())
    out["tf32_effective"] = out["rel_err_tf32"] > 10 * out["rel_err_fp32"]
    return out


# ----------------------------------------------------------------------------- PyTorch eager

def time_torch(preset, batch, warmup, iters, tf32, device, resolution=32):
    """(t_f, t_fb): median seconds of one forward without grad and of one forward+backward."""
    import torch
    import torch_reference as tr
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if device == "cpu":
        torch.set_num_threads(1)               # the dry run: no thread spinning on a shared CPU
    cfg = model.make_config(preset, (3, resolution, resolution))
    net = tr.load_params(tr.build_torch_model(cfg), model.init_model(cfg, 0)).to(device)
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    t = torch.rand(batch, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(fn):
        out = []
        for i in range(warmup + iters):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
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


# ----------------------------------------------------------------------------- commands

@click.group()
def cli():
    """GPU check stages (see gpu_check.sh)."""


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--preset", default="cifar10")
@click.option("--batch", type=click.IntRange(1), default=128)
@click.option("--resolution", type=click.IntRange(4), default=32, help="image side (3 channels); 32 = CIFAR-10")
@click.option("--warmup", type=click.IntRange(0), default=1)
@click.option("--iters", type=click.IntRange(1), default=3)
@click.option("--kinds", default=",".join(KINDS))
@click.option("--torch-device", default="cuda", help="cuda, or cpu for the dry run")
@click.option("--budget-s", type=float, default=280.0, help="rows not started within this many seconds are "
              "recorded as skipped (the stage's timeout kills it a little later)")
def steps(out, preset, batch, resolution, warmup, iters, kinds, torch_device, budget_s):
    """Per objective and precision: our step time, FLOPs, pool bytes; torch eager; the model."""
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    xp = backend.select_device("gpu")
    props = xp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    peak = peak_of(name)
    shape = (3, resolution, resolution)
    rec = dict(device=name, cupy=xp.__version__, preset=preset, shape=shape, batch=batch, warmup=warmup, iters=iters,
               peak_fp32_tf32_tflops_hbm_tbs=peak or f"error: {name!r} is not in gpu_check.PEAKS",
               model=dict(flop_share=MODEL_FLOP_SHARE, bw_share=MODEL_BW_SHARE), passes=PASSES, rows=[])
    try:
        rec["tf32_check"] = tf32_self_check(xp)
    except Exception as exc:
        rec["tf32_check"] = {"error": repr(exc)}
    torch_t = {}
    for mode in ("fp32", "tf32"):
        try:
            torch_t[mode] = time_torch(preset, batch, warmup, iters, mode == "tf32", torch_device, resolution)
            rec[f"torch_{mode}_fwd_s"], rec[f"torch_{mode}_fwdbwd_s"] = torch_t[mode]
        except Exception as exc:                          # recorded, and the next stage runs
            rec[f"torch_{mode}_error"] = repr(exc)
    _write_steps(out, rec)
    for kind in kinds.split(","):
        for mode in ("tf32", "fp32"):              # TF32 first: the goal's numbers, should the budget run out
            row = dict(objective=kind, precision=mode)
            if time.perf_counter() - start > budget_s:
                row["error"] = f"skipped: the stage's {budget_s:.0f} s budget was spent"
            else:
                try:
                    counts = {}
                    sec, pool_bytes = time_ours(kind, preset, batch, warmup, iters, xp, shape=shape,
                                                precision_mode=mode, counts=counts)
                    row.update(ours_s=sec, gemm_gflop=counts["flops"] / 1e9, gemm_gb=counts["bytes"] / 1e9,
                               gemm_calls=counts["calls"], ours_tflops=counts["flops"] / sec / 1e12,
                               pool_peak_bytes=pool_bytes)
                    if peak:
                        row["share_of_peak"] = row["ours_tflops"] / (peak[0] if mode == "fp32" else peak[1])
                        row["predicted_s"] = predicted_seconds(counts["flops"], counts["bytes"], peak, mode)
                        row["measured_over_predicted"] = sec / row["predicted_s"]
                except Exception as exc:
                    row["error"] = repr(exc)
                if mode in torch_t:
                    n_fb, n_f = PASSES[kind]
                    t_f, t_fb = torch_t[mode]
                    row["torch_s"] = n_fb * t_fb + n_f * t_f
                    if "ours_s" in row:
                        row["ours_over_torch"] = row["ours_s"] / row["torch_s"]
                else:
                    row["torch_error"] = rec.get(f"torch_{mode}_error", "not run")
            rec["rows"].append(row)
            click.echo(json.dumps(row))
            _write_steps(out, rec)                       # after every row: a timeout later keeps what was measured
    precision.set_mode("fp32")


def _write_steps(out, rec):
    tmp = os.path.join(out, "steps.json.tmp")
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, os.path.join(out, "steps.json"))


@cli.command()
def warmup():
    """Compile every project kernel for float32 and float64 (CuPy caches them on disk for pytest's workers)."""
    from ttfm_np import cuda
    backend.select_device("gpu")
    defines = {"groupnorm": (("BLOCK", __import__("ttfm_np.groupnorm", fromlist=["_BLOCK"])._BLOCK),)}
    done = []
    for path in sorted(glob.glob(os.path.join(cuda.KERNEL_DIR, "*.cu"))):
        stem = os.path.basename(path)[:-3]
        for dtype in (np.float32, np.float64):
            cuda._module(stem, cuda.SCALAR_OF[np.dtype(dtype)], defines.get(stem, ()))
            done.append(f"{stem}/{np.dtype(dtype).name}")
    click.echo(f"compiled {len(done)} modules: {' '.join(done)}")


# ----------------------------------------------------------------------------- summary

STAGES = ("device", "warmup", "pytest", "steps", "memory")


def _read_json(path):
    try:
        with open(path) as f:
            return json.loads(f.read().strip().splitlines()[-1] if path.endswith(".jsonl") else f.read())
    except Exception as exc:
        return {"error": f"{os.path.basename(path)}: {exc!r}"}


def _tail(path, n=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def parse_junit(path):
    """Counts and failure texts from a junit XML (one file, or the several xdist may not write)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = dict(tests=0, failures=0, errors=0, skipped=0, failed=[])
    for s in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] += int(s.get(key, 0))
        for case in s.iter("testcase"):
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    out["failed"].append(dict(test=f"{case.get('classname')}::{case.get('name')}", kind=tag,
                                              text=((el.get("message") or "") + "\n" + (el.text or ""))[-3000:]))
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


@cli.command()
@click.option("--work", type=click.Path(file_okay=False), required=True)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--start", type=float, required=True, help="the script's start (epoch seconds)")
@click.option("--dry", is_flag=True)
def summarize(work, out, start, dry):
    """summary.json (every field filled, or an error per stage) and summary.md into --out."""
    summary = dict(dry_run=dry, stages={})
    for stage in STAGES:
        info = _read_json(os.path.join(work, f"stage_{stage}.json"))
        if "error" not in info and info.get("rc") not in (0, "0"):
            info["error"] = f"exit code {info.get('rc')}: " + _tail(os.path.join(work, f"{stage}.log"), 8)[-1500:]
        summary["stages"][stage] = info
    dev = _read_json(os.path.join(work, "device.json"))
    summary["device"] = dev if dev else {"error": "device stage wrote nothing"}
    junit = os.path.join(work, "pytest_junit.xml")
    try:
        summary["pytest"] = parse_junit(junit)
    except Exception as exc:
        summary["pytest"] = {"error": f"no junit results ({exc!r}); log tail: {_tail(os.path.join(work, 'pytest.log'))}"}
    summary["steps"] = _read_json(os.path.join(work, "steps", "steps.json"))
    summary["standin_memory"] = _read_json(os.path.join(work, "memory.json"))
    summary["wall_s"] = time.time() - start
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    md = _markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    click.echo(md)


def _markdown(s):
    g = lambda r, k, fmt: (fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "-")  # noqa: E731
    st = s["steps"] if isinstance(s["steps"], dict) else {}
    lines = [f"# GPU check{' (DRY RUN on the CuPy stand-in)' if s['dry_run'] else ''}", "",
             f"device: {s['device'].get('name', s['device'].get('error'))}; wall {s['wall_s']:.0f} s", ""]
    lines.append("| stage | rc | seconds | error |")
    lines.append("|---|---|---|---|")
    for name, info in s["stages"].items():
        err = str(info.get("error", "")).replace("\n", " ").replace("|", "/")[:200]
        lines.append(f"| {name} | {info.get('rc', '-')} | {g(info, 'wall_s', '{:.0f}')} | {err} |")
    p = s["pytest"]
    lines += ["", "pytest -m gpu: " + (p["error"][:500] if "error" in p else
              f"{p['tests']} tests, {p['passed']} passed, {p['failures']} failed, {p['errors']} errors, "
              f"{p['skipped']} skipped")]
    for fail in p.get("failed", [])[:10]:
        lines.append(f"- {fail['kind']}: {fail['test']}")
    if st.get("rows"):
        lines += ["", f"{st.get('preset')} preset, {st.get('shape')}, batch {st.get('batch')}, {st.get('device')}; "
                  "torch fwd/fwd+bwd s: "
                  f"fp32 {g(st, 'torch_fp32_fwd_s', '{:.3f}')}/{g(st, 'torch_fp32_fwdbwd_s', '{:.3f}')}, "
                  f"tf32 {g(st, 'torch_tf32_fwd_s', '{:.3f}')}/{g(st, 'torch_tf32_fwdbwd_s', '{:.3f}')}; "
                  f"tf32 check {st.get('tf32_check')}", "",
                  "| objective | precision | ours s/step | GEMM GFLOP | TFLOP/s | share of peak | predicted s | "
                  "measured/predicted | torch eager s | ours/torch | pool GiB | error |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            pool = r["pool_peak_bytes"] / 2**30 if isinstance(r.get("pool_peak_bytes"), (int, float)) else None
            lines.append(f"| {r['objective']} | {r['precision']} | {g(r, 'ours_s', '{:.3f}')} | "
                         f"{g(r, 'gemm_gflop', '{:.4g}')} | {g(r, 'ours_tflops', '{:.1f}')} | "
                         f"{g(r, 'share_of_peak', '{:.0%}')} | {g(r, 'predicted_s', '{:.3f}')} | "
                         f"{g(r, 'measured_over_predicted', '{:.2f}')} | {g(r, 'torch_s', '{:.3f}')} | "
                         f"{g(r, 'ours_over_torch', '{:.2f}')} | {'-' if pool is None else f'{pool:.2f}'} | "
                         f"{str(r.get('error', r.get('torch_error', '')))[:80]} |")
    mem = s["standin_memory"]
    lines += ["", "stand-in device bytes of one step (preset and batch of the memory stage, extrapolated "
              "from batch 2 and 4): " + json.dumps(mem)[:800], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    cli()
