"""Shared by the experiment scripts: run a cli.py command (printed first, so every
number can be traced to a command) and collect what a distill run wrote."""
from __future__ import annotations

import json
import os
import subprocess

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    click.echo("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)


def distill_and_collect(cmd, run_dir, **fields):
    """Run a distill command and return its eval rows, wall time per update and the command."""
    run(cmd)
    rows = json.load(open(os.path.join(ROOT, run_dir, "eval", "eval.json")))["rows"]
    metrics = [json.loads(l) for l in open(os.path.join(ROOT, run_dir, "metrics.jsonl"))]
    return dict(fields, rows=rows, seconds_per_update=seconds_per_update(metrics),
                command=" ".join(["python"] + cmd[1:]))


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
