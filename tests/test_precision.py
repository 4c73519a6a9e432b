"""precision.py: TF32 rounding, the GEMM entry used by linear/conv/attention, and --precision in training.

The references are independent of the code under test: the rounding is checked
against the textbook bit trick (add 0xFFF plus the kept last bit, clear the low
13 bits) and against exact rational arithmetic; the layers against float64
products of inputs rounded by that reference.
"""
import sys
import types

import numpy as np
import pytest

from ttfm_np import attention, conv, linear, pipeline, precision, recipes, train

EPS32 = 2.0 ** -24      # float32 unit roundoff
U_TF32 = 2.0 ** -11     # TF32 unit roundoff (10 stored mantissa bits)


def reference_round(x):
    """Round-to-nearest-even to a 10-bit mantissa with bitwise operators (finite values only)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)).view(np.float32)


def test_round_tf32_matches_the_bit_trick_and_its_error_bound(rng):
    x = (rng.standard_normal(200_000) * np.exp(rng.uniform(-30, 30, 200_000))).astype(np.float32)
    r = precision.round_tf32(x)
    assert r.dtype == np.float32 and r.shape == x.shape
    np.testing.assert_array_equal(r, reference_round(x))
    assert np.all(r.view(np.uint32) % (1 << 13) == 0)                       # 13 low mantissa bits are zero
    rel = np.abs(r.astype(np.float64) / x - 1)
    assert rel.max() <= U_TF32 and rel.max() > 0.9 * U_TF32                  # the bound is reached, not exceeded
    np.testing.assert_array_equal(precision.round_tf32(r), r)                # idempotent


def test_round_tf32_ties_to_even_and_special_values():
    ulp = 2.0 ** -10                                                         # TF32 ulp at 1
    x = np.array([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 + 2.0 ** -23,
                  np.inf, -np.inf, np.nan, np.finfo(np.float32).max, 0.0, -0.0, 1e-45], np.float32)
    r = precision.round_tf32(x)
    assert r[0] == 1.0 and r[1] == 1 + 2 * ulp and r[2] == -1.0              # ties go to the even neighbour
    assert r[3] == 1 + ulp                                                   # just above the tie: up
    assert r[4] == np.inf and r[5] == -np.inf and np.isnan(r[6])
    assert r[7] == np.inf                                                    # carry out of the largest float
    assert r[8] == 0 and np.signbit(r[9]) and r[10] == 0
    with pytest.raises(TypeError, match="float32"):
        precision.round_tf32(x.astype(np.float64))


def test_round_tf32_of_a_strided_view(rng):
    a = rng.standard_normal((6, 8)).astype(np.float32)
    np.testing.assert_array_equal(precision.round_tf32(a.T), reference_round(a.T))


def test_fp32_mode_is_the_plain_product(rng):
    a, b = rng.standard_normal((32, 48)).astype(np.float32), rng.standard_normal((48, 16)).astype(np.float32)
    assert precision.get_mode() == "fp32"
    np.testing.assert_array_equal(precision.matmul(a, b), a @ b)             # the same call: the same bits


def _exact(a, b):
    return a.astype(np.float64) @ b.astype(np.float64)


def test_tf32_product_is_the_fp32_product_of_rounded_inputs(rng):
    a, b = rng.standard_normal((64, 200)).astype(np.float32), rng.standard_normal((200, 24)).astype(np.float32)
    with precision.using("tf32"):
        c = precision.matmul(a, b)
        cd = precision.matmul(a.astype(np.float64), b.astype(np.float64))
    assert precision.get_mode() == "fp32"                                    # restored
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)      # sum_k |a_ik| |b_kj|
    ra, rb = reference_round(a), reference_round(b)
    # products of two 11-bit significands are exact in float32; only the K = 200 sums round:
    # |error| <= K eps32 sum|a||b| (a loose bound; a real sum does far better)
    assert np.all(np.abs(c - _exact(ra, rb)) <= 200 * EPS32 * scale)
    err_tf32 = np.abs(c - _exact(a, b)) / scale
    err_fp32 = np.abs(a @ b - _exact(a, b)) / scale
    assert err_tf32.max() <= 2 * U_TF32 + 200 * EPS32                        # two rounded inputs per term
    assert np.median(err_tf32) > 10 * np.median(err_fp32)                    # and the rounding really happened
    np.testing.assert_array_equal(cd, _exact(a, b))                          # float64 is never rounded


def test_precision_rejects_unknown_modes():
    with pytest.raises(ValueError, match="fp32 or tf32"):
        precision.set_mode("bf16")
    with pytest.raises(ValueError, match="--precision tf32"):
        train.TrainConfig(precision="tf32", dtype="float64").validate()


def _rounded(*arrays):
    return [reference_round(a).astype(np.float64) for a in arrays]


def test_linear_conv_attention_use_tf32_in_forward_and_backward(rng):
    """Each layer in tf32 mode equals the same layer in float64 on TF32-rounded inputs (up to float32
    accumulation); its error against the unrounded float64 layer is TF32-sized, while fp32 mode stays
    within float32 rounding of it (the fp32 tolerance is not loosened by the tf32 path)."""
    f32 = lambda *a: [v.astype(np.float32) for v in a]                      # noqa: E731
    x, W, b = f32(rng.standard_normal((8, 5, 6, 6)), rng.standard_normal((7, 5, 3, 3)), rng.standard_normal(7))
    dy = rng.standard_normal((8, 7, 6, 6)).astype(np.float32)
    with precision.using("tf32"):
        y, cache = conv.conv2d_forward(x, W, b, 1, 1)
        dx, grads = conv.conv2d_backward(dy, cache)
    xr, Wr = _rounded(x, W)
    y64, c64 = conv.conv2d_forward(xr, Wr, b.astype(np.float64), 1, 1)
    scale = conv.conv2d_forward(np.abs(xr), np.abs(Wr), None, 1, 1)[0]      # sum |w||x| per output
    assert np.all(np.abs(y - y64) <= 45 * EPS32 * scale + 1e-6)              # K = 45 terms
    yt64 = conv.conv2d_forward(x.astype(np.float64), W.astype(np.float64), b.astype(np.float64), 1, 1)[0]
    y32 = conv.conv2d_forward(x, W, b, 1, 1)[0]
    assert np.abs(y - yt64).max() > 30 * np.abs(y32 - yt64).max()           # tf32 is visibly coarser than fp32
    # backward: dx = W^T * dy (both rounded), dW = dy * x (both rounded)
    dyr = reference_round(dy).astype(np.float64)
    dx64, g64 = conv.conv2d_backward(dyr, c64)
    np.testing.assert_allclose(dx, dx64, rtol=0, atol=63 * EPS32 * np.abs(dx64).max() * 8)
    np.testing.assert_allclose(grads["weight"], g64["weight"], rtol=0,
                               atol=288 * EPS32 * np.abs(g64["weight"]).max() * 8)

    h, Wl = f32(rng.standard_normal((16, 33)), rng.standard_normal((9, 33)))
    with precision.using("tf32"):
        yl = linear.linear_forward(h, Wl)[0]
    hr, Wlr = _rounded(h, Wl)
    np.testing.assert_allclose(yl, hr @ Wlr.T, rtol=0, atol=33 * EPS32 * (np.abs(hr) @ np.abs(Wlr).T).max())

    xa = rng.standard_normal((2, 8, 4, 4)).astype(np.float32)
    Wq, bq, Wo, bo = f32(rng.standard_normal((24, 8)) / 3, rng.standard_normal(24), rng.standard_normal((8, 8)) / 3,
                         rng.standard_normal(8))
    with precision.using("tf32"):
        ya = attention.attention_forward(xa, Wq, bq, Wo, bo, 2)[0]
    ya32 = attention.attention_forward(xa, Wq, bq, Wo, bo, 2)[0]
    ya64 = attention.attention_forward(*[v.astype(np.float64) for v in (xa, Wq, bq, Wo, bo)], 2)[0]
    err_tf32, err_fp32 = np.abs(ya - ya64).max(), np.abs(ya32 - ya64).max()
    assert err_tf32 < 20 * U_TF32 * np.abs(ya64).max() and err_tf32 > 30 * err_fp32


def test_real_cupy_gets_the_cublas_compute_type(monkeypatch, rng):
    """On real CuPy nothing is rounded by us: cuBLAS is told COMPUTE_TYPE_TF32 (and back to DEFAULT)."""
    calls = []
    linalg = types.SimpleNamespace(COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7,
                                   set_compute_type=lambda dtype, ct: calls.append((np.dtype(dtype), ct)))
    core = types.SimpleNamespace(_routines_linalg=linalg)
    monkeypatch.setitem(sys.modules, "cupy._core", core)
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", linalg)
    monkeypatch.setattr(precision, "_cupy_applied", {})
    monkeypatch.setattr(precision, "_cupy_last", None)
    fake = types.SimpleNamespace(__version__="14.2.0")                      # real CuPy has no _standin
    precision.apply(fake, "tf32")
    precision.apply(fake, "tf32")                                            # remembered: set once
    precision.apply(fake, "fp32")
    assert calls == [(np.dtype(np.float32), 7), (np.dtype(np.float32), 1)]
    with precision.using("tf32"):                                            # the global follows the mode at once
        assert calls[-1][1] == 7
    assert calls[-1][1] == 1 and len(calls) == 4
    del linalg.set_compute_type
    monkeypatch.setattr(precision, "_cupy_applied", {})
    monkeypatch.setattr(precision, "_cupy_last", None)
    from ttfm_np import backend
    with pytest.raises(backend.BackendError, match="--precision tf32"):
        precision.apply(fake, "tf32")


@pytest.mark.gpu
def test_gpu_tf32_products(rng):
    """The stand-in emulates TF32 exactly as NumPy does (same rounding, same GEMM: the same bits).
    A real GPU uses cuBLAS's TF32 compute type: its error must be TF32-sized (at most 2^-10 per input
    factor, which covers truncation as well as rounding to nearest) and far above fp32's."""
    import cupy
    a, b = rng.standard_normal((3, 16, 40)).astype(np.float32), rng.standard_normal((3, 40, 8)).astype(np.float32)
    with precision.using("tf32"):
        host = precision.matmul(a, b)
        dev = precision.matmul(cupy.asarray(a), cupy.asarray(b))
        tdev = precision.tensordot(cupy.asarray(a), cupy.asarray(b), axes=((0, 2), (0, 1)))
    if not hasattr(cupy, "_standin"):
        exact, scale = _exact(a, b), np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
        err_tf32 = np.abs(dev.get() - exact) / scale
        err_fp32 = np.abs((cupy.asarray(a) @ cupy.asarray(b)).get() - exact) / scale
        assert err_tf32.max() <= 2 * 2.0 ** -10 + 40 * EPS32 and np.median(err_tf32) > 10 * np.median(err_fp32)
        return
    np.testing.assert_array_equal(dev.get(), host)                            # the same rounding, the same GEMM
    ra, rb = reference_round(a).astype(np.float64), reference_round(b).astype(np.float64)
    np.testing.assert_allclose(tdev.get(), np.tensordot(ra, rb, axes=((0, 2), (0, 1))), rtol=0,
                               atol=120 * EPS32 * np.abs(np.tensordot(np.abs(ra), np.abs(rb), ((0, 2), (0, 1)))).max())


