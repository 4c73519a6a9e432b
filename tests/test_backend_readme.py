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
    """Checked in a fresh process that cannot see the tests' CuPy stand-in: there, no GPU means an error."""
    code = ("import numpy as np\n"
            "from ttfm_np import backend\n"
            "if backend.gpu_available():\n"
            "    print('GPU'); raise SystemExit\n"
            "try:\n"
            "    backend.select_device('gpu'); print('RAN')\n"
            "except backend.BackendError as exc:\n"
            "    print('ERROR', '--device gpu was requested' in str(exc))\n"
            "print('AUTO', backend.select_device('auto') is np)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TTFM_CUPY_STANDIN")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    if out == ["GPU"]:
        pytest.skip("a real GPU is usable here, so --device gpu legitimately succeeds")
    assert out == ["ERROR", "True", "AUTO", "True"]           # an error, never a silent CPU run; auto falls back
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
