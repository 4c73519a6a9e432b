"""Content hashes of a run's input files, so a resume (or an evaluation) notices changed contents.

    hashes = input_hashes("points:my.npy", teacher="runs/t/checkpoint.h5")
    # {"data": "sha256 of my.npy", "teacher": "sha256 of the teacher file"}
    check_unchanged(saved_config.get("inputs"), hashes, "runs/x/checkpoint.h5")   # ValueError: old -> new

A path says where an input was, not what it held: replacing the rows of a
points: file, or the teacher's checkpoint.h5 (retrained in place), behind a run's
back would let `--resume` continue on other data or another teacher silently.
The run config therefore records the sha256 of every input file:

    data     points:PATH   the .npy file
             images        every source file (data.source_files), in name order:
                           sha256 over (relative name, sha256 of the file) pairs
             toy:NAME      nothing (generated from the seed)
    teacher  distillation  the teacher checkpoint file

Hashing reads every byte once (about 1 GB/s): CIFAR-10's tarball adds a fraction
of a second to a start.
"""
from __future__ import annotations

import hashlib
import os

from . import data as datasets

_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def data_files(data: str, data_dir: str | None = None) -> list:
    """The files a dataset is read from ([] for generated toys)."""
    if data.startswith("points:"):
        return [data.split(":", 1)[1]]
    return datasets.source_files(data, data_dir=data_dir) or []


def data_hash(data: str, data_dir: str | None = None) -> str | None:
    files = data_files(data, data_dir)
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    root = os.path.commonpath([os.path.abspath(f) for f in files])
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{os.path.relpath(os.path.abspath(f), root)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def input_hashes(data: str, data_dir: str | None = None, teacher: str | None = None) -> dict:
    """{"data": sha256 or None, "teacher": sha256 (when a teacher file is given)}."""
    hashes = {"data": data_hash(data, data_dir)}
    if teacher is not None:
        hashes["teacher"] = sha256_file(teacher)
    return hashes


WHAT = {"data": "the data file(s)", "teacher": "the teacher checkpoint"}


def changes(saved: dict | None, current: dict) -> list:
    """['the teacher checkpoint: 1a2b3c4d5e6f -> 9f8e7d6c5b4a', ...]; inputs a checkpoint did not record pass."""
    saved = saved or {}
    out = []
    for key, new in current.items():
        old = saved.get(key)
        if old is not None and new is not None and old != new:
            out.append(f"{WHAT.get(key, key)}: sha256 {old[:12]} -> {new[:12]}")
    return out


def check_unchanged(saved: dict | None, current: dict, checkpoint: str, names: dict | None = None):
    """ValueError naming every input whose contents differ from what the run at `checkpoint` recorded."""
    diffs = changes(saved, current)
    if diffs:
        named = "; ".join(diffs)
        where = f" ({', '.join(f'{k}: {v}' for k, v in (names or {}).items())})" if names else ""
        raise ValueError(f"cannot resume {checkpoint}: the contents of its inputs changed since it was started "
                         f"({named}){where}. Restore the original files, or start a new run with another --out.")
