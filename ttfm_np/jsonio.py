"""JSON files people and other programs read: strict on the way out, precise errors on the way in.

    rows = read_jsonl("runs/x/metrics.jsonl")       # list of dicts; ValueError names a bad line by number
    with open("eval.json", "w") as f:
        dump_json(result, f, indent=2, note="psnr is +inf when ...")

JSON has no Infinity or NaN. Python's json module writes them anyway
(`Infinity`, `NaN`), which other JSON readers (jq, JavaScript, pandas with
strict parsers) reject. dump_json writes each non-finite number as null and,
when there were any, adds a top-level "non_finite_as_null" entry saying which
values were replaced and what they were, so nothing is lost silently.

read_jsonl reads one JSON object per line (blank lines skipped). Python's
reader accepts NaN/Infinity, which a training log may hold for a diverged loss.
"""
from __future__ import annotations

import json
import math

import numpy as np

NULL_NOTE_KEY = "non_finite_as_null"


def read_jsonl(path) -> list:
    """Every line of a JSON-lines file as a dict; ValueError naming the file and line number of a bad line."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number} is not JSON ({exc.msg} at column {exc.colno}): "
                                 f"{line.strip()[:80]!r}; repair or delete that line (a run killed while "
                                 "writing leaves a cut-off last line)") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number} is JSON but not an object ({type(row).__name__}): "
                                 f"{line.strip()[:80]!r}; each line must be one {{...}} record")
            rows.append(row)
    return rows


def finite_or_null(obj, where: str = "") -> tuple:
    """(a copy of obj with every non-finite float replaced by None, {location: "inf"/"-inf"/"nan"}).

    Recurses into dicts, lists and tuples; numpy scalars become Python numbers.
    Locations read like `rows[2].psnr`.
    """
    replaced = {}

    def walk(value, at):
        if isinstance(value, dict):
            return {k: walk(v, f"{at}.{k}" if at else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            replaced[at] = repr(value)         # 'inf', '-inf', 'nan'
            return None
        return value
    return walk(obj, where), replaced


def dump_json(obj, fp, note: str | None = None, **kwargs) -> dict:
    """json.dump that writes strict JSON: non-finite numbers become null, recorded under "non_finite_as_null".

    note: why such values occur (written beside the list). Returns the replaced locations.
    """
    clean, replaced = finite_or_null(obj)
    if replaced:
        if not isinstance(clean, dict):
            raise ValueError("dump_json records replaced values in a top-level object; pass a dict")
        clean[NULL_NOTE_KEY] = {"why": "JSON has no Infinity/NaN: these values are written as null"
                                       + (f"; {note}" if note else ""),
                                "values": replaced}
    json.dump(clean, fp, allow_nan=False, **kwargs)
    return replaced
