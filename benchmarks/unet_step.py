"""Time one training step (forward + backward + Adam) of ttfm_np, optionally
against the identical PyTorch network measured in the same run.

    python benchmarks/unet_step.py                       # small U-Net, batch 32, 3x32x32
    python benchmarks/unet_step.py --against torch       # + PyTorch eager, ratio ours/torch
    python benchmarks/unet_step.py --model mlp --batch 4096 --against torch
    python benchmarks/unet_step.py --model mlp --against torch --threads 1 --rounds 5   # both sides on 1 thread
    python benchmarks/unet_step.py --json results.jsonl  # append one JSON line per run
    python benchmarks/scaling.py                         # batch and resolution sweeps, peak memory

Reported: median seconds per step over --iters timed steps (after --warmup),
the analytic GEMM FLOPs of one step (2*M*N*K per matrix product; backward =
2x forward), the achieved GFLOP/s, the SGEMM GFLOP/s NumPy reaches on
this machine (a 2048^3 product) as the practical peak, the OpenBLAS kernel
set in use (ttfm_np/blas.py), and the memory of a step: on the CPU the growth
of the process's peak resident set over the timed steps (so an implementation
timed second in the same process shows none: scaling.py runs each in its own
process), on the GPU the CuPy pool's bytes or torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ttfm_np import backend, blas, block_processes, conv, flow, model, optim, winograd  # noqa: E402
import numpy as np  # noqa: E402  (after ttfm_np, which picks the OpenBLAS kernels first: ttfm_np/blas.py)
from ttfm_np.unet import layout  # noqa: E402


def forward_flops(cfg, batch: int) -> float:
    """GEMM FLOPs of one forward pass (convs, linears, attention), 2*M*N*K each."""
    if cfg.kind == "mlp":
        h, e = cfg.hidden, cfg.emb_dim
        per = 2 * (cfg.dim * h + e * h + (cfg.depth - 1) * h * h + h * cfg.dim)
        emb = 2 * (cfg.emb_features * e + e * e)
        return batch * (per + emb)
    enc, dec, cout = layout(cfg)
    R = cfg.resolution
    total = 0.0
    for e in enc + dec:
        r = e["res"]
        pix = batch * r * r
        if e["kind"] in ("conv", "up"):
            total += 2 * pix * e["cout"] * e["cin"] * 9
        elif e["kind"] == "down":
            total += 2 * pix * e["cout"] * e["cin"] * 9          # output pixels at r
        else:
            total += 2 * pix * (e["cout"] * e["cin"] * 9 + e["cout"] * e["cout"] * 9)
            if e["cin"] != e["cout"]:
                total += 2 * pix * e["cout"] * e["cin"]
            if e["attention"]:
                C, L = e["cout"], r * r
                total += 2 * pix * (3 * C * C + C * C) + 2 * 2 * batch * L * L * C
    total += 2 * batch * R * R * cfg.in_channels * cout * 9
    return total


def simd_levels() -> str:
    """What NumPy's ufuncs dispatch to (np.show_runtime's 'found') and the sigmoid form chosen from it."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    from ttfm_np import activations
    found = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    return f"numpy {' '.join(found) or 'baseline only'} (sigmoid form {activations.SIGMOID_FORM})"


def sgemm_peak(xp, n: int = 2048, reps: int = 3) -> float:
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    b = a.copy()
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        if backend.is_cupy(xp):
            xp.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def time_ours(cfg, batch, warmup, iters, xp):
    p = {k: xp.asarray(v) for k, v in model.init_model(cfg, 0).items()}
    st = optim.adam_init(p)
    rng = np.random.default_rng(0)
    shape = (batch, cfg.dim) if cfg.kind == "mlp" else (batch, cfg.in_channels, cfg.resolution, cfg.resolution)
    x1 = xp.asarray(rng.standard_normal(shape).astype(np.float32))
    x0 = xp.asarray(rng.standard_normal(shape).astype(np.float32))
    t = xp.asarray(rng.random(batch).astype(np.float32))
    xt = flow.interpolate(x0, x1, t)
    times = []
    rss0 = backend.reset_peak_resident_memory()
    block_processes.reset_peak_rss()          # a U-Net's blocks may run on worker processes: their memory counts
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        v, cache = model.model_forward(p, cfg, xt, t)
        loss, dv = flow.flow_matching_loss_and_grad(v, x0, x1)
        _, g = model.model_backward(dv, cache)
        optim.adam_step(p, g, st, 1e-4)
        if backend.is_cupy(xp):
            xp.cuda.Device().synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        del v, cache, dv, g
    if backend.is_cupy(xp):
        mem = xp.get_default_memory_pool().total_bytes()   # the pool holds the step's peak
    else:
        mem = backend.peak_resident_memory() - rss0        # growth of the peak RSS over the steps
        mem += sum(child["peak_rss"] for child in block_processes.status())   # + the worker processes' peaks
    return statistics.median(times), mem


