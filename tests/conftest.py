import os
import sys

import numpy as np
import pytest

# tests import the helper module gradcheck.py from this folder, and cli.py from the project root
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TTFM_DEVICE", "cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
