#!/usr/bin/env python
"""ttfm_np command line: train a flow-matching teacher, distill it into a
two-timed flow model, sample, evaluate, compute FID.

    python cli.py --help
    python cli.py COMMAND --help
"""
from __future__ import annotations

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


if __name__ == "__main__":
    cli()