def time_torch(cfg, batch, warmup, iters, device):
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_reference as tr
    torch.manual_seed(0)
    net = tr.load_params(tr.build_torch_model(cfg), model.init_model(cfg, 0)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    shape = (batch, cfg.dim) if cfg.kind == "mlp" else (batch, cfg.in_channels, cfg.resolution, cfg.resolution)
    x1, x0 = torch.randn(shape, device=device), torch.randn(shape, device=device)
    t = torch.rand(batch, device=device)
    xt = (1 - t.view(-1, *[1] * (len(shape) - 1))) * x0 + t.view(-1, *[1] * (len(shape) - 1)) * x1
    times = []
    rss0 = backend.reset_peak_resident_memory()
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = ((net(xt, t) - (x1 - x0)) ** 2).mean()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        del loss
    mem = torch.cuda.max_memory_allocated() if device == "cuda" else backend.peak_resident_memory() - rss0
    return statistics.median(times), mem


def alternate_rounds(rec, rounds, ours_fn, torch_fn, ours, theirs):
    """Time ours then torch rounds - 1 more times (the first round is given); report medians and ranges."""
    o, t = [ours], [theirs]
    for _ in range(rounds - 1):
        o.append(ours_fn())
        t.append(torch_fn())
    r = [a / b for a, b in zip(o, t)]
    rec.update(rounds_ours_s=o, rounds_torch_s=t, rounds_ratio=r, ours_s=statistics.median(o),
               torch_s=statistics.median(t), ratio_ours_over_torch=statistics.median(r))
    click.echo(f"  {rounds} alternating rounds: ttfm_np median {statistics.median(o):.3f} s [{min(o):.3f}, {max(o):.3f}], "
               f"torch {statistics.median(t):.3f} s [{min(t):.3f}, {max(t):.3f}], "
               f"ratio median {statistics.median(r):.2f}x [{min(r):.2f}, {max(r):.2f}]")


@click.command(context_settings={"show_default": True})
@click.option("--model", "model_name", type=click.Choice(["tiny", "small", "cifar10", "mlp"]), default="small")
@click.option("--batch", type=click.IntRange(1), default=None, help="default 32 for U-Nets, 4096 for the MLP")
@click.option("--resolution", type=click.IntRange(8), default=32)
@click.option("--channels", type=click.IntRange(1), default=3)
@click.option("--warmup", type=click.IntRange(0), default=2)
@click.option("--iters", type=click.IntRange(1), default=5)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu")
@click.option("--against", type=click.Choice(["none", "torch"]), default="none",
              help="also time the identical PyTorch network in this run")
@click.option("--torch-only", is_flag=True, help="time only PyTorch (benchmarks/scaling.py measures each "
              "implementation's memory in a process of its own)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="append a JSON line here")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for BOTH sides: OpenBLAS's (ttfm_np/blas.py) and torch.set_num_threads "
              "(default: each library's own, OpenBLAS and torch both take every core)")
@click.option("--rounds", type=click.IntRange(1), default=1,
              help="with --against torch: this many more rounds of ours then torch, alternating, after the first "
              "(on a busy machine the load changes between the two; the per-round ratio is reported)")
@click.option("--conv3x3", type=click.Choice(conv.CONV3X3_ALGORITHMS), default=conv.CONV3X3,
              help="ttfm_np's algorithm for the NumPy 3x3 / stride 1 / padding 1 convolutions (ttfm_np/conv.py)")
@click.option("--block-workers", type=click.Choice(["processes", "threads"]), default=None,
              help="where a U-Net's blocks of samples run with 2+ workers (ttfm_np/block_processes.py; "
              "default: the library's)")
@click.option("--winograd-v", type=click.Choice(["keep", "recompute"]), default=None,
              help="whether the Winograd forward keeps its transformed input V for the backward "
              "(ttfm_np/winograd.py CACHE_V; default: the library's)")
def main(model_name, batch, resolution, channels, warmup, iters, device, against, torch_only, json_out, threads,
         rounds, conv3x3, block_workers, winograd_v):
    xp = backend.select_device(device)
    if block_workers is not None:
        block_processes.set_enabled(block_workers == "processes")
    conv.set_conv3x3_algorithm(conv3x3)
    if winograd_v is not None:
        winograd.CACHE_V = winograd_v == "keep"
    if threads is not None and not blas.set_threads(threads):
        raise click.UsageError("--threads: NumPy bundles no OpenBLAS here, so its thread count cannot be set")
    if model_name == "mlp":
        batch = batch or 4096
        cfg = model.make_config("mlp", (2,))
    else:
        batch = batch or 32
        cfg = model.make_config(model_name, (channels, resolution, resolution))
    n_params = sum(v.size for v in model.init_model(cfg, 0).values())
    flops = 3 * forward_flops(cfg, batch)
    rec = dict(model=model_name, batch=batch, resolution=resolution if model_name != "mlp" else None,
               params=int(n_params), device=device, step_gflop=flops / 1e9,
               machine=platform.processor() or platform.machine(), threads=os.cpu_count(),
               blas_threads=None if backend.is_cupy(xp) else blas.get_threads(),
               simd=simd_levels(), conv3x3=conv3x3, winograd_keeps_v=winograd.CACHE_V,
               block_workers="processes" if block_processes.enabled() else "threads")
    click.echo(f"{model_name} ({n_params:,} params), batch {batch}, {device}: step = {flops / 1e9:.1f} GFLOP")
    click.echo(f"  SIMD: {rec['simd']}, OpenBLAS threads {rec['blas_threads']}, blocks on {rec['block_workers']}, "
               f"3x3 convs: {conv3x3}"
               + (f" (Winograd {'keeps' if winograd.CACHE_V else 'recomputes'} V)" if conv3x3 == "winograd" else ""))
    if not torch_only:
        ours, ours_mem = time_ours(cfg, batch, warmup, iters, xp)   # first: freed buffers would hide memory
        peak = sgemm_peak(xp)
        rec.update(ours_s=ours, ours_gflops=flops / ours / 1e9, sgemm_peak_gflops=peak, ours_step_mem_bytes=ours_mem,
                   openblas_kernels=None if backend.is_cupy(xp) else blas.kernel_set())
        if not backend.is_cupy(xp):
            click.echo(f"  OpenBLAS kernels: {rec['openblas_kernels']} (ttfm_np/blas.py)")
        click.echo(f"  SGEMM peak on this machine: {peak:.0f} GFLOP/s")
        click.echo(f"  ttfm_np: {ours:.3f} s/step  ({flops / ours / 1e9:.0f} GFLOP/s, {flops / ours / 1e9 / peak:.0%} "
                   f"of SGEMM peak), step memory {ours_mem / 2**20:.0f} MiB")
    if against == "torch" or torch_only:
        import torch
        tdev = "cuda" if device == "gpu" else "cpu"
        if threads is not None:
            torch.set_num_threads(threads)
        if tdev == "cpu":
            click.echo(f"  torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
                       f"{torch.get_num_threads()} threads")
        theirs, torch_mem = time_torch(cfg, batch, warmup, iters, tdev)
        if tdev == "cpu" and not torch_only:
            torch_mem = None        # our steps already raised this process's peak RSS: not measurable here
        rec.update(torch_s=theirs, torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
                   torch_step_mem_bytes=torch_mem)
        mem_text = "" if torch_mem is None else f", step memory {torch_mem / 2**20:.0f} MiB"
        click.echo(f"  torch {torch.__version__} eager: {theirs:.3f} s/step  ({flops / theirs / 1e9:.0f} GFLOP/s){mem_text}")
        if not torch_only:
            rec["ratio_ours_over_torch"] = ours / theirs
            click.echo(f"  ratio ours/torch = {ours / theirs:.2f}x  (below 1 = ttfm_np faster)")
            if rounds > 1:
                alternate_rounds(rec, rounds, lambda: time_ours(cfg, batch, warmup, iters, xp)[0],
                                 lambda: time_torch(cfg, batch, warmup, iters, tdev)[0], ours, theirs)
    if json_out:
        with open(json_out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
