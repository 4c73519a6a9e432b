"""Every kernel study in dev/ runs in quick mode (validation of all versions
against its float64 reference), so none can rot."""
import glob
import os
import subprocess
import sys

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
