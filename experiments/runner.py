"""Shared by the experiment scripts: run the pipeline in-process and collect what a
distill run wrote. Every run also prints the equivalent `python cli.py ...` command,
so each number can be traced to (and reproduced by) a command line."""
from __future__ import annotations

import json
import os
import sys

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ttfm_np import pipeline  # noqa: E402  (after the path set-up: runnable from any folder)
from ttfm_np.losses import DistillLossConfig  # noqa: E402


def cli_equivalent(command: str, **options) -> str:
    """The `python cli.py COMMAND --opt value ...` line that does what a pipeline call does."""
    parts = ["python cli.py", command]
    for key, value in options.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"{flag} {','.join(str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def ensure_teacher(data: str, seed: int = 0) -> str:
    """The dataset's default teacher (full recipe), trained first when missing."""
    click.echo("$ " + cli_equivalent("train", data=data, seed=seed, resume=True))
    return pipeline.ensure_teacher(data, seed=seed)


def distill_and_collect(run_dir: str, *, data: str, teacher: str, loss: DistillLossConfig, eval_n: int,
                        eval_n_ref: int = 256, **train_overrides) -> dict:
    """Distill (resuming a run that stopped), evaluate, and return rows, wall time per update and the command."""
    loss_opts = {k: v for k, v in loss.to_dict().items() if v != getattr(DistillLossConfig(), k)}
    command = cli_equivalent("distill", data=data, teacher=teacher, **loss_opts, out=run_dir, eval_n=eval_n,
                             eval_n_ref=eval_n_ref, **train_overrides, resume=True)
    click.echo("$ " + command)
    result = pipeline.distill(data, teacher=teacher, loss=loss, out=os.path.join(ROOT, run_dir), resume=True,
                              eval_n=eval_n, eval_n_ref=eval_n_ref, **train_overrides)
    metrics = [json.loads(line) for line in open(os.path.join(result.out, "metrics.jsonl"))]
    return dict(rows=result.rows, seconds_per_update=seconds_per_update(metrics), command=command,
                loss=loss.loss, config=loss.to_dict())


def seconds_per_update(metrics):
    """Wall time per update between the first and the last metrics line, so the
    start-up (data loading, first allocations) before the first line is not counted."""
    first, last = metrics[0], metrics[-1]
    if last["step"] > first["step"]:
        return (last["time_s"] - first["time_s"]) / (last["step"] - first["step"])
    return 1.0 / last["it_per_s"]


def write_summary(out, summary):
    os.makedirs(os.path.join(ROOT, out), exist_ok=True)
    with open(os.path.join(ROOT, out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
