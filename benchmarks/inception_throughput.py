"""FID feature-extraction throughput (images/s) of the Inception port, optionally
against the same network in PyTorch (random weights; speed does not depend on them).

    python benchmarks/inception_throughput.py --batch 16 --iters 3 [--against torch] [--device gpu]
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import click
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from ttfm_np import backend, inception  # noqa: E402


@click.command(context_settings={"show_default": True})
@click.option("--batch", type=click.IntRange(1), default=16)
@click.option("--iters", type=click.IntRange(1), default=3)
@click.option("--size", type=click.IntRange(8), default=32, help="input images are resized from this to 299")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu")
@click.option("--against", type=click.Choice(["none", "torch"]), default="none")
def main(batch, iters, size, device, against):
    import torch
    from test_inception import random_fid_inception      # random weights, saved by torch, read without it
    xp = backend.select_device(device)
    net = random_fid_inception(0)
    with tempfile.TemporaryDirectory() as d:
        torch.save(net.state_dict(), os.path.join(d, "w.pth"))
        model = inception.load_inception(inception.convert_weights(os.path.join(d, "w.pth"), os.path.join(d, "w.h5")), xp)
    x = np.random.default_rng(0).uniform(0, 1, (batch, 3, size, size)).astype(np.float32)
    model.features(x[:2])
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model.features(x)
        times.append(time.perf_counter() - t0)
    ours = batch / statistics.median(times)
    click.echo(f"ttfm_np Inception ({device}, batch {batch}): {ours:.1f} images/s")
    if against == "torch":
        tdev = "cuda" if device == "gpu" else "cpu"
        net = net.to(tdev)
        tx = torch.tensor(x, device=tdev)
        times = []
        with torch.no_grad():
            net(tx[:2])
            for _ in range(iters):
                t0 = time.perf_counter()
                net(tx)
                if tdev == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        theirs = batch / statistics.median(times)
        click.echo(f"torch {torch.__version__} eager: {theirs:.1f} images/s  -> ours/torch throughput = {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
