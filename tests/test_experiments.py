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
                seed=seed, rows={"1": dict(mse=mse1, tv=0.3 + mse1), "2": dict(mse=mse2, tv=0.3 + mse2),
                                 "4": dict(mse=mse2, tv=0.3 + mse2), "8": dict(mse=mse2, tv=0.3 + mse2)})


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


def test_each_metric_selects_its_own_setting(study, rng):
    """Selection on the distribution distance (tv: mean of TV(1) + TV(2), no log) can differ from the
    one on the per-sample distance; finals run the union of both picks, once each."""
    results = _results(study, rng)
    for key, r in results.items():                       # grid 1 of ITVM has the best TV on every toy
        if r["stage"] == "tune" and r["loss"] == "itvm" and r["cfg_id"] == 1:
            for n in ("1", "2"):
                r["rows"][n] = dict(r["rows"][n], tv=0.1)
    assert study.selected(results, "itvm", "mse") == ("final_ablate", 0)
    assert study.selected(results, "itvm", "tv") == ("final", 1)
    assert study.score(results, "itvm", 1, "tune", "tv") == pytest.approx(0.2)
    picks = study.final_picks(results, ["itvm", "lfmd"])
    assert picks == {("itvm", "final_ablate", 0): ["mse"], ("itvm", "final", 1): ["tv"],
                     ("lfmd", "final_ablate", 0): ["mse", "tv"]}


def test_verdict_tables_per_metric(study, rng):
    results = _results(study, rng)
    for r in results.values():                           # ITVM's samples the worst by TV
        if r["stage"] == "final_ablate":
            for n in r["rows"]:
                r["rows"][n] = dict(r["rows"][n], tv=(0.5 if r["loss"] == "itvm" else 0.3) + 0.01 * rng.random())
    mse, tv = study.verdicts(results, metric="mse"), study.verdicts(results, metric="tv")
    assert "per sample" in mse and "distribution" in tv
    line = next(l for l in tv.splitlines() if l.startswith("| moons | 1 |"))
    assert line.count("**ITVM loses**") == 4 and "**ITVM beats**" not in line


def test_updates_to_target_interpolates_in_log_updates(study):
    us, vs = [150, 300, 600, 1200], [0.8, 0.4, 0.2, 0.1]
    assert study.updates_to(us, vs, 0.4) == pytest.approx(300)
    assert study.updates_to(us, vs, 0.3) == pytest.approx(math.exp((math.log(300) + math.log(600)) / 2))
    assert study.updates_to(us, vs, 0.9) == 150 and study.updates_to(us, vs, 0.05) is None


def test_curve_table_reports_updates_and_seconds_to_itvms_quality(study, rng):
    results = _results(study, rng)
    for r in list(results.values()):
        if r["stage"] == "final_ablate":              # ITVM halves its MSE per doubling; LFMD 2x faster; ECD flat
            scale = {"itvm": 1.0, "lfmd": 0.5}.get(r["loss"], 0.5)
            r["curve"] = {str(u): {"1": dict(mse=scale * 150 / u, tv=0.3)} for u in (150, 300, 600, 1200)}
            if r["loss"] == "ecd":
                r["curve"] = {str(u): {"1": dict(mse=0.9, tv=0.3)} for u in (150, 300, 600, 1200)}
    results["timing/itvm"] = dict(key="timing/itvm", stage="timing", loss="itvm", ms_per_update=10.0)
    results["timing/lfmd"] = dict(key="timing/lfmd", stage="timing", loss="lfmd", ms_per_update=20.0)
    text = study.curve_table(results, "mse", steps=600)

    def cells(loss):
        line = next(l for l in text.splitlines() if l.startswith(f"| moons | {loss} |"))
        return [c.strip() for c in line.strip("|").split("|")]
    # target = ITVM at 600 updates = 0.25: ITVM reaches it at 600 (6 s), LFMD at 300 (6 s at 20 ms), ECD never
    assert cells("itvm")[-3] == "2.50e-01" and float(cells("itvm")[-2]) == pytest.approx(600)
    assert float(cells("itvm")[-1]) == pytest.approx(6.0)
    assert float(cells("lfmd")[-2]) == pytest.approx(300) and float(cells("lfmd")[-1]) == pytest.approx(6.0)
    assert cells("ecd")[-2] == "> 1200" and cells("ecd")[-1] == "-"          # no timing row for ECD


def test_run_cell_evaluates_the_curve_on_one_resumed_run(study, monkeypatch, tmp_path):
    """The curve is one run trained in segments (resume), the row's checkpoint the one after --steps."""
    calls = []

    class Done:
        def __init__(self, out, steps):
            self.checkpoint = os.path.join(out, "checkpoint.h5")
            with open(self.checkpoint, "w") as f:
                f.write(str(steps))

    def distill(data, **k):
        os.makedirs(k["out"], exist_ok=True)
        calls.append((k["steps"], k["resume"]))
        return Done(k["out"], k["steps"])
    monkeypatch.setattr(study.pipeline, "distill", distill)
    ckpt, spu, evals = study.run_cell("teacher", "moons", "itvm", study.GRIDS["itvm"][0], 0, 600, 8, 1e-3,
                                      str(tmp_path / "cell"), curve=(150, 1200), evaluate=lambda c: open(c).read())
    assert calls == [(150, False), (600, True), (1200, True)]
    assert evals == {150: "150", 600: "600", 1200: "1200"} and open(ckpt).read() == "600" and spu > 0
