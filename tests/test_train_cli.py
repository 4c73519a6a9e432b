"""The training loop and the command line, end to end on tiny problems:
exact resume, NaN guard, clean stop on SIGTERM, train + sample + distill + eval."""
import json
import os
import signal

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from ttfm_np import ckpt, data, model, train
from ttfm_np.objectives import FlowMatchingObjective


def _run(out, steps, resume=False, objective=None, seed=3):
    ds = data.load_dataset("toy:moons", n=256)
    cfg = model.make_config("mlp-tiny", (2,))
    tcfg = train.TrainConfig(steps=steps, batch_size=32, lr=1e-2, warmup=3, ema_decay=0.9, seed=seed,
                             log_every=1, ckpt_every=0, dtype="float64")
    return train.train_loop(str(out), model_cfg=cfg, init_params=model.init_model(cfg, seed),
                            objective=objective or FlowMatchingObjective(cfg, sample_kind="toy"),
                            data_iter=data.BatchIterator(ds.data, 32, seed=seed), tcfg=tcfg,
                            run_config=dict(task="teacher", data="toy:moons"), resume=resume, progress=False)


def test_resume_is_exact(tmp_path):
    p_full, e_full, _ = _run(tmp_path / "full", 12)
    _run(tmp_path / "half", 6)
    tcfg_path = tmp_path / "half"
    p_res, e_res, step = _run(tcfg_path, 12, resume=True)
    assert step == 12
    for k in p_full:
        np.testing.assert_array_equal(p_res[k], p_full[k])
        np.testing.assert_array_equal(e_res[k], e_full[k])
    lines = [json.loads(l) for l in open(tmp_path / "half" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == list(range(1, 13))
    with pytest.raises(FileExistsError, match="--resume"):
        _run(tmp_path / "full", 12)                       # never overwrites a run silently


class _NaNAfter(FlowMatchingObjective):
    def __init__(self, cfg, bad_step):
        super().__init__(cfg, sample_kind="toy")
        self.calls, self.bad_step = 0, bad_step

    def loss_and_grads(self, *a):
        loss, g, m = super().loss_and_grads(*a)
        self.calls += 1
        if self.calls > self.bad_step:
            g["in.weight"][0, 0] = np.nan
        return loss, g, m


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
    cfg = model.make_config("mlp-tiny", (2,))
    _run(tmp_path, 4)
    good = ckpt.load_checkpoint(tmp_path / "checkpoint.h5")
    with pytest.raises(train.TrainingDiverged, match="step 5"):
        _run(tmp_path, 10, resume=True, objective=_NaNAfter(cfg, 1))
    after = ckpt.load_checkpoint(tmp_path / "checkpoint.h5")
    assert after["step"] == 4
    np.testing.assert_array_equal(after["params"]["in.weight"], good["params"]["in.weight"])


class _SignalAt(FlowMatchingObjective):
    def __init__(self, cfg, at):
        super().__init__(cfg, sample_kind="toy")
        self.calls, self.at = 0, at

    def loss_and_grads(self, *a):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().loss_and_grads(*a)


def test_sigterm_saves_and_stops(tmp_path):
    cfg = model.make_config("mlp-tiny", (2,))
    with pytest.raises(train.Interrupted) as info:
        _run(tmp_path, 50, objective=_SignalAt(cfg, 3))
    assert info.value.step == 3 and info.value.exit_code == 143
    assert ckpt.load_checkpoint(tmp_path / "checkpoint.h5")["step"] == 3
    assert _run(tmp_path, 6, resume=True)[2] == 6


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    _run(tmp_path, 4)
    with open(tmp_path / "metrics.jsonl", "a") as f:        # a crash after logging steps 5, 6 but before saving
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + json.dumps({"step": 6, "loss": 1.0}) + "\n")
    _run(tmp_path, 6, resume=True)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cli_train_sample_distill_eval(tmp_path):
    r = CliRunner()
    t = tmp_path / "teacher"
    res = r.invoke(cli.cli, ["train", "--data", "toy:moons", "--model", "mlp-tiny", "--steps", "30",
                             "--batch-size", "64", "--out", str(t)])
    assert res.exit_code == 0, res.output
    png = tmp_path / "s.png"
    res = r.invoke(cli.cli, ["sample", "--ckpt", str(t), "--steps", "4", "--solver", "heun", "--n", "50", "--out", str(png)])
    assert res.exit_code == 0, res.output
    assert png.stat().st_size > 1000
    s = tmp_path / "student"
    res = r.invoke(cli.cli, ["distill", "--data", "toy:moons", "--teacher", str(t / "checkpoint.h5"), "--steps", "20",
                             "--batch-size", "64", "--out", str(s), "--eval-steps", "1,2", "--eval-n", "64"])
    assert res.exit_code == 0, res.output
    assert "student 1-step" in res.output
    rows = json.load(open(s / "eval" / "eval.json"))["rows"]
    assert {r_["method"] for r_ in rows} >= {"student 1-step", "teacher euler 2", "teacher heun 1"}
    assert (s / "eval" / "samples.png").exists()
    # bad input gets named
    res = r.invoke(cli.cli, ["sample", "--ckpt", str(tmp_path / "none.h5"), "--out", str(png)])
    assert res.exit_code != 0 and "does not exist" in res.output
    res = r.invoke(cli.cli, ["eval", "--teacher", str(t), "--steps", "0,2"])
    assert res.exit_code != 0 and ">= 1" in res.output
    res = r.invoke(cli.cli, ["distill", "--data", "toy:spirals", "--teacher", str(t / "checkpoint.h5"), "--steps", "2"])
    assert res.exit_code != 0 and "trained on toy:moons" in res.output
    res = r.invoke(cli.cli, ["distill", "--teacher", str(s / "checkpoint.h5"), "--data", "toy:moons"])
    assert res.exit_code != 0 and "two-timed student" in res.output
    res = r.invoke(cli.cli, ["train", "--data", "toy:moons", "--model", "small"])
    assert res.exit_code != 0 and "use --model mlp" in res.output
    res = r.invoke(cli.cli, ["train", "--data", "toy:moons", "--device", "gpu", "--steps", "1", "--out", str(tmp_path / "g")])
    from ttfm_np import backend
    if backend.gpu_problem() is None:                        # a usable GPU: the run happens on it
        assert res.exit_code == 0, res.output
    else:                                                    # none: a clear error naming the option, not a CPU run
        assert res.exit_code != 0 and "--device gpu" in res.output and not (tmp_path / "g" / "checkpoint.h5").exists()


def test_distilled_student_beats_teacher_euler_at_one_step(tmp_path):
    """A tiny teacher on a 2-D toy, distilled with ITVM: the 1-step student lands
    closer to the teacher's reference ODE solution than 1-step Euler does."""
    r = CliRunner()
    t, s = tmp_path / "t", tmp_path / "s"
    assert r.invoke(cli.cli, ["train", "--data", "toy:8gaussians", "--model", "mlp-tiny", "--steps", "400",
                              "--batch-size", "256", "--out", str(t)]).exit_code == 0
    res = r.invoke(cli.cli, ["distill", "--data", "toy:8gaussians", "--teacher", str(t), "--steps", "400",
                             "--batch-size", "256", "--lr", "3e-3", "--ema-decay", "0.95", "--out", str(s),
                             "--eval-steps", "1", "--eval-n", "512", "--frac-t1", "0.5"])
    assert res.exit_code == 0, res.output
    rows = {row["method"]: row for row in json.load(open(s / "eval" / "eval.json"))["rows"]}
    assert rows["student 1-step"]["mse"] < 0.5 * rows["teacher euler 1"]["mse"], rows


def test_distill_without_teacher_trains_one_first(tmp_path, monkeypatch):
    """`distill` with no --teacher looks at the default path and trains a teacher there when none exists."""
    from ttfm_np import recipes
    monkeypatch.setattr(recipes, "DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setitem(recipes.TEACHER_RECIPES, "toy", dict(model="mlp-tiny", steps=20, batch_size=64, lr=1e-3,
                                                             warmup=2, ema_decay=0.9))
    monkeypatch.setitem(recipes.DISTILL_RECIPES, "toy", dict(steps=10, batch_size=64, lr=1e-3, warmup=2, ema_decay=0.9))
    r = CliRunner()
    args = ["distill", "--data", "toy:spirals", "--recipe", "full", "--out", str(tmp_path / "s"),
            "--eval-steps", "1", "--eval-n", "32"]
    res = r.invoke(cli.cli, args)
    assert res.exit_code == 0, res.output
    assert "training one with the toy recipe" in res.output
    teacher = tmp_path / "data" / "teachers" / "toy-spirals-mlp-tiny" / "checkpoint.h5"
    assert ckpt.load_checkpoint(teacher)["step"] == 20
    res = r.invoke(cli.cli, args[:-4] + ["--out", str(tmp_path / "s2"), "--eval-steps", "1", "--eval-n", "32"])
    assert res.exit_code == 0 and "training one" not in res.output           # reused the second time


