"""blas.py: the OpenBLAS kernel choice is made only where it was measured, never over the user's."""
import os
import subprocess
import sys

import pytest

from ttfm_np import blas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_preferred_coretype_only_for_amd_with_avx512():
    assert blas.preferred_coretype("AuthenticAMD", {"avx2", "avx512f"}) == "Haswell"
    assert blas.preferred_coretype("AuthenticAMD", {"avx2"}) is None            # Zen 1-3: OpenBLAS's choice
    assert blas.preferred_coretype("GenuineIntel", {"avx2", "avx512f"}) is None
    assert blas.preferred_coretype("", set()) is None


def _run(code, **env):
    e = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_sets_the_choice_before_numpy_loads():
    expected = blas.preferred_coretype(*blas._cpu_info()) or "unset"
    out = _run("import os, ttfm_np, numpy; print(os.environ.get('OPENBLAS_CORETYPE', 'unset'))")
    assert out == expected


def test_user_setting_wins_and_numpy_first_changes_nothing():
    assert _run("import os, ttfm_np; print(os.environ['OPENBLAS_CORETYPE'])", OPENBLAS_CORETYPE="Zen") == "Zen"
    assert _run("import os, numpy, ttfm_np; print(os.environ.get('OPENBLAS_CORETYPE', 'unset'))") == "unset"


def test_idle_blas_threads_sleep_unless_the_user_chose_otherwise():
    """OPENBLAS_THREAD_TIMEOUT=4 (sleep at once) is set with the kernel choice, before numpy loads;
    a value of the user's wins, and numpy first changes nothing."""
    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}

    def run(code, **env):
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(base, **env), capture_output=True,
                              text=True, check=True).stdout.strip()
    show = "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset'))"
    assert run(f"import os, ttfm_np; {show}") == blas.THREAD_TIMEOUT == "4"
    assert run(f"import os, ttfm_np; {show}", OPENBLAS_THREAD_TIMEOUT="20") == "20"
    assert run(f"import os, numpy, ttfm_np; {show}") == "unset"


def test_kernel_set_names_the_running_kernels():
    import glob
    import numpy as np
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    if not glob.glob(os.path.join(libdir, "*openblas*")):
        pytest.skip("this NumPy bundles no OpenBLAS (e.g. a conda/MKL build): no kernel set to name")
    out = _run("import ttfm_np.blas as b; print(b.kernel_set())", OPENBLAS_CORETYPE="Haswell")
    assert out == "Haswell"


def test_single_threaded_small_gemms_restores_and_respects_the_user():
    code = ("import ttfm_np.blas as b\n"
            "before = b.get_threads()\n"
            "with b.single_threaded_small_gemms():\n"
            "    inside = b.get_threads()\n"
            "print(before, inside, b.get_threads())")
    e = {k: v for k, v in os.environ.items() if k not in blas.THREAD_ENVS}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(e, OPENBLAS_CORETYPE="Haswell"),
                         capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "None":
        pytest.skip("this NumPy bundles no OpenBLAS: no thread count to set")
    before, inside, after = map(int, out)
    assert inside == 1 and after == before                  # one thread inside, the old count restored
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                         env=dict(e, OPENBLAS_CORETYPE="Haswell", OPENBLAS_NUM_THREADS="2"),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "2", "2"]                            # the user's choice wins
