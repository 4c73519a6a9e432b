#!/usr/bin/env python
"""The main job's training updates in ttfm_np and the same updates written in PyTorch, timed in one run.

    python benchmarks/torch_distill_step.py                        # ITVM update, mlp-small, batch 256, 1 thread
    python benchmarks/torch_distill_step.py --objective teacher    # the main job's teacher update
    python benchmarks/torch_distill_step.py --threads 2 --rounds 7 --iters 200

`python cli.py distill` (no arguments) trains an `mlp-small` flow-matching teacher
(4000 updates of batch 256) and distils it into a two-timed student with ITVM
(2000 updates of batch 256) on the 2-D toy data, with one OpenBLAS thread
(ttfm_np/blas.py). One update here is exactly what its training loop repeats:

    ITVM (ttfm_np: gpu_check.time_ours -> objectives.DistillObjective, clip, Adam, EMA):
        x0 ~ N(0, I), (s, t) = (min, max) of two U[0, 1], x_s = (1 - s) x0 + s x1
        L_init = || u(x_s, s, s) - v(x_s, s) ||^2
        t' = t - kappa (t - s), y = phi_ema(x_s, s, t'), y_hat = Heun step of the teacher from t' to t
        L_term = || u(x_s, s, t) - sg((y_hat - x_s) / (t - s)) ||^2      (pairs with t > s)
        clip the gradient norm to 1, Adam, EMA of the student
      with the MLP both sides evaluate u(x_s, s, s) and u(x_s, s, t) in one pass of 2N rows, and
      v(x_s, s), v(y, t') in one teacher pass (ttfm_np: losses._itvm_loss_batched)
    teacher: L = || v(x_t, t) - (x1 - x0) ||^2, clip, Adam, EMA

The PyTorch side builds the identical networks (benchmarks/torch_reference.py,
same weights), computes the same terms in eager mode (teacher and EMA under
torch.no_grad, one backward of L_init + L_term) and uses torch.optim.Adam,
clip_grad_norm_ and an in-place EMA. Both sides run on --threads threads
(OpenBLAS's and torch.set_num_threads). The two are timed in alternating rounds
(the machine's load changes between them); reported: the median seconds per
update of each round, their median and range, and the per-round ratio.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ttfm_np import backend, blas, losses, model, ttfm  # noqa: E402  (first: it picks the OpenBLAS kernels, ttfm_np/blas.py)
import numpy as np  # noqa: E402
from gpu_check import time_ours  # noqa: E402

import unet_step  # noqa: E402  (simd_levels)


def torch_itvm_loss(net, ema, teacher, x_s, s, t, kappa):
    """ITVM with the library's defaults (relative Delta: t' = t - kappa (t - s); Heun target), the
    student's two terms in one pass of 2N rows and v(x_s, s), v(y, t') in one teacher pass, as
    ttfm_np's losses._itvm_loss_batched (tests/test_benchmark_scripts.py: the same loss and gradient)."""
    import torch
    with torch.no_grad():
        t_prime = t - kappa * (t - s)
        d = (t - t_prime)[:, None]
        y = x_s + (t_prime - s)[:, None] * ema(x_s, s, t_prime)          # phi_ema(x_s, s, t')
        v_s, v1 = teacher(torch.cat([x_s, y]), torch.cat([s, t_prime])).chunk(2)   # v(x_s, s), v(y, t')
        v2 = teacher(y + d * v1, t)
        y_hat = y + 0.5 * d * (v1 + v2)                                  # Heun
        gap = t - s
        u_tgt = (y_hat - x_s) / torch.where(gap > 0, gap, torch.ones_like(gap))[:, None]
        valid = (gap > 0).to(x_s.dtype)
    u_init, u_term = net(torch.cat([x_s, x_s]), torch.cat([s, s]), torch.cat([s, t])).chunk(2)
    l_init = ((u_init - v_s) ** 2).mean(dim=1).mean()
    l_term = (valid * ((u_term - u_tgt) ** 2).mean(dim=1)).mean()
    return l_init + l_term


