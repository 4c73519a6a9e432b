"""benchmarks/gpu_check.sh, run end to end in its dry-run mode (GPU_CHECK_DRY=1: the CuPy stand-in
plays the GPU, tiny sizes), and the $OUT contract the GPU machines impose: at most 8 files, each
under 16 MiB, at most 2 folders deep, names of letters, digits, '.', '_', '-' only; a summary JSON
in which every stage has its result or an explicit error. Plus the pieces the real run relies on:
the peak table by device name, the GEMM counter, the junit parser."""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

MAX_FILES, MAX_BYTES, MAX_DEPTH = 8, 16 * 2 ** 20, 2
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def check_out_contract(out):
    """The rules for what comes back from a GPU machine; returns the file list."""
    files = []
    for dirpath, dirnames, filenames in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        assert depth <= MAX_DEPTH, f"{dirpath} is more than {MAX_DEPTH} folders deep"
        for name in dirnames + filenames:
            assert NAME.match(name), f"{name!r} has characters outside [A-Za-z0-9._-]"
        for name in filenames:
            path = os.path.join(dirpath, name)
            assert not os.path.islink(path), f"{path} is a link"
            assert os.path.getsize(path) < MAX_BYTES, f"{path} is {os.path.getsize(path)} bytes"
            files.append(os.path.relpath(path, out))
    assert 0 < len(files) <= MAX_FILES, files
    return files


