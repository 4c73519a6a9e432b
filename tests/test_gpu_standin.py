"""The CuPy stand-in behaves like CuPy where the library could go wrong: host and device arrays
do not mix implicitly, transfers and syncs are counted, device memory is freed with its last view."""
import numpy as np
import pytest

import conftest

pytestmark = pytest.mark.skipif(not conftest.USING_CUPY_STANDIN, reason="tests of the CuPy stand-in itself")


def test_host_and_device_arrays_do_not_mix(rng):
    import cupy as cp
    h = rng.standard_normal(4)
    d = cp.asarray(h)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(d)
    for op in (lambda: d + h, lambda: h + d, lambda: d * h[None], lambda: cp.exp(h),
               lambda: cp.concatenate([d, h]), lambda: cp.ascontiguousarray(h)):
        with pytest.raises(TypeError):
            op()
    with pytest.raises((TypeError, ValueError)):     # CuPy: "non-scalar numpy.ndarray cannot be used for fill"
        d[:2] = h[:2]
    out = d * np.float32(2) + 1.0                       # scalars are fine, as in CuPy
    assert isinstance(out, cp.ndarray) and isinstance(np.exp(d), cp.ndarray)   # NumPy functions dispatch
    assert isinstance(d.sum(), cp.ndarray) and d.sum().ndim == 0             # reductions stay on the device
    np.testing.assert_allclose(cp.asnumpy(out), h * 2 + 1)


def test_transfers_syncs_and_memory_are_counted(gpu_counters):
    import cupy as cp
    live0 = gpu_counters["live_bytes"]
    a = cp.asarray(np.ones((256, 256), np.float32))              # 256 KiB up
    assert gpu_counters["h2d"] == 1 and gpu_counters["live_bytes"] == live0 + a.nbytes
    v = a.T[::2]                                                  # views cost nothing
    assert gpu_counters["live_bytes"] == live0 + a.nbytes
    s = a.sum()
    assert gpu_counters["syncs"] == 0
    assert float(s) == 65536.0 and bool(s > 0) and a.get().shape == (256, 256)
    assert gpu_counters["syncs"] == 3 and gpu_counters["d2h"] == 3
    del a, s
    assert gpu_counters["live_bytes"] > live0                     # the view keeps the buffer alive
    del v
    assert gpu_counters["live_bytes"] == live0
    assert gpu_counters["peak_bytes"] >= live0 + 256 * 256 * 4


def test_raw_kernels_refuse_host_arrays_and_count_launches(gpu_counters):
    import cupy as cp
    from ttfm_np import cuda
    k = cuda.get_kernel("ema", "ema_update", np.float32)
    e, p = cp.zeros(8, dtype=cp.float32), cp.ones(8, dtype=cp.float32)
    with pytest.raises(TypeError, match="host numpy array"):
        k((1,), (8,), (e, np.ones(8, np.float32), np.int64(8), np.float32(0.5), np.float32(0.5)))
    k((1,), (8,), (e, p, np.int64(8), np.float32(0.5), np.float32(0.5)))
    assert gpu_counters["launches_by_kernel"] == {"ema_update": 1}
    np.testing.assert_array_equal(e.get(), np.full(8, 0.5, np.float32))
