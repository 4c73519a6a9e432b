"""The experiment scripts' selection and verdict logic (experiments/study_toys.py) and their
command lines, so the scripts behind docs/results.md cannot rot unnoticed. The result rows
here are made up: the tests check what the scripts compute from rows, not any result."""
import importlib.util
import math
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def _load(name):
    sys.path.insert(0, EXPERIMENTS)                       # the scripts import their shared runner.py
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(EXPERIMENTS)


@pytest.fixture(scope="module")
def study():
    return _load("study_toys")


def _row(stage, toy, loss, cfg_id, seed, mse1, mse2):
    return dict(key=f"{stage}/{toy}/{loss}/{cfg_id}/{seed}", stage=stage, toy=toy, loss=loss, cfg_id=cfg_id,
                seed=seed, rows={"1": dict(mse=mse1, tv=0.3), "2": dict(mse=mse2, tv=0.3),
                                 "4": dict(mse=mse2, tv=0.3), "8": dict(mse=mse2, tv=0.3)})


def _results(study, rng):
    """Tuning rows where each loss's variation 0 has the best score, and final rows for them."""
    rows = []
    for loss in study.GRIDS:
        for toy in study.TOYS:
            for i in range(len(study.GRIDS[loss])):
                rows.append(_row("tune", toy, loss, i, 100, 1e-2 * (2 + i), 1e-2 * (2 + i)))
            for i in range(len(study.ABLATIONS[loss])):
                best = 0.5e-2 if i == 0 else 5e-2
                rows.append(_row("ablate", toy, loss, i, 100, best, best))
    # ITVM beats LFMD and MeanFlow, loses to ECD (and LFMD-jvp)
    centre = {"itvm": 1.0e-2, "lfmd": 2.0e-2, "ecd": 0.5e-2, "lfmd-jvp": 0.6e-2, "meanflow": 3.0e-2}
    for loss, c in centre.items():
        for toy in study.TOYS:
            for seed in study.FINAL_SEEDS:
                m = c * (1 + 0.02 * rng.standard_normal())
                rows.append(_row("final_ablate", toy, loss, 0, seed, m, m))
    return {r["key"]: r for r in rows}


def test_selection_takes_the_best_score_over_grid_and_variations(study, rng):
    results = _results(study, rng)
    for loss in study.GRIDS:
        assert study.selected(results, loss) == ("final_ablate", 0)
        # the score is the mean over toys of log10 MSE(1) + log10 MSE(2)
        assert study.score(results, loss, 0, "ablate") == pytest.approx(2 * math.log10(0.5e-2))
    del results["ablate/moons/lfmd/0/100"]                 # an incomplete variation is not selectable
    assert study.selected(results, "lfmd") == ("final", 0)


def test_verdicts_compute_z_from_the_seed_standard_errors(study, rng):
    results = _results(study, rng)
    text = study.verdicts(results)
    line = next(l for l in text.splitlines() if l.startswith("| moons | 1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    header = [c.strip() for c in next(l for l in text.splitlines() if l.startswith("| toy |")).strip("|").split("|")]
    assert header.count("LFMD") == header.count("ECD") == header.count("MEANFLOW") == 1      # every tuned baseline
    at = {name: header.index(name) for name in ("LFMD", "ECD")}
    vals = {loss: [r["rows"]["1"]["mse"] for r in results.values()
                   if r.get("stage") == "final_ablate" and r["toy"] == "moons" and r["loss"] == loss]
            for loss in ("itvm", "lfmd", "ecd")}
    mean = {k: np.mean(v) for k, v in vals.items()}
    se = {k: np.std(v, ddof=1) / np.sqrt(len(v)) for k, v in vals.items()}
    z_lfmd = (mean["lfmd"] - mean["itvm"]) / math.hypot(se["itvm"], se["lfmd"])
    z_ecd = (mean["ecd"] - mean["itvm"]) / math.hypot(se["itvm"], se["ecd"])
    assert float(cells[at["LFMD"] + 1]) == pytest.approx(z_lfmd, abs=0.051) and cells[at["LFMD"] + 2] == "**ITVM beats**"
    assert float(cells[at["ECD"] + 1]) == pytest.approx(z_ecd, abs=0.051) and cells[at["ECD"] + 2] == "**ITVM loses**"


def test_report_lists_every_final_setting(study, rng):
    text = study.report(_results(study, rng))
    for loss in study.GRIDS:
        assert f"| checkerboard | {loss} (variation 0, 3 seeds) |" in text
    assert "| itvm | variation 2: " in text                # the uniform-gap variation is in the tuning table


@pytest.mark.parametrize("script, command", [("study_toys", ["tune", "--help"]), ("study_toys", ["report", "--help"]),
                                             ("distill_fashion", ["run", "--help"]),
                                             ("distill_fashion", ["report", "--help"])])
def test_experiment_command_lines_parse(script, command):
    module = _load(script)
    result = CliRunner().invoke(module.cli, command)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_a_grid_entry_may_set_its_own_learning_rate(study, monkeypatch, tmp_path):
    """MeanFlow's grid tunes the learning rate ("lr" key); the other entries run at the study's --lr."""
    seen = []

    class Done:
        checkpoint = "ckpt"
    monkeypatch.setattr(study.pipeline, "distill", lambda *a, **k: seen.append((k["loss"], k["lr"])) or Done())
    with_lr = next(c for c in study.GRIDS["meanflow"] if "lr" in c)
    for cfg in (study.GRIDS["meanflow"][0], with_lr):
        study.run_cell("teacher", "moons", "meanflow", cfg, 0, 1, 8, 1e-3, str(tmp_path / "cell"))
    assert [lr for _, lr in seen] == [1e-3, with_lr["lr"]] and with_lr["lr"] != 1e-3
    assert all(opts.loss == "meanflow" and not hasattr(opts, "lr") for opts, _ in seen)
