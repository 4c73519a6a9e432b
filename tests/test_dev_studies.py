"""Every kernel study in dev/ runs in quick mode (validation of all versions
against its float64 reference), so none can rot."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

DEV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dev")
STUDIES = sorted(p for p in glob.glob(os.path.join(DEV, "*.py")) if os.path.basename(p) != "harness.py")


def test_there_are_studies():
    assert {"conv2d.py", "groupnorm.py", "attention.py", "adam.py"} <= {os.path.basename(p) for p in STUDIES}


@pytest.mark.parametrize("study", STUDIES, ids=os.path.basename)
def test_study_validates_in_quick_mode(study):
    r = subprocess.run([sys.executable, study, "--quick"], cwd=DEV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " ok" in r.stdout and "FAILED" not in r.stdout


@pytest.mark.parametrize("k,pad,H,W", [(3, (1, 1), 6, 5), (3, (0, 0), 5, 7), ((1, 7), (0, 3), 6, 9), ((3, 5), (2, 1), 4, 6)])
def test_conv2d_study_implicit_gemm_gradients(rng, k, pad, H, W):
    """dev/conv2d.py v5 (implicit GEMM, stride 1): forward against the direct definition, backward against
    float64 central differences, for several kernels and paddings (the study itself times 3x3, padding 1)."""
    from gradcheck import check_gradients
    from test_layers import conv2d_reference, weighted_sum_loss
    sys.path.insert(0, DEV)
    try:
        import conv2d as study
    finally:
        sys.path.remove(DEV)
    kh, kw = k if isinstance(k, tuple) else (k, k)
    x, Wt, b = rng.standard_normal((3, 2, H, W)), rng.standard_normal((4, 2, kh, kw)), rng.standard_normal(4)
    y, cache = study.implicit_forward(x, Wt, b, *pad)
    np.testing.assert_allclose(y, conv2d_reference(x, Wt, b, 1, pad), rtol=1e-10, atol=1e-12)
    R = rng.standard_normal(y.shape)
    dx, dW, db = study.implicit_backward(R, cache)
    loss = weighted_sum_loss(lambda: study.implicit_forward(x, Wt, b, *pad)[0], R)
    check_gradients(loss, {"x": x, "weight": Wt, "bias": b}, {"x": dx, "weight": dW, "bias": db}, tol=1e-6)
