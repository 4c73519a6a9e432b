"""The shape-sensitive 2-D distances (histogram total variation, narrow-kernel MMD)
against independent computations, and the failure they exist to see: a blurred
or filled-in toy that sliced-W2 rates near its floor."""
import numpy as np
import pytest

from ttfm_np import data, metrics


def test_hist2d_tv_matches_numpy_histogram2d(rng):
    a = rng.standard_normal((500, 2))
    b = rng.standard_normal((400, 2)) * 1.3 + 0.2
    bounds = ((-2.0, 2.5), (-1.5, 3.0))
    edges = [np.linspace(lo, hi, 17) for lo, hi in bounds]
    ha = np.histogram2d(a[:, 0], a[:, 1], bins=edges)[0].ravel() / len(a)
    hb = np.histogram2d(b[:, 0], b[:, 1], bins=edges)[0].ravel() / len(b)
    out_a, out_b = 1 - ha.sum(), 1 - hb.sum()                 # mass outside the grid: one extra cell
    ref = 0.5 * (np.abs(ha - hb).sum() + abs(out_a - out_b))
    assert metrics.hist2d_tv(a, b, bins=16, bounds=bounds) == pytest.approx(ref, rel=1e-12)


def test_hist2d_tv_extremes_and_errors(rng):
    a = rng.standard_normal((300, 2))
    assert metrics.hist2d_tv(a, a) == 0.0
    assert metrics.hist2d_tv(a + 100.0, a) == pytest.approx(1.0, abs=1e-12)   # everything escaped the reference's grid
    assert metrics.hist2d_tv(a[:, ::-1] * [1, -1], a) > 0   # rotated: different cells
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        metrics.hist2d_tv(rng.standard_normal((5, 3)), rng.standard_normal((5, 3)))


def test_mmd_rbf_matches_double_loop(rng):
    a, b = rng.standard_normal((37, 2)), rng.standard_normal((29, 2)) + 0.3
    bw = 0.7
    k = lambda x, y: np.exp(-((x - y) ** 2).sum() / (2 * bw ** 2))
    kaa = sum(k(a[i], a[j]) for i in range(len(a)) for j in range(len(a)) if i != j) / (37 * 36)
    kbb = sum(k(b[i], b[j]) for i in range(len(b)) for j in range(len(b)) if i != j) / (29 * 28)
    kab = sum(k(x, y) for x in a for y in b) / (37 * 29)
    m2 = kaa + kbb - 2 * kab
    assert metrics.mmd_rbf(a, b, bandwidth=bw) == pytest.approx(np.sign(m2) * np.sqrt(abs(m2)), rel=1e-10)


def test_shape_metrics_see_a_blurred_spiral_that_sliced_w2_barely_sees():
    """Blurring the spirals by 0.3 fills the gaps between the arms: sliced-W2 moves
    by < 2x of its two-sample floor, the histogram TV and the narrow MMD by > 1.5x / 3x."""
    ref, ref2 = data.make_toy("spirals", 2000, 1), data.make_toy("spirals", 2000, 2)
    blur = ref2 + 0.3 * np.random.default_rng(0).standard_normal(ref2.shape)
    sw_floor, sw_blur = metrics.sliced_w2(ref2, ref), metrics.sliced_w2(blur, ref)
    tv_floor, tv_blur = metrics.hist2d_tv(ref2, ref), metrics.hist2d_tv(blur, ref)
    mmd_floor, mmd_blur = metrics.mmd_rbf(ref2, ref), metrics.mmd_rbf(blur, ref)
    assert sw_blur < 2 * sw_floor
    assert tv_blur > 1.5 * tv_floor
    assert mmd_blur > 3 * abs(mmd_floor)
