"""Device selection when CuPy is installed but part of CUDA is missing (issue 14, item 4).

On the CuPy stand-in, `cupy._standin.simulate_missing(...)` makes CuPy fail the
way it does without a GPU/driver, without NVRTC or without cuBLAS (CuPy
installed without its [ctk] libraries). The probe must name that cause;
--device gpu must fail; --device auto may run on the CPU but must say why.
"""
import configparser
import os
import warnings

import numpy as np
import pytest

import conftest
from ttfm_np import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

standin_only = pytest.mark.skipif(not conftest.USING_CUPY_STANDIN, reason="simulated failures need the CuPy stand-in")


@pytest.fixture
def fresh_probe(monkeypatch):
    """Forget the probe's cached outcome for the test (restored afterwards)."""
    for name, value in (("_cupy_module", None), ("_cupy_problem", None), ("_cupy_imported", False),
                        ("_current_xp", None)):
        monkeypatch.setattr(backend, name, value)
    from ttfm_np import cuda
    cuda._module.cache_clear()
    cuda._function.cache_clear()
    yield
    cuda._module.cache_clear()
    cuda._function.cache_clear()


@pytest.mark.gpu
@standin_only
@pytest.mark.parametrize("missing,cause", [("driver", "CUDA driver"), ("nvrtc", "NVRTC"), ("cublas", "cuBLAS")])
def test_probe_names_the_missing_part(fresh_probe, missing, cause):
    import cupy
    with cupy._standin.simulate_missing(missing):
        assert not backend.gpu_available()
        problem = backend.gpu_problem()
        assert cause in problem
        if missing != "driver":                  # the fix for a missing library is the [ctk] extra, not the driver
            assert "[gpu]" in problem and "nvidia-smi" not in problem
        with pytest.raises(backend.BackendError, match=cause):
            backend.select_device("gpu")
        with pytest.warns(RuntimeWarning, match=f"--device auto runs on the CPU: .*{cause}"):
            assert backend.select_device("auto") is np
    backend.select_device("cpu")


@pytest.mark.gpu
@standin_only
def test_probe_passes_and_auto_picks_the_gpu_silently(fresh_probe):
    import cupy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.select_device("auto") is cupy
    assert backend.gpu_problem() is None
    backend.select_device("cpu")


def test_gpu_extras_install_cupy_with_its_cuda_libraries():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    extras = cfg["options.extras_require"]
    assert "cupy-cuda12x[ctk]" in extras["gpu"]
    assert "cupy-cuda13x[ctk]" in extras["gpu13"]
