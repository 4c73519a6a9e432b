"""How the cost of one training step grows with batch size and resolution,
for ttfm_np and for the identical PyTorch network, with the step's memory.

    python benchmarks/scaling.py                                  # small U-Net, CPU
    python benchmarks/scaling.py --batches 8,16,32,64,128 --resolutions 16,32,64 --out runs/scaling.jsonl

Each (implementation, batch, resolution) runs in a fresh process
(benchmarks/unet_step.py), so the peak-memory reading of one cannot include
another's. Batch sweep at --base-resolution, resolution sweep at --base-batch.
Prints a Markdown table; the JSON lines go to --out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import click

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(model_name, batch, resolution, channels, warmup, iters, device, torch_only, out):
    cmd = [sys.executable, os.path.join(HERE, "unet_step.py"), "--model", model_name, "--batch", str(batch),
           "--resolution", str(resolution), "--channels", str(channels), "--warmup", str(warmup),
           "--iters", str(iters), "--device", device, "--json", out] + (["--torch-only"] if torch_only else [])
    click.echo("$ python " + " ".join(cmd[1:]), err=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.loads(f.readlines()[-1])


@click.command(context_settings={"show_default": True})
@click.option("--model", "model_name", type=click.Choice(["tiny", "small", "cifar10"]), default="small")
@click.option("--batches", default="8,16,32,64,128", help="batch sweep (at --base-resolution)")
@click.option("--resolutions", default="16,32,64", help="resolution sweep (at --base-batch)")
@click.option("--base-batch", type=click.IntRange(1), default=32)
@click.option("--base-resolution", type=click.IntRange(8), default=32)
@click.option("--channels", type=click.IntRange(1), default=3)
@click.option("--warmup", type=click.IntRange(0), default=1)
@click.option("--iters", type=click.IntRange(1), default=3)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu")
@click.option("--torch/--no-torch", "with_torch", default=True, help="also measure PyTorch")
@click.option("--out", type=click.Path(dir_okay=False), default="runs/scaling.jsonl")
def main(model_name, batches, resolutions, base_batch, base_resolution, channels, warmup, iters, device,
         with_torch, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    grid = [(int(b), base_resolution) for b in batches.split(",")]
    grid += [(base_batch, int(r)) for r in resolutions.split(",") if (base_batch, int(r)) not in grid]
    click.echo("| batch | resolution | GFLOP/step | ttfm_np s/step | ttfm_np GFLOP/s | ttfm_np step memory MiB |"
               + (" torch s/step | torch step memory MiB | ours / torch |" if with_torch else ""))
    click.echo("|---|---|---|---|---|---|" + ("---|---|---|" if with_torch else ""))
    for batch, res in grid:
        ours = measure(model_name, batch, res, channels, warmup, iters, device, False, out)
        row = (f"| {batch} | {res} | {ours['step_gflop']:.1f} | {ours['ours_s']:.3f} | {ours['ours_gflops']:.0f} | "
               f"{ours['ours_step_mem_bytes'] / 2**20:.0f} |")
        if with_torch:
            theirs = measure(model_name, batch, res, channels, warmup, iters, device, True, out)
            row += (f" {theirs['torch_s']:.3f} | {theirs['torch_step_mem_bytes'] / 2**20:.0f} | "
                    f"{ours['ours_s'] / theirs['torch_s']:.2f}x |")
        click.echo(row)


if __name__ == "__main__":
    main()