def torch_update(kind, preset, batch, lr=1e-4, ema_decay=0.99):
    """(update(i), description) for the PyTorch version of one update of `kind` ('itvm' or 'teacher')."""
    import torch
    import torch_reference as tr
    tcfg = model.make_config(preset, (2,))
    host = model.init_model(tcfg, 0)
    teacher = tr.load_params(tr.build_torch_model(tcfg), host).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if kind == "teacher":
        net = tr.load_params(tr.build_torch_model(tcfg), host)
    else:
        shost, scfg = ttfm.student_from_teacher(host, tcfg)
        net = tr.load_params(tr.build_torch_model(scfg), shost)
    ema = copy.deepcopy(net)
    for p in ema.parameters():
        p.requires_grad_(False)
    params, ema_params = list(net.parameters()), list(ema.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    x1 = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 2)).astype(np.float32))
    kappa = losses.DistillLossConfig(loss="itvm").validate().kappa

    def itvm_loss(x0):
        a, b = torch.rand(batch), torch.rand(batch)
        s, t = torch.minimum(a, b), torch.maximum(a, b)
        x_s = (1 - s)[:, None] * x0 + s[:, None] * x1
        return torch_itvm_loss(net, ema, teacher, x_s, s, t, kappa)

    def teacher_loss(x0):
        t = torch.rand(batch)
        x_t = (1 - t)[:, None] * x0 + t[:, None] * x1
        return ((net(x_t, t) - (x1 - x0)) ** 2).mean(dim=1).mean()

    loss_fn = itvm_loss if kind == "itvm" else teacher_loss

    def update(i):
        torch.manual_seed(i)
        loss = loss_fn(torch.randn(batch, 2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - ema_decay)    # e <- e + (1 - decay)(p - e)
    return update


def time_torch(update, warmup, iters):
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        update(i)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@click.command(context_settings={"show_default": True})
@click.option("--objective", "kind", type=click.Choice(["itvm", "teacher"]), default="itvm")
@click.option("--preset", default="mlp-small", help="the main job's network")
@click.option("--batch", type=click.IntRange(1), default=256, help="the main job's batch")
@click.option("--warmup", type=click.IntRange(0), default=20)
@click.option("--iters", type=click.IntRange(1), default=100)
@click.option("--rounds", type=click.IntRange(1), default=5, help="alternating rounds of ours then torch")
@click.option("--threads", type=click.IntRange(1), default=1,
              help="threads for both sides (the main job runs its 2-D models on one OpenBLAS thread)")
def main(kind, preset, batch, warmup, iters, rounds, threads):
    import torch
    backend.select_device("cpu")         # as the CLI does: NumPy arrays, and the allocator tuned (backend.py)
    if not blas.set_threads(threads):
        raise click.UsageError("--threads: NumPy bundles no OpenBLAS here, so its thread count cannot be set")
    torch.set_num_threads(threads)
    click.echo(f"{kind} update, {preset}, batch {batch}; {threads} thread(s) each; {unet_step.simd_levels()}, "
               f"OpenBLAS {blas.kernel_set()}; torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}")
    update = torch_update(kind, preset, batch)
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(time_ours(kind, preset, batch, warmup, iters, np, shape=(2,))[0])
        theirs.append(time_torch(update, warmup, iters))
    ratio = [a / b for a, b in zip(ours, theirs)]
    ms = lambda v: f"{statistics.median(v) * 1e3:.2f} ms [{min(v) * 1e3:.2f}, {max(v) * 1e3:.2f}]"  # noqa: E731
    click.echo(f"  ttfm_np: {ms(ours)} per update")
    click.echo(f"  torch:   {ms(theirs)} per update")
    click.echo(f"  ratio ours/torch: median {statistics.median(ratio):.2f}x [{min(ratio):.2f}, {max(ratio):.2f}] "
               f"over {rounds} rounds (below 1 = ttfm_np faster)")


if __name__ == "__main__":
    main()