@pytest.fixture
def tiny_recipes(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(recipes, "RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path


def test_precision_is_recorded_and_a_resume_may_not_change_it(tiny_recipes):
    from ttfm_np import ckpt
    out = str(tiny_recipes / "t")
    kw = dict(model_name="mlp-tiny", out=out, batch_size=32, progress=False)
    pipeline.train_teacher("toy:moons", steps=3, precision="tf32", **kw)
    assert ckpt.load_checkpoint(out + "/checkpoint.h5")["config"]["train"]["precision"] == "tf32"
    assert precision.get_mode() == "fp32"                                     # the run's mode did not leak out
    with pytest.raises(train.ResumeMismatch, match=r"train\.precision: tf32 -> fp32"):
        pipeline.train_teacher("toy:moons", steps=6, precision="fp32", resume=True, **kw)
    assert pipeline.train_teacher("toy:moons", steps=6, precision="tf32", resume=True, **kw).step == 6


def test_tf32_training_runs_its_gemms_in_tf32(tiny_recipes, monkeypatch):
    """The train loop switches the mode on for its steps (seen by the GEMM entry itself)."""
    seen = set()
    real = precision.matmul

    def spy(a, b):
        seen.add(precision.get_mode())
        return real(a, b)
    monkeypatch.setattr(linear, "gemm", spy)
    pipeline.train_teacher("toy:moons", model_name="mlp-tiny", out=str(tiny_recipes / "a"), steps=2, batch_size=16,
                           precision="tf32", progress=False)
    assert "tf32" in seen
    seen.clear()
    pipeline.train_teacher("toy:moons", model_name="mlp-tiny", out=str(tiny_recipes / "b"), steps=2, batch_size=16,
                           progress=False)
    assert seen == {"fp32"}
