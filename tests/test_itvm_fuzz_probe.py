"""The measuring helpers of experiments/itvm_fuzz_probe.py (docs/results.md, "Why 1-step ITVM samples are
fuzzier"): the local stretch of a map, the between-modes mask and the blur distances, on maps whose answers
are known in closed form. The runs themselves are the pipeline's (tested elsewhere)."""
import importlib.util
import os
import sys

import numpy as np
import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


@pytest.fixture(scope="module")
def probe():
    sys.path.insert(0, EXPERIMENTS)                       # the script imports its shared runner.py
    try:
        spec = importlib.util.spec_from_file_location("itvm_fuzz_probe", os.path.join(EXPERIMENTS, "itvm_fuzz_probe.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(EXPERIMENTS)


def test_local_stretch_is_the_top_singular_value_of_a_linear_map(probe):
    rng = np.random.default_rng(3)
    A = rng.standard_normal((2, 2))
    z = rng.standard_normal((50, 2))
    s = probe.local_stretch(lambda x: x @ A.T, z)
    # central differences are exact for a linear map (up to float64 rounding of (x+d) - (x-d))
    np.testing.assert_allclose(s, np.linalg.svd(A, compute_uv=False)[0], rtol=1e-10)
    # a map that stretches one axis by 5 where x0 > 0 and 1 elsewhere: the stretch follows z
    s = probe.local_stretch(lambda x: np.where(x[:, :1] > 0, 5.0, 1.0) * x, np.array([[1.0, 0.0], [-1.0, 0.0]]))
    np.testing.assert_allclose(s, [5.0, 1.0], rtol=1e-10)


def test_gap_mask_flags_points_between_and_outside_the_modes(probe):
    rng = np.random.default_rng(4)
    modes = np.concatenate([rng.normal(-2, 0.1, (2000, 2)), rng.normal(2, 0.1, (2000, 2))])
    inside = np.array([[-2.0, -2.0], [2.0, 2.0]])
    between = np.array([[0.0, 0.0], [2.0, -2.0], [30.0, 0.0]])          # centre, empty corner, off the grid
    np.testing.assert_array_equal(probe.gap_mask(inside, modes), [False, False])
    np.testing.assert_array_equal(probe.gap_mask(between, modes), [True, True, True])


def test_blur_distances_find_the_blur_of_a_blurred_map(probe):
    """S = T_sigma0 with the same noise draws: the distance is 0 at sigma0 and > 0 at sigma 0."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((200, 2))

    def T(x):                                                # a map that fans out: sign of x0 picks a mode
        return np.stack([np.tanh(5 * x[:, 0]) * 2, x[:, 1]], axis=1)

    draws = np.random.default_rng(0).standard_normal((8,) + z.shape)     # blur_distances' draws (seed 0, k 8)
    S = np.mean([T(z + 0.2 * d) for d in draws], axis=0)
    dist = probe.blur_distances(S, T, z, (0.0, 0.2))
    assert dist[0.2] < 1e-12
    assert dist[0.0] > 0.1
    assert probe.blur_distances(T(z), T, z, (0.0,))[0.0] == 0.0


def test_error_roughness_separates_a_smooth_bias_from_jitter(probe):
    rng = np.random.default_rng(6)
    z = rng.standard_normal((500, 2))

    def T(x):
        return np.sin(x)

    smooth = probe.error_roughness(lambda x: T(x) + 0.1 * np.cos(x), T, z)        # error varies on scale 1
    noise = np.random.default_rng(7)
    jitter = probe.error_roughness(lambda x: T(x) + 0.1 * noise.standard_normal(x.shape), T, z)
    assert smooth < 0.05                      # |d cos| <= delta = 0.03 per unit change: ratio ~0.03 / sqrt(2)
    assert 0.9 < jitter < 1.1                 # independent errors: E|e1 - e2|^2 = 2 E|e|^2


def test_local_jacobian_of_a_nonlinear_map(probe):
    rng = np.random.default_rng(8)
    z = rng.standard_normal((20, 2))
    J = probe.local_jacobian(lambda x: np.stack([x[:, 0] ** 2, x[:, 0] * x[:, 1]], axis=1), z, eps=1e-4)
    exact = np.stack([np.stack([2 * z[:, 0], np.zeros(20)], 1), np.stack([z[:, 1], z[:, 0]], 1)], 1)
    np.testing.assert_allclose(J, exact, atol=1e-8)     # central differences are exact for quadratics
