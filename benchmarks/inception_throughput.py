"""FID feature-extraction throughput (images/s) of the Inception port, optionally
against the same network in PyTorch (random weights; speed does not depend on them).

    python benchmarks/inception_throughput.py --batch 16 --iters 3 [--against torch] [--device gpu]

Inputs are `--size`x`--size` images, resized to 299x299 inside the network as
for FID. The time of each of `--iters` calls of `features` on one batch is
taken; the median is reported (after one warm-up call). Our side needs no
torch: the random weights come from `inception.random_weights`; `--against
torch` loads the same state dict into the torch.nn declaration of
pytorch-fid's network in tests/test_inception.py.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ttfm_np import backend, inception  # noqa: E402
import numpy as np  # noqa: E402  (after ttfm_np, which picks the OpenBLAS kernels first: ttfm_np/blas.py)


def _median_time(fn, iters, sync=lambda: None):
    fn()                                   # warm-up (kernel compilation, allocator)
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@click.command(context_settings={"show_default": True})
@click.option("--batch", type=click.IntRange(1), default=16, help="images per features() call")
@click.option("--iters", type=click.IntRange(1), default=3, help="timed calls (median reported)")
@click.option("--size", type=click.IntRange(8), default=32, help="input images are resized from this to 299")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu")
@click.option("--against", type=click.Choice(["none", "torch"]), default="none")
def main(batch, iters, size, device, against):
    xp = backend.select_device(device)
    sd = inception.random_weights(0)
    model = inception.InceptionV3FID(inception.fold_batchnorm(sd), xp)
    x = np.random.default_rng(0).uniform(0, 1, (batch, 3, size, size)).astype(np.float32)
    xd = xp.asarray(x)                     # on the device already: time the network, not the upload
    sync = (lambda: xp.cuda.Device().synchronize()) if backend.is_cupy(xp) else (lambda: None)
    t = _median_time(lambda: model.features(xd, chunk=batch), iters, sync)
    ours = batch / t
    click.echo(f"ttfm_np Inception ({device}, batch {batch}, {size}x{size} -> 299x299): {ours:.1f} images/s "
               f"({t:.3f} s per batch, median of {iters})")
    if against == "torch":
        import torch
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from test_inception import FIDInception      # torch.nn declaration of pytorch-fid's network
        tdev = "cuda" if device == "gpu" else "cpu"
        net = FIDInception().eval()
        net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
        net = net.to(tdev)
        tx = torch.tensor(x, device=tdev)
        tsync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
        with torch.no_grad():
            t = _median_time(lambda: net(tx), iters, tsync)
        theirs = batch / t
        click.echo(f"torch {torch.__version__} eager ({torch.get_num_threads()} threads): {theirs:.1f} images/s "
                   f"-> ours/torch throughput = {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
