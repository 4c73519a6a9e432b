"""Winograd F(2x2, 3x3) convolution (ttfm_np/winograd.py) and its dispatch from conv.py.

Forward against the direct definition (float64 to 1e-12; float32 within a rounding bound derived
below), backward against central differences and the adjoint identity, Winograd against im2col,
and which convolutions conv.py sends where.
"""
import math

import numpy as np
import pytest

from gradcheck import check_gradients
from test_layers import conv2d_reference, weighted_sum_loss
from ttfm_np import conv, precision, winograd as wg

# (N, C, O, H, W): odd and even sizes, 1x1 and 2x3 images (a single, partly overhanging tile), C != O
SHAPES = [(2, 3, 4, 1, 1), (2, 3, 5, 2, 3), (3, 4, 2, 5, 7), (2, 5, 3, 8, 8), (1, 2, 6, 6, 5), (2, 3, 4, 7, 2)]
U32 = np.finfo(np.float32).eps / 2                 # unit roundoff of float32, 2^-24


def gamma(k):
    """gamma_k = k u / (1 - k u): the bound on |prod (1 + d_i)^{+-1} - 1| for k roundings |d_i| <= u."""
    return k * U32 / (1 - k * U32)


def inputs(rng, N, C, O, H, W, dtype=np.float64):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    Wt = (rng.standard_normal((O, C, 3, 3)) / 3).astype(dtype)
    b = rng.standard_normal(O).astype(dtype)
    return x, Wt, b


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.fixture
def algorithm(monkeypatch):
    """Restore conv.CONV3X3 after a test that switches it; Winograd for images of any size here."""
    monkeypatch.setattr(conv, "WINOGRAD_MIN_PIXELS", 1)
    previous = conv.CONV3X3
    yield conv.set_conv3x3_algorithm
    conv.set_conv3x3_algorithm(previous)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cache_v", [False, True])
def test_forward_matches_direct_convolution_float64(rng, shape, cache_v):
    x, Wt, b = inputs(rng, *shape)
    y, _ = wg.winograd3x3_forward(x, Wt, b, cache_v=cache_v)
    assert y.dtype == np.float64 and y.shape == shape[:1] + shape[2:3] + shape[3:]
    assert rel(y, conv2d_reference(x, Wt, b, 1, 1)) < 1e-12
    y0, _ = wg.winograd3x3_forward(x, Wt, None, cache_v=cache_v)
    assert rel(y0, conv2d_reference(x, Wt, 0 * b, 1, 1)) < 1e-12


@pytest.mark.parametrize("O, C", [(1, 1), (3, 5), (64, 32)])
def test_weight_transform_and_adjoint_against_the_matrix_form(rng, O, C):
    """U = G g G^T (winograd.weight_transform's slice arithmetic) and dg = G^T dU G (its adjoint) against
    the 4x3 matrix products written out here; float32 inputs are rounded once from the float64 value."""
    G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    g = rng.standard_normal((O, C, 3, 3))
    dU = rng.standard_normal((16, O, C))
    U_ref = np.stack([G @ g[o, c] @ G.T for o in range(O) for c in range(C)]).reshape(O, C, 16)
    U_ref = U_ref.transpose(2, 0, 1)                                            # (16, O, C)
    dg_ref = np.stack([G.T @ dU[:, o, c].reshape(4, 4) @ G for o in range(O) for c in range(C)])
    dg_ref = dg_ref.reshape(O, C, 3, 3)
    U, dg = wg.weight_transform(g), wg.weight_transform_adjoint(dU, np.float64)
    assert U.shape == (16, O, C) and dg.shape == (O, C, 3, 3) and U.dtype == dg.dtype == np.float64
    assert rel(U, U_ref) < 1e-15 and rel(dg, dg_ref) < 1e-15
    # the adjoint: <U(g), dU> = <g, U^T(dU)>
    assert abs(np.vdot(U, dU) - np.vdot(g, dg)) < 1e-12 * np.abs(U).sum() * np.abs(dU).max()
    # float32: computed in float64 from the float32 values, then rounded once (|error| <= u |value|)
    g32, dU32 = g.astype(np.float32), dU.astype(np.float32)
    U_ref32 = wg.weight_transform(g32.astype(np.float64))
    dg_ref32 = wg.weight_transform_adjoint(dU32.astype(np.float64), np.float64)
    U_32, dg_32 = wg.weight_transform(g32), wg.weight_transform_adjoint(dU32, np.float32)
    assert U_32.dtype == dg_32.dtype == np.float32
    assert np.all(np.abs(U_32 - U_ref32) <= U32 * np.abs(U_ref32))
    assert np.all(np.abs(dg_32 - dg_ref32) <= U32 * np.abs(dg_ref32))


