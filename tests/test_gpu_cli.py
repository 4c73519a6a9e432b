"""The CLI with --device gpu, end to end: train, distill with each loss, sample, eval.

Where no GPU is present this runs on the CuPy stand-in (in-process through
click's CliRunner, so tests/conftest.py's choice applies): every CuPy branch the
commands reach runs, including the CUDA kernels through the emulator, and a host
array slipping into device code is an error. A 2-D toy with the tiny MLP, and a
16x16 image folder with the tiny U-Net (GroupNorm, conv, attention kernels), then
`fid --ckpt` of that student with a small stand-in feature network on the device
(the real Inception on the GPU path is tests/test_inception.py's; 299x299 convolutions
through the emulator are too slow for every run).
"""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli
import conftest
from ttfm_np import backend, ckpt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.gpu_available(), reason=f"no usable GPU: {backend.gpu_problem()}")]


@pytest.fixture
def launches():
    """Kernel launches by name on the stand-in (zeroed); None on real CuPy, which does not count them."""
    if not conftest.USING_CUPY_STANDIN:
        return None
    import cupy
    cupy._standin.reset_counters()
    return cupy._standin.counters["launches_by_kernel"]


def _ok(res):
    assert res.exit_code == 0, res.output + (repr(res.exception) if res.exception else "")
    return res


@pytest.fixture
def runner():
    yield CliRunner()
    backend.select_device("cpu")                  # the commands selected the GPU; later tests expect the CPU


def test_toy_train_distill_each_loss_sample_eval_on_gpu(tmp_path, runner, launches):
    t = tmp_path / "teacher"
    _ok(runner.invoke(cli.cli, ["train", "--data", "toy:moons", "--model", "mlp-tiny", "--steps", "3",
                                "--batch-size", "32", "--out", str(t), "--device", "gpu"]))
    assert launches is None or launches.get("adam_update", 0) > 0           # the fused kernels ran
    state = ckpt.load_checkpoint(str(t / "checkpoint.h5"))
    assert state["step"] == 3 and isinstance(state["params"]["emb.fc0.weight"], np.ndarray)
    for loss in ("itvm", "lfmd", "ecd", "meanflow"):               # lfmd: the default --lfmd-derivative jvp
        s = tmp_path / f"student-{loss}"
        _ok(runner.invoke(cli.cli, ["distill", "--data", "toy:moons", "--teacher", str(t), "--loss", loss,
                                    "--steps", "2", "--batch-size", "32", "--out", str(s), "--device", "gpu",
                                    "--eval-steps", "1,2", "--eval-n", "64", "--eval-n-ref", "8"]))
        lines = [json.loads(x) for x in (s / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert lines[-1]["step"] == 2 and np.isfinite(lines[-1]["loss"]), loss
    s = tmp_path / "student-itvm"
    _ok(runner.invoke(cli.cli, ["sample", "--ckpt", str(s), "--steps", "2", "--n", "50",
                                "--out", str(tmp_path / "s.png"), "--device", "gpu"]))
    assert (tmp_path / "s.png").stat().st_size > 0
    _ok(runner.invoke(cli.cli, ["eval", "--teacher", str(t), "--student", str(s / "checkpoint.h5"), "--steps", "1,2",
                                "--n", "64", "--n-ref", "8", "--out", str(tmp_path / "ev"), "--device", "gpu"]))
    rows = json.loads((tmp_path / "ev" / "eval.json").read_text())["rows"]
    assert any(r["method"].startswith("student") for r in rows)


def test_image_train_and_distill_on_gpu_with_the_unet(tmp_path, runner, launches, monkeypatch):
    from ttfm_np import objectives
    real = objectives._fixed_noise                 # progress pictures of 4 samples, not 64 (emulated kernels are slow)
    monkeypatch.setattr(objectives, "_fixed_noise", lambda *a: real(*a)[:4])
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = f"imagefolder:{folder}"
    t = tmp_path / "teacher"
    _ok(runner.invoke(cli.cli, ["train", "--data", data, "--resolution", "16", "--model", "tiny", "--steps", "2",
                                "--batch-size", "4", "--out", str(t), "--device", "gpu"]))
    assert launches is None or {"groupnorm_fwd", "groupnorm_bwd", "im2col", "col2im"} <= set(launches)
    _ok(runner.invoke(cli.cli, ["distill", "--data", data, "--teacher", str(t),
                                "--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "s"), "--device", "gpu",
                                "--eval-steps", "1", "--eval-n", "4", "--eval-n-ref", "2"]))
    # fid: samples and features on the device, statistics summed there (fid.FeatureStats)
    from ttfm_np import fid, inception
    monkeypatch.setattr(inception, "load_inception", lambda *a, **k: _DeviceFeatures())
    ref = tmp_path / "ref.npz"
    fid.save_stats(str(ref), np.zeros(6), np.eye(6), 100, "test")
    res = _ok(runner.invoke(cli.cli, ["fid", "--ckpt", str(tmp_path / "s"), "--ref", str(ref), "--n", "8",
                                      "--batch-size", "4", "--device", "gpu"]))
    assert "fid" in res.output.lower()


class _DeviceFeatures:
    """6 features per image (in place of Inception's 2048), computed on the GPU, where the network
    lives: like InceptionV3FID, it moves a host batch there first (sampling.sample returns host arrays)."""

    def device_features(self, x):
        xp = backend.get_xp()
        assert backend.is_cupy(xp), "--device gpu: the feature network must live on the GPU"
        x = backend.to_device(x, xp)
        return x.reshape(x.shape[0], 3, -1).mean(axis=2).repeat(2, axis=1).astype(xp.float64) * [1, 2, 3, 4, 5, 6]

    def features(self, x):
        return backend.to_numpy(self.device_features(x))
