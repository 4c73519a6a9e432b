"""Default recipes: which network and schedule a dataset gets when the user
does not say. `cli.py distill` with no teacher trains one with these.

Sizes are chosen for the machine each dataset is meant for: toys finish on a
laptop CPU in a few minutes, fashion-mnist in about an hour of CPU, cifar10
and imagefolder data are GPU jobs (the paper's scale).

QUICK_* recipes serve the no-argument main job (`python cli.py distill`): a
smaller teacher and student schedule on toy:checkerboard, sized by
measurement so that the whole job (teacher, student, evaluation) takes under
three minutes on two CPU cores while the 1-step student still clearly beats
the teacher's own 1-step Euler. `--recipe full` selects the full recipes.

Where files live (one rule): datasets, default teachers, FID statistics and
Inception weights under the data root, which is $TTFM_DATA when set, else
./data relative to the working directory; `--data-dir` adds a folder that is
searched first for datasets. Runs go to ./runs unless --out says otherwise.
"""
from __future__ import annotations

import os

DATA_DIR = None          # tests may set this; None: the rule in data_root()
RUNS_DIR = "runs"


def data_root() -> str:
    """$TTFM_DATA, else ./data (relative to the working directory), as an absolute path."""
    return os.path.abspath(DATA_DIR or os.environ.get("TTFM_DATA") or "data")

TEACHER_RECIPES = {
    # toys: 12000 steps and EMA 0.999 (4000 / 0.995 drew toy:spirals as a filled disc: 2-D histogram TV
    # 0.42 against a two-sample floor of 0.20; now 0.25). docs/results.md, experiments/toy_teachers.py
    "toy":           dict(model="mlp", steps=12000, batch_size=512, lr=2e-3, warmup=100, ema_decay=0.999),
    "fashion-mnist": dict(model="small", steps=1500, batch_size=32, lr=4e-4, warmup=100, ema_decay=0.995),
    "cifar10":       dict(model="cifar10", steps=400_000, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999),
    "imagefolder":   dict(model="celebahq64", steps=400_000, batch_size=64, lr=2e-4, warmup=5000, ema_decay=0.9999),
}

# The no-argument main job (see the module docstring): sizes chosen by measurement.
QUICK_TEACHER_RECIPES = {
    "toy":           dict(model="mlp-small", steps=4000, batch_size=256, lr=3e-3, warmup=100, ema_decay=0.995),
}
QUICK_DISTILL_RECIPES = {
    "toy":           dict(steps=2000, batch_size=256, lr=2e-3, warmup=50, ema_decay=0.99),
}

DISTILL_RECIPES = {
    "toy":           dict(steps=2000, batch_size=512, lr=1e-3, warmup=100, ema_decay=0.99),
    "fashion-mnist": dict(steps=1000, batch_size=32, lr=2e-4, warmup=100, ema_decay=0.99),
    "cifar10":       dict(steps=200_000, batch_size=128, lr=1e-4, warmup=1000, ema_decay=0.999),
    "imagefolder":   dict(steps=200_000, batch_size=64, lr=1e-4, warmup=1000, ema_decay=0.999),
}

# imagefolder data follows its own resolution (imagefolder_resolution): images of up to 32 px train at
# their size (rounded down to a multiple of 4) with the CIFAR-10 network and schedules, larger ones at 64
# with the CelebA-HQ 64 network. (A 64x64 network on 32-pixel images upsamples them and needs ~5x the
# memory and time: 64 PNGs of 32x32 once picked it and were killed at 21 GB, issue 19.)
IMAGEFOLDER_SMALL = 32


def imagefolder_resolution(native: int) -> int:
    """The default --resolution for images whose smaller side is `native` pixels: up to 32 px their own
    size (a multiple of 4, at least 8: the CIFAR-10 U-Net halves it twice), else 64."""
    if native > IMAGEFOLDER_SMALL:
        return 64
    return max(8, native // 4 * 4)


# points:PATH.npy (your own (n, d) array, data.load_points) gets the toy recipes: the MLP and the
# 2-D-toy schedules (same objects, so a change to the toy recipe applies to points too)
TEACHER_RECIPES["points"] = TEACHER_RECIPES["toy"]
DISTILL_RECIPES["points"] = DISTILL_RECIPES["toy"]


def family(data: str) -> str:
    """toy:moons -> toy, imagefolder:/x -> imagefolder, points:/x.npy -> points, cifar10 -> cifar10."""
    head = data.split(":", 1)[0]
    if head not in TEACHER_RECIPES:
        raise ValueError(f"unknown dataset {data!r}: use toy:checkerboard, toy:moons, toy:8gaussians, "
                         "toy:spirals, points:PATH.npy, fashion-mnist, cifar10 or imagefolder:PATH")
    return head


def slug(data: str) -> str:
    """A file-name-safe name of a dataset (imagefolder paths become their last folder name)."""
    if data.startswith("imagefolder:"):
        return "imagefolder-" + os.path.basename(os.path.normpath(data.split(":", 1)[1]))
    if data.startswith("points:"):
        # file stem + a hash of the absolute path: two a.npy in different folders get different teachers
        import zlib
        path = os.path.abspath(data.split(":", 1)[1])
        stem = os.path.splitext(os.path.basename(path))[0]
        return f"points-{stem}-{zlib.crc32(path.encode()):08x}"
    return data.replace(":", "-")


def _family_at(data: str, resolution: int | None) -> str:
    """The recipe family; imagefolder data of up to 32 px uses the CIFAR-10 recipes (see above)."""
    fam = family(data)
    if fam == "imagefolder" and resolution is not None and resolution <= IMAGEFOLDER_SMALL:
        return "cifar10"
    return fam


def teacher_recipe(data: str, quick: bool = False, resolution: int | None = None) -> dict:
    """The teacher recipe of a dataset (a copy); quick recipes exist for toys only.

    resolution: the image size of imagefolder data (pipeline.image_resolution), which picks the network.
    """
    fam = _family_at(data, resolution)
    table = QUICK_TEACHER_RECIPES if quick and fam in QUICK_TEACHER_RECIPES else TEACHER_RECIPES
    return dict(table[fam])


def distill_recipe(data: str, quick: bool = False, resolution: int | None = None) -> dict:
    fam = _family_at(data, resolution)
    table = QUICK_DISTILL_RECIPES if quick and fam in QUICK_DISTILL_RECIPES else DISTILL_RECIPES
    return dict(table[fam])


def default_teacher_dir(data: str, model: str, quick: bool = False) -> str:
    """Where `train` writes a teacher by default, and where `distill` looks for one."""
    return os.path.join(data_root(), "teachers", f"{slug(data)}-{model}" + ("-quick" if quick else ""))