def absolute_winograd(x, Wt):
    """Yabs: F(2x2, 3x3) evaluated on |x|, |W| with |A^T|, |B^T|, |G| (float64, tile by tile, written
    independently of winograd.py): every term c g d of the algorithm counted with its absolute value."""
    N, C, H, W = x.shape
    th, tw = (H + 1) // 2, (W + 1) // 2
    xpad = np.zeros((N, C, 2 * th + 2, 2 * tw + 2))
    xpad[:, :, 1:H + 1, 1:W + 1] = np.abs(x)
    s = xpad.strides
    tiles = np.lib.stride_tricks.as_strided(xpad, (N, C, th, tw, 4, 4), (s[0], s[1], 2 * s[2], 2 * s[3], s[2], s[3]))
    B, G, A = np.abs(wg.BT), np.abs(wg.G), np.abs(wg.AT)
    V = np.einsum("ak,ncijkl,bl->ncijab", B, tiles, B)                      # |B^T| |d| |B|
    U = np.einsum("ap,ocpq,bq->ocab", G, np.abs(Wt), G)                     # |G| |g| |G^T|
    Y = np.einsum("ra,noijab,sb->noirjs", A, np.einsum("ocab,ncijab->noijab", U, V), A)
    return Y.reshape(N, -1, 2 * th, 2 * tw)[:, :, :H, :W]


@pytest.mark.parametrize("shape", SHAPES + [(2, 64, 8, 6, 6)])
def test_float32_error_within_the_derived_bound(rng, shape):
    """Rounding bound (the classical one, Higham ch. 3, for a sum of products computed in any order):
    along any path an output term c g d of the algorithm meets at most
        1 (U = G g G^T: computed in float64, rounded once to float32; 1 more for float64's own error)
      + 2 (V = B^T d B: a row then a column addition)  + C (the GEMM's dot product over channels)
      + 4 (Y = A^T M A: up to 2 additions per pass)    + 1 (the bias)          = C + 9 roundings,
    and all coefficients (0, +-1, +-1/2) are exact, so |y32 - y| <= gamma_{C+9} (Yabs + |b|), Yabs the
    algorithm on absolute values (absolute_winograd). im2col's GEMM (K = 9C, then the bias) satisfies
    |y32 - y| <= gamma_{9C+1} (Z + |b|), Z = conv(|x|, |W|). On these random inputs Yabs is 7-9x Z
    (median; up to 15x: terms that cancel exactly still count there) while the rounding count C + 9 is
    about 9x smaller than 9C + 1: the two bounds are comparable (and so are the observed errors, 3-7e-7
    relative at C = 64-128), and both are checked here on the same inputs, with their difference."""
    N, C, O, H, W = shape
    x, Wt, b = inputs(rng, *shape, dtype=np.float32)
    x64, W64, b64 = (a.astype(np.float64) for a in (x, Wt, b))
    ref = conv2d_reference(x64, W64, b64, 1, 1)
    wino_bound = gamma(C + 9) * (absolute_winograd(x64, W64) + np.abs(b64)[None, :, None, None])
    im2col_bound = gamma(9 * C + 1) * (conv2d_reference(np.abs(x64), np.abs(W64), np.abs(b64), 1, 1))
    y, _ = wg.winograd3x3_forward(x, Wt, b)
    assert y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= wino_bound + 1e-12 * np.abs(ref).max())
    prev = conv.set_conv3x3_algorithm("im2col")
    try:
        yi, _ = conv.conv2d_forward(x, Wt, b, 1, 1)
    finally:
        conv.set_conv3x3_algorithm(prev)
    assert np.all(np.abs(yi - ref) <= im2col_bound + 1e-12 * np.abs(ref).max())
    assert np.all(np.abs(y.astype(np.float64) - yi) <= wino_bound + im2col_bound)
    assert np.abs(y - ref).max() > 0 or C * H * W < 8          # float32 really ran (not a float64 detour)


