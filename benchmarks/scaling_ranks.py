"""Data-parallel step time at K ranks (measured here) and a model for K GPUs.

    python benchmarks/scaling_ranks.py                       # measure: small U-Net, global batch 16, K = 1, 2
    python benchmarks/scaling_ranks.py --ranks 1,2,4 --batch 32 --iters 5
    python benchmarks/scaling_ranks.py --model-only          # the cifar10 GPU model table (docs/performance.md)

Measured: one teacher training step (flow-matching forward + backward on this
rank's B/K rows, the bucketed all-reduce of the gradients, clipping, Adam,
EMA), exactly the sequence train.train_loop runs per step, timed on rank 0.
Every K runs in its own `mpiexec -n K` job (K = 1: a plain process), with
OPENBLAS_NUM_THREADS = cores / K so that the ranks do not oversubscribe the
cores: on a 2-core machine K = 2 cannot be faster than K = 1 (the same two
cores do the same work), it only shows the overhead.

Modelled (--model-only): the cifar10 preset (52.6M float32 parameters,
210 MB of gradients) on K GPUs at a fixed global batch:
    t_step(K)  = t_compute(B / K) + t_allreduce(K)        (no overlap: one all-reduce after the backward)
    t_compute(b) = b / r           r = images per second per GPU, cited (see COMPUTE_RATE)
    t_allreduce(K) = 2 (K - 1) / K * S / BW + 2 (K - 1) * alpha     (ring all-reduce, S bytes)
    speed-up = t_step(1) / t_step(K),  efficiency = speed-up / K
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

# ----------------------------------------------------------------------------- the model (no measurement)

# Cited compute rate: EDM's DDPM++ CIFAR-10 model (56M parameters, the layout of our cifar10 preset),
# 200 Mimg at batch 512 in "~2 days" on 8 V100 GPUs, fp32 (NVlabs/edm README, training table; train.py
# defaults --duration=200 --batch=512): 200e6 / (2 * 86400 s * 8 GPUs) = 145 images/s per V100.
COMPUTE_RATE = 200e6 / (2 * 86400 * 8)
# An ITVM step evaluates the networks 9 forward-equivalents per image (2 student forward+backward = 6,
# 1 EMA forward, 2 teacher forwards) against 3 for a teacher step (forward + backward ~ 2 forwards).
ITVM_COST = 9 / 3
GRAD_BYTES = 52_579_843 * 4        # cifar10 preset teacher, float32 (the student has 52.8M: 211 MB)
ALPHA = 10e-6                      # per-hop latency of the ring (assumed; negligible next to 210 MB)
LINKS = {                          # per-GPU ring bandwidth in bytes/s (assumed, nominal)
    "NVLink (150 GB/s)": 150e9,    # V100 NVLink2: 6 links x 25 GB/s per direction
    "IB 100 Gb/s": 100e9 / 8,
    "IB 400 Gb/s": 400e9 / 8,
}


def allreduce_s(k: int, nbytes: float, bw: float, alpha: float = ALPHA) -> float:
    """Ring all-reduce: each rank sends and receives 2 (K - 1) / K of the buffer, in 2 (K - 1) hops."""
    if k == 1:
        return 0.0
    return 2 * (k - 1) / k * nbytes / bw + 2 * (k - 1) * alpha


def model_rows(batch: int = 128, ks=(1, 2, 4, 8, 64), cost: float = 1.0, rate: float = COMPUTE_RATE):
    """[(K, link, t_compute, t_allreduce, t_step, speed-up, efficiency)] at a fixed global batch."""
    rows = []
    t1 = batch * cost / rate
    for k in ks:
        tc = (batch / k) * cost / rate
        for name, bw in LINKS.items():
            if k == 1 and name != next(iter(LINKS)):
                continue
            if k <= 8 and not name.startswith("NVLink") and k > 1:
                continue                      # one node: NVLink
            if k > 8 and name.startswith("NVLink"):
                continue                      # several nodes: the ring crosses InfiniBand
            ta = allreduce_s(k, GRAD_BYTES, bw)
            step = tc + ta
            rows.append((k, name if k > 1 else "-", tc, ta, step, t1 / step, t1 / step / k))
    return rows


def print_model(batch: int):
    for label, cost in (("teacher (flow matching)", 1.0), ("ITVM distillation", ITVM_COST)):
        click.echo(f"\ncifar10 preset, {label}, global batch {batch}: compute {COMPUTE_RATE:.0f} img/s/GPU "
                   f"x {cost:g} (cited/modelled), gradients {GRAD_BYTES / 1e6:.0f} MB")
        click.echo("| GPUs | link | compute (ms) | all-reduce (ms) | step (ms) | speed-up | efficiency |")
        click.echo("|---|---|---|---|---|---|---|")
        for k, name, tc, ta, step, sp, eff in model_rows(batch, cost=cost):
            click.echo(f"| {k} | {name} | {tc * 1e3:.1f} | {ta * 1e3:.1f} | {step * 1e3:.1f} | {sp:.2f} | {eff:.0%} |")


# ----------------------------------------------------------------------------- the measurement

def worker(model_name: str, batch: int, warmup: int, iters: int, out: str):
    """One rank of the measured run (started by mpiexec, or plainly for K = 1)."""
    from ttfm_np import backend, distributed, model, objectives, optim
    import numpy as np
    comm = distributed.get_communicator("auto", device="cpu")
    xp = backend.select_device("cpu")
    cfg = model.make_config(model_name, (3, 32, 32))
    params = {k: xp.asarray(v) for k, v in model.init_model(cfg, 0).items()}
    ema = {k: v.copy() for k, v in params.items()}
    opt = optim.adam_init(params)
    obj = objectives.FlowMatchingObjective(cfg)
    dp = distributed.DataParallel(comm, batch)
    data = np.random.default_rng(1).uniform(-1, 1, (batch,) + (3, 32, 32)).astype(np.float32)
    t_step, t_comm = [], []
    for i in range(warmup + iters):
        comm.barrier()                                 # every rank starts the step together
        t0 = time.perf_counter()
        rng = dp.step_rng(np.random.default_rng([0, i]))
        loss, grads, metrics = obj.loss_and_grads(params, ema, data[dp.lo:dp.hi], rng, dp.dropout_seed(i))
        t1 = time.perf_counter()
        loss, grads, metrics, _ = dp.reduce(loss, grads, metrics, False)
        t2 = time.perf_counter()
        optim.clip_grad_norm(grads, 1.0)
        optim.adam_step(params, grads, opt, 1e-4)
        optim.ema_update(ema, params, 0.999)
        t3 = time.perf_counter()
        if i >= warmup:
            t_step.append(t3 - t0)
            t_comm.append(t2 - t1)
    if comm.is_root:
        with open(out, "w") as f:
            json.dump(dict(step_s=statistics.median(t_step), allreduce_s=statistics.median(t_comm),
                           ranks=comm.size, per_rank_batch=dp.hi - dp.lo, kind=comm.kind), f)


@click.command(context_settings={"show_default": True})
@click.option("--model", "model_name", type=click.Choice(["tiny", "small", "cifar10"]), default="small")
@click.option("--batch", type=click.IntRange(1), default=16, help="global batch (split over the ranks)")
@click.option("--ranks", default="1,2", help="comma-separated K values to measure")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="BLAS threads per rank (default: cores / K, so that K ranks use the cores once)")
@click.option("--warmup", type=click.IntRange(0), default=1)
@click.option("--iters", type=click.IntRange(1), default=3)
@click.option("--model-only", is_flag=True, help="print only the modelled cifar10 GPU table")
@click.option("--model-batch", type=click.IntRange(1), default=128, help="global batch of the model table")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="append JSON lines here")
@click.option("--worker-out", hidden=True, default=None)
def main(model_name, batch, ranks, threads, warmup, iters, model_only, model_batch, json_out, worker_out):
    if worker_out:
        return worker(model_name, batch, warmup, iters, worker_out)
    if model_only:
        return print_model(model_batch)
    cores = os.cpu_count() or 1
    click.echo(f"{model_name} U-Net, global batch {batch}, {cores} cores; median of {iters} steps after {warmup}")
    click.echo("| ranks | rows per rank | BLAS threads per rank | step (s) | of which all-reduce (s) | speed-up "
               "| load average before |")
    click.echo("|---|---|---|---|---|---|---|")
    base = None
    for k in [int(v) for v in ranks.split(",")]:
        out = os.path.join(ROOT, f".scaling_ranks_{os.getpid()}_{k}.json")
        nthreads = threads or max(1, cores // k)
        load = os.getloadavg()[0]            # other processes on the machine distort the timing: report them
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(nthreads), OMP_NUM_THREADS=str(nthreads), TTFM_DEVICE="cpu")
        args = [sys.executable, os.path.abspath(__file__), "--model", model_name, "--batch", str(batch),
                "--warmup", str(warmup), "--iters", str(iters), "--worker-out", out]
        cmd = args if k == 1 else ["mpiexec", "-n", str(k)] + args
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        with open(out) as f:
            rec = json.load(f)
        os.remove(out)
        base = base or rec["step_s"]
        click.echo(f"| {k} | {rec['per_rank_batch']} | {nthreads} | {rec['step_s']:.3f} | {rec['allreduce_s']:.4f} | "
                   f"{base / rec['step_s']:.2f} | {load:.1f} |")
        if json_out:
            with open(json_out, "a") as f:
                f.write(json.dumps(dict(rec, model=model_name, global_batch=batch, blas_threads=nthreads,
                                        load_average=load)) + "\n")


if __name__ == "__main__":
    main()
