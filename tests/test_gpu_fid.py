"""FID statistics of GPU features are summed on the GPU: one transfer at the end, not one per batch."""
import numpy as np
import pytest

from ttfm_np import backend, fid

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.gpu_available(), reason=f"no usable GPU: {backend.gpu_problem()}")]


class _DevicePixelFeatures:
    """Stands in for Inception on the GPU: the first 6 pixel values (offset, as pool3 features are) as features."""

    def device_features(self, x):
        return x.reshape(x.shape[0], -1)[:, :6].astype(np.float64) + 50.0

    def features(self, x):
        raise AssertionError("stats_of_images must use device_features when the model has it")


def test_feature_sums_stay_on_the_device(rng, gpu_counters):
    import cupy as cp
    feats = rng.standard_normal((70, 6)) * [1, 2, 3, 4, 5, 6] + 1e3
    st = fid.FeatureStats()
    for chunk in np.array_split(feats, 7):
        st.update(cp.asarray(chunk))
    assert gpu_counters["d2h"] == 0                       # nothing came back while summing
    mu, sigma = st.mu, st.sigma
    assert gpu_counters["d2h"] == 3                       # shift, sum, outer: once
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-9)
    _ = st.sigma
    assert gpu_counters["d2h"] == 3
    with pytest.raises(ValueError, match="dimensions"):
        st.update(cp.zeros((2, 5)))


def test_stats_of_device_images_match_the_host(rng, gpu_counters):
    import cupy as cp
    x = rng.uniform(-1, 1, (9, 1, 4, 4)).astype(np.float32)
    batches = [cp.asarray(x[:4]), cp.asarray(x[4:])]
    gpu = fid.stats_of_images(_DevicePixelFeatures(), batches)
    assert gpu_counters["d2h"] == 0
    host = fid.FeatureStats()
    for b in (x[:4], x[4:]):
        host.update(fid.to_unit_range_8bit(b).reshape(len(b), -1)[:, :6].astype(np.float64) + 50.0)
    np.testing.assert_allclose(gpu.mu, host.mu, rtol=1e-12)
    np.testing.assert_allclose(gpu.sigma, host.sigma, rtol=1e-9, atol=1e-12)