@pytest.mark.slow
def test_dry_run_fills_out_within_the_contract(tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("the dry run's CuPy stand-in runs kernels in the CUDA emulator, which needs g++")
    pytest.importorskip("torch", reason="the dry run times the PyTorch reference on the CPU")
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY="1", OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path))
    env.pop("TTFM_CUPY_STANDIN", None)
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = check_out_contract(out)
    assert sorted(files) == ["rest.tar.gz", "summary.json", "summary.md"], files
    assert not [p for p in os.listdir(tmp_path) if p.startswith("gpu_check.")], "the work folder was left behind"

    s = json.loads((out / "summary.json").read_text())
    assert s["dry_run"] is True
    assert set(s["stages"]) == set(gpu_check.STAGES)
    for name, stage in s["stages"].items():
        assert "rc" in stage and "wall_s" in stage, (name, stage)
        assert stage["rc"] == 0 or stage.get("error"), (name, stage)     # a failure always says why
    assert s["device"]["name"].startswith("CuPy stand-in")
    assert "nvidia_smi" in s["device"]                                    # 'error: ...' here: no driver
    p = s["pytest"]
    assert p["tests"] > 0 and p["passed"] == p["tests"] and p["failed"] == [], p
    st = s["steps"]
    assert st["preset"] == "tiny" and st["batch"] == 2 and st["tf32_check"]["tf32_effective"] is True
    assert "H100" not in str(st["peak_fp32_tf32_tflops_hbm_tbs"]) and "error" in str(st["peak_fp32_tf32_tflops_hbm_tbs"])
    rows = {(r["objective"], r["precision"]): r for r in st["rows"]}
    assert set(rows) == {(k, m) for k in gpu_check.KINDS for m in ("fp32", "tf32")}
    for key, r in rows.items():
        assert ("ours_s" in r and r["gemm_gflop"] > 0 and "torch_s" in r) or r.get("error"), (key, r)
    assert rows[("teacher", "fp32")].get("ours_s"), "at least the first row must have been measured"
    # the counted FLOPs: the same passes in fp32 and tf32; ITVM's is 10 forwards = 10/3 of the teacher's step
    t, i = rows[("teacher", "fp32")], rows[("itvm", "fp32")]
    if "gemm_gflop" in i:
        assert i["gemm_gflop"] / t["gemm_gflop"] == pytest.approx(10 / 3, rel=0.01)
    for key, mem in s["standin_memory"].items():
        assert mem["at_batch"] > 0, (key, mem)
    md = (out / "summary.md").read_text()
    assert "DRY RUN" in md and "| itvm | tf32 |" in md
    with tarfile.open(out / "rest.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("pytest_junit.xml") for n in names) and any(n.endswith("steps.json") for n in names)


def test_peak_table_knows_the_lent_cards():
    assert gpu_check.peak_of("NVIDIA H100 80GB HBM3") == (67.0, 494.7, 3.35)    # SXM5: the name says no "SXM"
    assert gpu_check.peak_of("NVIDIA H100 PCIe")[:2] == (51.0, 378.0)
    assert gpu_check.peak_of("NVIDIA H100 NVL")[:2] == (60.0, 417.5)
    assert gpu_check.peak_of("NVIDIA H200")[:2] == (67.0, 494.7)
    assert gpu_check.peak_of("NVIDIA H200 NVL")[:2] == (60.0, 417.5)
    assert gpu_check.peak_of("NVIDIA A100-SXM4-80GB")[:2] == (19.5, 156.0)
    assert gpu_check.peak_of("NVIDIA GeForce RTX 4090") is None


def test_model_prediction_for_the_itvm_step():
    """docs/performance.md: ITVM on cifar10 at batch 128 counts 51.56 TFLOP and 482.7 GB of GEMM operands;
    on an H100 SXM at 40 % of the TF32 peak and 60 % of HBM that is 0.50 s."""
    h100 = gpu_check.peak_of("NVIDIA H100 80GB HBM3")
    t = gpu_check.predicted_seconds(51.56e12, 482.7e9, h100, "tf32")
    assert t == pytest.approx(51.56e12 / (0.4 * 494.7e12) + 482.7e9 / (0.6 * 3.35e12)) and 0.49 < t < 0.51


def test_gemm_counter_counts_2mnk_and_restores(rng):
    from ttfm_np import conv, linear, parallel, precision
    totals = dict(flops=0.0, bytes=0.0, calls=0)
    x, W = rng.standard_normal((5, 7)), rng.standard_normal((3, 7))
    parallel.set_workers(1)              # one block of samples: the conv is one GEMM (the GPU never splits)
    try:
        with gpu_check.count_gemms(totals):
            linear.linear_forward(x, W)
            conv.conv2d_forward(rng.standard_normal((2, 4, 6, 6)), rng.standard_normal((8, 4, 3, 3)), None, 1, 1)
    finally:
        parallel.set_workers(None)
    assert totals["calls"] == 2
    assert totals["flops"] == 2 * 5 * 3 * 7 + 2 * 8 * (4 * 9) * (2 * 36)
    assert linear.gemm is precision.matmul and conv.gemm is precision.matmul     # unpatched afterwards


def test_lfmd_pass_count_matches_the_counted_flops():
    """The torch-equivalent pass counts (PASSES) against the GEMM FLOPs counted on the GPU path
    (stand-in, allocations only): forward-equivalents = 3 n_fb + n_f within 6 %."""
    pytest.importorskip("cupy", reason="needs the CuPy stand-in")
    import cupy
    if not hasattr(cupy, "_standin"):
        pytest.skip("counted on the CuPy stand-in")
    import test_gpu_memory as m
    counted = {}
    for kind in ("teacher", "itvm", "lfmd", "ecd"):
        objective, params, ema = m._setup(kind, "tiny", res=8)
        totals = dict(flops=0.0, bytes=0.0, calls=0)
        with np.errstate(all="ignore"), cupy._standin.allocations_only(), gpu_check.count_gemms(totals):
            objective.loss_and_grads(params, ema, cupy.asarray(np.zeros((2, 3, 8, 8), np.float32)),
                                     np.random.default_rng(1), 7)
        counted[kind] = totals["flops"]
    forward = counted["teacher"] / 3
    for kind in counted:
        n_fb, n_f = gpu_check.PASSES[kind]
        assert counted[kind] / forward == pytest.approx(3 * n_fb + n_f, rel=0.06), kind


def test_junit_parser_reads_counts_and_failure_texts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_a" name="test_ok"/>'
                   '<testcase classname="tests.test_a" name="test_bad"><failure message="boom">trace</failure></testcase>'
                   '<testcase classname="tests.test_a" name="test_skip"><skipped message="no"/></testcase>'
                   '</testsuite></testsuites>')
    r = gpu_check.parse_junit(str(xml))
    assert (r["tests"], r["passed"], r["failures"], r["skipped"]) == (3, 1, 1, 1)
    assert r["failed"][0]["test"] == "tests.test_a::test_bad" and "boom" in r["failed"][0]["text"]
