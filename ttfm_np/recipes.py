"""Default recipes: which network and schedule a dataset gets when the user
does not say. `cli.py distill` with no teacher trains one with these.

Sizes are chosen for the machine each dataset is meant for: toys finish on a
laptop CPU in a few minutes, fashion-mnist in about an hour of CPU, cifar10
and imagefolder data are GPU jobs (the paper's scale).
"""
from __future__ import annotations

import os

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(PROJECT_ROOT, "data")

TEACHER_RECIPES = {
    "toy":           dict(model="mlp", steps=4000, batch_size=512, lr=2e-3, warmup=100, ema_decay=0.995),
    "fashion-mnist": dict(model="small", steps=1500, batch_size=32, lr=4e-4, warmup=100, ema_decay=0.995),
    "cifar10":       dict(model="cifar10", steps=400_000, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999),
    "imagefolder":   dict(model="celebahq64", steps=400_000, batch_size=64, lr=2e-4, warmup=5000, ema_decay=0.9999),
}

DISTILL_RECIPES = {
    "toy":           dict(steps=2000, batch_size=512, lr=1e-3, warmup=100, ema_decay=0.99),
    "fashion-mnist": dict(steps=1000, batch_size=32, lr=2e-4, warmup=100, ema_decay=0.99),
    "cifar10":       dict(steps=200_000, batch_size=128, lr=1e-4, warmup=1000, ema_decay=0.999),
    "imagefolder":   dict(steps=200_000, batch_size=64, lr=1e-4, warmup=1000, ema_decay=0.999),
}


def family(data: str) -> str:
    """toy:moons -> toy, imagefolder:/x -> imagefolder, cifar10 -> cifar10."""
    head = data.split(":", 1)[0]
    if head not in TEACHER_RECIPES:
        raise ValueError(f"unknown dataset {data!r}: use toy:checkerboard, toy:moons, toy:8gaussians, "
                         "toy:spirals, fashion-mnist, cifar10 or imagefolder:PATH")
    return head


def slug(data: str) -> str:
    """A file-name-safe name of a dataset (imagefolder paths become their last folder name)."""
    if data.startswith("imagefolder:"):
        return "imagefolder-" + os.path.basename(os.path.normpath(data.split(":", 1)[1]))
    return data.replace(":", "-")


def default_teacher_dir(data: str, model: str) -> str:
    """Where `train` writes a teacher by default, and where `distill` looks for one."""
    return os.path.join(DATA_DIR, "teachers", f"{slug(data)}-{model}")
