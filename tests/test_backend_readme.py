"""Device selection, and the README's Python example runs exactly as written."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ttfm_np import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_select_cpu_and_array_module():
    assert backend.select_device("cpu") is np
    assert backend.array_module(np.zeros(2)) is np
    assert backend.device_name(np) == "cpu"


def test_gpu_request_without_gpu_is_an_error_not_a_cpu_run():
    if backend.gpu_available():
        pytest.skip("a GPU is usable here, so --device gpu legitimately succeeds")
    with pytest.raises(backend.BackendError, match="--device gpu was requested"):
        backend.select_device("gpu")
    assert backend.select_device("auto") is np                 # auto falls back, and says nothing is wrong
    with pytest.raises(backend.BackendError, match="unknown device"):
        backend.select_device("tpu")
    backend.select_device("cpu")


def test_env_variable_selects_device():
    code = "from ttfm_np import backend; print(backend.device_name(backend.get_xp()))"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TTFM_DEVICE="cpu"),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "cpu"


def test_readme_python_example_runs_as_written(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           env=dict(os.environ, TTFM_DEVICE="cpu"))
        assert r.returncode == 0, r.stderr