def test_image_teacher_train_and_sample_grid(tmp_path, rng):
    from PIL import Image
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)).save(imgs / f"{i}.png")
    r = CliRunner()
    res = r.invoke(cli.cli, ["train", "--data", f"imagefolder:{imgs}", "--model", "tiny", "--resolution", "16",
                             "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert len(os.listdir(tmp_path / "t" / "samples")) == 1             # end-of-run picture
    png = tmp_path / "grid.png"
    res = r.invoke(cli.cli, ["sample", "--ckpt", str(tmp_path / "t"), "--steps", "2", "--n", "4", "--out", str(png)])
    assert res.exit_code == 0, res.output
    with Image.open(png) as im:
        assert im.size == (2 * (2 * 18 + 2), 2 * (2 * 18 + 2)) and im.mode == "RGB"   # 2x2 grid of 16px + 2px pads, upscaled 2x


def test_plot_metrics(tmp_path):
    _run(tmp_path, 12)
    r = CliRunner()
    png = tmp_path / "loss.png"
    res = r.invoke(cli.cli, ["plot-metrics", str(tmp_path), "--smooth", "3", "--out", str(png)])
    assert res.exit_code == 0, res.output
    from PIL import Image
    with Image.open(png) as im:
        assert im.size == (640, 360)
    res = r.invoke(cli.cli, ["plot-metrics", str(tmp_path), "--key", "nope", "--out", str(png)])
    assert res.exit_code != 0 and "nope" in res.output