@pytest.mark.parametrize("cache_v", [False, True])
def test_one_sample_chunks_match_one_chunk(rng, monkeypatch, cache_v):
    """The forward and backward loop over cache-sized chunks of samples (winograd.CHUNK_BYTES): with a
    chunk per sample (5 chunks) y, dx, dW and db agree with the whole batch as one chunk (float64; the
    GEMMs' columns and dU's sum over chunks are grouped differently, so to rounding, not bit for bit)."""
    x, Wt, b = inputs(rng, 5, 3, 4, 6, 7)
    R = rng.standard_normal((5, 4, 6, 7))
    results = []
    for chunk_bytes in (1 << 30, 1):                     # one chunk; every sample its own chunk
        monkeypatch.setattr(wg, "CHUNK_BYTES", chunk_bytes)
        y, cache = wg.winograd3x3_forward(x, Wt, b, cache_v=cache_v)
        if cache_v:                                      # the kept V chunks (n0, n1) tile the batch
            kept = sorted(cache[1])
            assert [n0 for n0, _ in kept] == [0] + [n1 for _, n1 in kept[:-1]] and kept[-1][1] == 5
            assert len(kept) == 5 or chunk_bytes > 1
        dx, grads = wg.winograd3x3_backward(R, cache)
        results.append((y, dx, grads["weight"], grads["bias"]))
    for whole, per_sample in zip(*results):
        assert rel(per_sample, whole) < 1e-13
    assert rel(results[0][0], conv2d_reference(x, Wt, b, 1, 1)) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_backward_matches_finite_differences(rng, shape, bias):
    x, Wt, b = inputs(rng, *shape)
    b = b if bias else None
    y, cache = wg.winograd3x3_forward(x, Wt, b)
    R = rng.standard_normal(y.shape)
    dx, grads = wg.winograd3x3_backward(R, cache)
    assert set(grads) == ({"weight", "bias"} if bias else {"weight"})
    loss = weighted_sum_loss(lambda: wg.winograd3x3_forward(x, Wt, b)[0], R)
    tensors, analytic = {"x": x, "weight": Wt}, {"x": dx, "weight": grads["weight"]}
    if bias:
        tensors["bias"], analytic["bias"] = b, grads["bias"]
    check_gradients(loss, tensors, analytic, tol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cache_v", [False, True])
def test_adjoint_identity(rng, shape, cache_v):
    """<backward(dy), x_dot> = <dy, forward(x_dot) - forward(0)>, and likewise for W (the conv is
    linear in each): the backward is the exact transpose of the forward's linear map."""
    x, Wt, b = inputs(rng, *shape)
    y, cache = wg.winograd3x3_forward(x, Wt, b, cache_v=cache_v)
    dy = rng.standard_normal(y.shape)
    dx, grads = wg.winograd3x3_backward(dy, cache)
    x_dot, W_dot = rng.standard_normal(x.shape), rng.standard_normal(Wt.shape)
    lin_x = wg.winograd3x3_forward(x_dot, Wt, b)[0] - wg.winograd3x3_forward(np.zeros_like(x), Wt, b)[0]
    lhs, rhs = np.sum(dx * x_dot), np.sum(dy * lin_x)
    assert abs(lhs - rhs) <= 1e-12 * np.sum(np.abs(dx * x_dot))
    lin_w = wg.winograd3x3_forward(x, W_dot, None)[0]
    lhs, rhs = np.sum(grads["weight"] * W_dot), np.sum(dy * lin_w)
    assert abs(lhs - rhs) <= 1e-12 * np.sum(np.abs(grads["weight"] * W_dot))
    np.testing.assert_allclose(grads["bias"], dy.sum(axis=(0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_winograd_matches_im2col_through_conv2d(rng, algorithm, shape):
    """conv2d_forward / conv2d_backward with either algorithm: float64 to 1e-12."""
    x, Wt, b = inputs(rng, *shape)
    dy = rng.standard_normal((shape[0], shape[2], shape[3], shape[4]))
    out = {}
    for name in ("winograd", "im2col"):
        algorithm(name)
        y, cache = conv.conv2d_forward(x, Wt, b, 1, 1)
        dx, grads = conv.conv2d_backward(dy, cache)
        out[name] = (y, dx, grads["weight"], grads["bias"])
    for a, c in zip(out["winograd"], out["im2col"]):
        assert rel(a, c) < 1e-12


def test_dispatch(rng, algorithm):
    """NumPy 3x3 / stride 1 / padding 1 in fp32 (or float64) -> Winograd; tf32, other strides,
    paddings and kernels, images under WINOGRAD_MIN_PIXELS, or the switch set to im2col -> im2col.
    The backward follows the forward."""
    x, Wt, b = inputs(rng, 2, 3, 4, 6, 6, dtype=np.float32)

    def uses(*args):
        tag = conv.conv2d_forward(*args)[1][0]
        return isinstance(tag, str) and tag == "winograd"

    assert uses(x, Wt, b, 1, 1) and uses(x, Wt, b, 1, (1, 1)) and uses(x.astype(np.float64), Wt, b, 1, 1)
    assert not uses(x, Wt, b, 2, 1)
    assert not uses(x, Wt, b, 1, 0)
    assert not uses(x, Wt, b, 1, (1, 0))
    assert not uses(x, rng.standard_normal((4, 3, 5, 5)).astype(np.float32), b, 1, 1)
    conv.WINOGRAD_MIN_PIXELS = 16 * 16                          # the library's default (monkeypatch restores)
    assert not uses(x, Wt, b, 1, 1)                             # 6x6: im2col
    assert uses(np.zeros((1, 3, 16, 16), np.float32), Wt, b, 1, 1)
    assert not uses(np.zeros((1, 3, 8, 8), np.float32), Wt, b, 1, 1)
    conv.WINOGRAD_MIN_PIXELS = 1
    with precision.using("tf32"):
        assert not uses(x, Wt, b, 1, 1)                        # the emulation rounds x and W as the GPU does
        assert uses(x.astype(np.float64), Wt.astype(np.float64), b, 1, 1)   # float64 is never rounded
    algorithm("im2col")
    assert not uses(x, Wt, b, 1, 1)
    with pytest.raises(ValueError):
        algorithm("fft")
    # an im2col cache stays im2col even if the switch changes before the backward, and vice versa
    y, cache = conv.conv2d_forward(x, Wt, b, 1, 1)
    algorithm("winograd")
    dx, _ = conv.conv2d_backward(np.ones_like(y), cache)
    y2, cache2 = conv.conv2d_forward(x, Wt, b, 1, 1)
    algorithm("im2col")
    dx2, _ = conv.conv2d_backward(np.ones_like(y2), cache2)
    assert cache2[0] == "winograd" and rel(dx2, dx.astype(np.float64)) < 1e-5


def test_jvp_follows_the_dispatch(rng, algorithm):
    """conv2d_jvp runs conv2d_forward twice (x and x_dot): both through Winograd, both exact."""
    x, Wt, b = inputs(rng, 2, 3, 4, 5, 6)
    x_dot = rng.standard_normal(x.shape)
    y, y_dot, cache = conv.conv2d_jvp(x, Wt, b, x_dot, 1, 1)
    assert cache[0][0] == "winograd" and cache[1][0] == "winograd"
    assert rel(y_dot, conv2d_reference(x_dot, Wt, 0 * b, 1, 1)) < 1e-12
    dy, dy_dot = rng.standard_normal(y.shape), rng.standard_normal(y.shape)
    dx, dx_dot, grads = conv.conv2d_jvp_backward(dy, dy_dot, cache)
    dxr, _ = wg.winograd3x3_backward(dy, cache[0][1])
    assert rel(dx, dxr) < 1e-15 and math.isfinite(float(grads["weight"].sum()))


@pytest.mark.parametrize("two_time", [False, True])
def test_tiny_unet_gradients_through_winograd(rng, algorithm, monkeypatch, two_time):
    """test_networks.py's whole-network float64 gradient check of the tiny U-Net (8x8 and 4x4
    levels, which the library's default WINOGRAD_MIN_PIXELS sends to im2col) with every 3x3 stride-1
    convolution through Winograd; counts that Winograd really ran."""
    import test_networks
    algorithm("winograd")
    calls = []
    forward = wg.winograd3x3_forward
    monkeypatch.setattr(wg, "winograd3x3_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    cfg = test_networks._tiny_unet(two_time)
    x = rng.standard_normal((2, 1, 8, 8))
    s = rng.uniform(0, 1, 2)
    t = np.clip(s + rng.uniform(0, 0.5, 2), 0, 1) if two_time else None
    test_networks._check_network(cfg, x, s, t, rng, dropout_seed=3, n_max=2)
    assert len(calls) > 10
