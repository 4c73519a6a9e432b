"""Every layer: forward against an independent reference, backward against
central finite differences in float64 (relative error < 1e-6)."""
import numpy as np
import pytest

from gradcheck import check_gradients
from ttfm_np import activations, attention, conv, dropout, embedding, groupnorm, linear, resample

TOL = 1e-6


def weighted_sum_loss(fn, R):
    """L = sum(R * fn()) with a fixed random R: its gradient w.r.t. the output is R."""
    return lambda: float(np.sum(R * fn()))


# ---------------------------------------------------------------------------- linear

def test_linear_forward_and_grad(rng):
    x = rng.standard_normal((4, 3, 5))
    W = rng.standard_normal((6, 5))
    b = rng.standard_normal(6)
    y, cache = linear.linear_forward(x, W, b)
    np.testing.assert_allclose(y, np.einsum("abi,oi->abo", x, W) + b, rtol=1e-12)
    R = rng.standard_normal(y.shape)
    dx, grads = linear.linear_backward(R, cache)
    assert set(grads) == {"weight", "bias"}
    loss = weighted_sum_loss(lambda: linear.linear_forward(x, W, b)[0], R)
    check_gradients(loss, {"x": x, "weight": W, "bias": b}, dict(grads, x=dx), tol=TOL)


# ---------------------------------------------------------------------------- conv2d

def conv2d_reference(x, W, b, stride, pad):
    """Direct definition, loops over the kernel offsets only, float64."""
    N, C, H, Wd = x.shape
    O, _, kh, kw = W.shape
    ph, pw = pad if isinstance(pad, tuple) else (pad, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    Ho, Wo = (H + 2 * ph - kh) // stride + 1, (Wd + 2 * pw - kw) // stride + 1
    y = np.zeros((N, O, Ho, Wo))
    for p in range(kh):
        for q in range(kw):
            patch = xp[:, :, p:p + stride * Ho:stride, q:q + stride * Wo:stride]   # (N, C, Ho, Wo)
            y += np.einsum("nchw,oc->nohw", patch, W[:, :, p, q])
    return y + b[None, :, None, None]


@pytest.mark.parametrize("k,stride,pad,H,W", [(3, 1, 1, 6, 5), (3, 2, 1, 7, 6), (1, 1, 0, 4, 4),
                                              (5, 2, 2, 9, 9), (2, 2, 0, 6, 6), (3, 1, 0, 5, 5),
                                              ((1, 7), 1, (0, 3), 6, 9), ((3, 1), 2, (1, 0), 7, 5)])
def test_conv2d_forward_and_grad(rng, k, stride, pad, H, W):
    kh, kw = k if isinstance(k, tuple) else (k, k)
    x = rng.standard_normal((2, 3, H, W))
    Wt = rng.standard_normal((4, 3, kh, kw))
    b = rng.standard_normal(4)
    y, cache = conv.conv2d_forward(x, Wt, b, stride, pad)
    np.testing.assert_allclose(y, conv2d_reference(x, Wt, b, stride, pad), rtol=1e-10, atol=1e-12)
    R = rng.standard_normal(y.shape)
    dx, grads = conv.conv2d_backward(R, cache)
    assert set(grads) == {"weight", "bias"}
    loss = weighted_sum_loss(lambda: conv.conv2d_forward(x, Wt, b, stride, pad)[0], R)
    check_gradients(loss, {"x": x, "weight": Wt, "bias": b}, dict(grads, x=dx), tol=TOL)


@pytest.mark.parametrize("samples_per_chunk", [1, 2])
@pytest.mark.parametrize("k,pad", [(3, 1), ((1, 7), (0, 3))])
def test_conv2d_in_sample_chunks(rng, monkeypatch, samples_per_chunk, k, pad):
    """The NumPy stride-1 path unfolds a few samples at a time (conv._CHUNK_BYTES); with chunks of
    1 and 2 of 5 samples (the last one short) the forward and gradients are the same functions."""
    kh, kw = k if isinstance(k, tuple) else (k, k)
    x = rng.standard_normal((5, 3, 6, 9))
    Wt = rng.standard_normal((4, 3, kh, kw))
    b = rng.standard_normal(4)
    per_sample = max(3, 4) * kh * kw * 6 * 9 * x.itemsize          # the larger of the two unfolds' samples
    monkeypatch.setattr(conv, "_CHUNK_BYTES", samples_per_chunk * per_sample)
    assert len(conv._sample_chunks(5, per_sample)) == -(-5 // samples_per_chunk)
    y, cache = conv.conv2d_forward(x, Wt, b, 1, pad)
    np.testing.assert_allclose(y, conv2d_reference(x, Wt, b, 1, pad), rtol=1e-10, atol=1e-12)
    R = rng.standard_normal(y.shape)
    dx, grads = conv.conv2d_backward(R, cache)
    loss = weighted_sum_loss(lambda: conv.conv2d_forward(x, Wt, b, 1, pad)[0], R)
    check_gradients(loss, {"x": x, "weight": Wt, "bias": b}, dict(grads, x=dx), tol=TOL)


def test_conv2d_float32_stays_float32(rng):
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    Wt = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y, cache = conv.conv2d_forward(x, Wt, None, 1, 1)
    assert y.dtype == np.float32
    dx, grads = conv.conv2d_backward(np.ones_like(y), cache)
    assert dx.dtype == grads["weight"].dtype == np.float32 and set(grads) == {"weight"}   # no bias, no "bias"


def test_conv2d_channel_mismatch_names_the_problem(rng):
    with pytest.raises(ValueError, match="3 channels"):
        conv.conv2d_forward(rng.standard_normal((1, 3, 4, 4)), rng.standard_normal((2, 5, 3, 3)), None, 1, 1)


@pytest.mark.torch
def test_conv2d_matches_torch(rng):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: optional comparison skipped")
    x = rng.standard_normal((2, 5, 9, 9))
    Wt = rng.standard_normal((6, 5, 3, 3))
    b = rng.standard_normal(6)
    y, _ = conv.conv2d_forward(x, Wt, b, 2, 1)
    ref = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(Wt), torch.tensor(b), stride=2, padding=1)
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- groupnorm, silu

@pytest.mark.parametrize("silu", [False, True])
def test_groupnorm_forward_and_grad(rng, silu):
    x = rng.standard_normal((3, 6, 4, 5)) * 2 + 0.5
    gamma = 1 + 0.3 * rng.standard_normal(6)
    beta = rng.standard_normal(6)
    y, cache = groupnorm.groupnorm_forward(x, gamma, beta, 3, eps=1e-5, silu=silu)
    xg = x.reshape(3, 3, -1)
    ref = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    ref = ref * gamma[None, :, None, None] + beta[None, :, None, None]
    if silu:
        ref = ref / (1 + np.exp(-ref))
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)
    R = rng.standard_normal(y.shape)
    dx, grads = groupnorm.groupnorm_backward(R, cache)
    assert set(grads) == {"gamma", "beta"}
    loss = weighted_sum_loss(lambda: groupnorm.groupnorm_forward(x, gamma, beta, 3, 1e-5, silu)[0], R)
    check_gradients(loss, {"x": x, "gamma": gamma, "beta": beta}, dict(grads, x=dx), tol=TOL)


def test_groupnorm_silu_backward_reads_the_cached_sigmoid(rng, monkeypatch):
    """The NumPy GroupNorm+SiLU backward uses y and sigmoid(z) from the forward's cache (no second
    sigmoid), and agrees with the reference that recomputes them (the CUDA kernel's reference)."""
    x = rng.standard_normal((2, 8, 3, 5)) * 2 - 0.3
    gamma, beta = 1 + 0.3 * rng.standard_normal(8), rng.standard_normal(8)
    y, cache = groupnorm.groupnorm_forward(x, gamma, beta, 4, silu=True)
    dy = rng.standard_normal(y.shape)
    _, _, _, mean, rstd, _, _, _, _ = cache
    want = groupnorm.groupnorm_backward_numpy(dy, x, gamma, beta, mean, rstd, 4, True)   # recomputes s
    monkeypatch.setattr(groupnorm, "sigmoid", lambda *a, **k: pytest.fail("the backward recomputed sigmoid"))
    dx, grads = groupnorm.groupnorm_backward(dy, cache)
    np.testing.assert_allclose(dx, want[0], rtol=1e-12, atol=1e-13)      # float64: same formula up to rounding
    np.testing.assert_allclose(grads["gamma"], want[1], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grads["beta"], want[2], rtol=1e-12, atol=1e-13)


def test_groupnorm_rejects_bad_groups(rng):
    with pytest.raises(ValueError, match="cannot be split"):
        groupnorm.groupnorm_forward(rng.standard_normal((1, 6, 2, 2)), np.ones(6), np.zeros(6), 4)


def test_silu_forward_and_grad(rng):
    x = rng.standard_normal((5, 7)) * 3
    y, cache = activations.silu_forward(x)
    np.testing.assert_allclose(y, x / (1 + np.exp(-x)), rtol=1e-12)
    R = rng.standard_normal(y.shape)
    dx, grads = activations.silu_backward(R, cache)
    assert grads == {}
    check_gradients(weighted_sum_loss(lambda: activations.silu_forward(x)[0], R), {"x": x}, {"x": dx}, tol=TOL)


def test_silu_no_overflow_warning():
    x = np.array([-1000.0, 1000.0], np.float32)
    with np.errstate(all="raise"):
        y, _ = activations.silu_forward(x)
    np.testing.assert_allclose(y, [0.0, 1000.0])


@pytest.mark.parametrize("form", ["tanh", "exp"])
def test_sigmoid_forms_match_scipy(rng, form):
    from scipy.special import expit
    x = np.concatenate([rng.standard_normal(1000) * 8, [-1000.0, -89.0, -30.0, 0.0, 30.0, 1000.0]])
    with np.errstate(all="raise"):
        s64 = activations.sigmoid(x, form)
        s32 = activations.sigmoid(x.astype(np.float32), form)
    # float64: a few roundings of 1.1e-16 each (relative); the tanh form's 1 + tanh(x/2) cancels for
    # x << 0, which leaves an absolute error of about one rounding of 1.0 (2.2e-16): 2x margin each
    np.testing.assert_allclose(s64, expit(x), rtol=1e-15, atol=4.5e-16)
    assert s32.dtype == np.float32
    # float32 against the float64 value: the same bounds with float32's rounding (6e-8 relative, 1.2e-7 at 1.0)
    np.testing.assert_allclose(s32, expit(x), rtol=5e-7, atol=2.4e-7)


@pytest.mark.parametrize("form", ["tanh", "exp"])
def test_silu_grad_with_each_sigmoid_form(rng, monkeypatch, form):
    monkeypatch.setattr(activations, "SIGMOID_FORM", form)
    x = rng.standard_normal((5, 7)) * 3
    R = rng.standard_normal(x.shape)
    dx, _ = activations.silu_backward(R, activations.silu_forward(x)[1])
    check_gradients(weighted_sum_loss(lambda: activations.silu_forward(x)[0], R), {"x": x}, {"x": dx}, tol=TOL)
    with np.errstate(all="raise"):
        y, _ = activations.silu_forward(np.array([-1000.0, 1000.0], np.float32))
    np.testing.assert_allclose(y, [0.0, 1000.0])


def test_silu_overwrite_x_writes_y_into_x_and_keeps_the_gradient(rng):
    x = rng.standard_normal((6, 5)).astype(np.float32) * 3
    R = rng.standard_normal(x.shape).astype(np.float32)
    y_ref, cache_ref = activations.silu_forward(x)
    buf = x.copy()
    y, cache = activations.silu_forward(buf, overwrite_x=True)
    assert y is buf
    # the same float32 operations in the same order (s = sigmoid(x), y = x * s): exactly equal
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(activations.silu_backward(R, cache)[0], activations.silu_backward(R, cache_ref)[0])


def test_sigmoid_rejects_unknown_form():
    with pytest.raises(ValueError, match="'tanh' or 'exp'"):
        activations.sigmoid(np.zeros(3), "erf")


def test_sigmoid_form_follows_numpy_simd_level():
    """The form is picked from the SIMD loops NumPy reports: in a process with AVX-512 disabled it is 'exp'."""
    import os
    import subprocess
    import sys
    assert activations.SIGMOID_FORM == ("tanh" if activations.numpy_uses_avx512() else "exp")
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR")
    code = "from ttfm_np import activations as a; print(a.numpy_uses_avx512(), a.SIGMOID_FORM)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "exp"]


# ---------------------------------------------------------------------------- attention

def attention_reference(x, Wqkv, bqkv, Wo, bo, heads):
    N, C, H, W = x.shape
    L, d = H * W, C // heads
    tokens = x.reshape(N, C, L).transpose(0, 2, 1)                  # (N, L, C)
    qkv = tokens @ Wqkv.T + bqkv
    out = np.zeros((N, L, C))
    for n in range(N):
        for h in range(heads):
            q = qkv[n, :, h * d:(h + 1) * d]
            k = qkv[n, :, C + h * d:C + (h + 1) * d]
            v = qkv[n, :, 2 * C + h * d:2 * C + (h + 1) * d]
            S = q @ k.T / np.sqrt(d)
            P = np.exp(S - S.max(1, keepdims=True))
            P /= P.sum(1, keepdims=True)
            out[n, :, h * d:(h + 1) * d] = P @ v
    y = out @ Wo.T + bo
    return y.transpose(0, 2, 1).reshape(N, C, H, W)


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_forward_and_grad(rng, heads):
    C = 4
    x = rng.standard_normal((2, C, 3, 3))
    Wqkv, bqkv = rng.standard_normal((3 * C, C)) * 0.5, rng.standard_normal(3 * C)
    Wo, bo = rng.standard_normal((C, C)), rng.standard_normal(C)
    y, cache = attention.attention_forward(x, Wqkv, bqkv, Wo, bo, heads)
    np.testing.assert_allclose(y, attention_reference(x, Wqkv, bqkv, Wo, bo, heads), rtol=1e-10, atol=1e-12)
    R = rng.standard_normal(y.shape)
    dx, grads = attention.attention_backward(R, cache)
    assert set(grads) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    loss = weighted_sum_loss(lambda: attention.attention_forward(x, Wqkv, bqkv, Wo, bo, heads)[0], R)
    check_gradients(loss, {"x": x, "qkv.weight": Wqkv, "qkv.bias": bqkv, "proj.weight": Wo, "proj.bias": bo},
                    dict(grads, x=dx), n_max=20, tol=TOL)


# ---------------------------------------------------------------------------- resampling, dropout

def test_upsample_nearest(rng):
    x = rng.standard_normal((2, 3, 3, 4))
    y, cache = resample.upsample_nearest2x_forward(x)
    np.testing.assert_array_equal(y, x.repeat(2, axis=2).repeat(2, axis=3))
    R = rng.standard_normal(y.shape)
    dx, grads = resample.upsample_nearest2x_backward(R, cache)
    assert grads == {}
    check_gradients(weighted_sum_loss(lambda: resample.upsample_nearest2x_forward(x)[0], R),
                    {"x": x}, {"x": dx}, tol=TOL)


def test_avgpool2x2(rng):
    x = rng.standard_normal((2, 3, 4, 6))
    y, cache = resample.avgpool2x2_forward(x)
    np.testing.assert_allclose(y[0, 1, 1, 2], x[0, 1, 2:4, 4:6].mean())
    R = rng.standard_normal(y.shape)
    dx, grads = resample.avgpool2x2_backward(R, cache)
    assert grads == {}
    check_gradients(weighted_sum_loss(lambda: resample.avgpool2x2_forward(x)[0], R), {"x": x}, {"x": dx}, tol=TOL)


def test_dropout_mask_is_a_function_of_seed_site_and_index(rng):
    x = rng.standard_normal((50, 40))
    site = dropout.site_id("enc.8x8_block0")
    y1, c1 = dropout.dropout_forward(x, 0.3, 7, site)
    y2, _ = dropout.dropout_forward(x, 0.3, 7, site)
    np.testing.assert_array_equal(y1, y2)                         # same (seed, site): same mask
    assert (dropout.dropout_forward(x, 0.3, 8, site)[0] != y1).any()                            # other seed
    assert (dropout.dropout_forward(x, 0.3, 7, dropout.site_id("enc.8x8_block1"))[0] != y1).any()   # other site
    kept = y1 != 0
    np.testing.assert_allclose(y1[kept], x[kept] / 0.7)
    # the mask of element i is SplitMix64 output i of the (seed, site) stream: recompute a few
    # entries with Python integers (independent of the vectorised uint64 code)
    key = dropout.stream_key(7, site)
    for i in rng.choice(x.size, 25, replace=False):
        z = dropout.splitmix64_int(key + (int(i) + 1) * dropout.GOLDEN)
        assert kept.flat[i] == ((z >> 11) * 2.0 ** -53 >= 0.3), i
    # evaluation mode (seed None) and p = 0 are the identity
    assert dropout.dropout_forward(x, 0.3, None, site)[0] is x
    assert dropout.dropout_forward(x, 0.0, 7, site)[0] is x
    R = rng.standard_normal(x.shape)
    dx, grads = dropout.dropout_backward(R, c1)
    assert grads == {}
    loss = weighted_sum_loss(lambda: dropout.dropout_forward(x, 0.3, 7, site)[0], R)
    check_gradients(loss, {"x": x}, {"x": dx}, n_max=30, tol=TOL)
    with pytest.raises(ValueError, match="dropout probability"):
        dropout.dropout_forward(x, 1.0, 7, site)
    for bad in (-1, 0.5, "3", True):
        with pytest.raises(ValueError, match="dropout_seed"):
            dropout.dropout_forward(x, 0.3, bad, site)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p):
    """keep rate = 1 - p within 5 standard errors over 2^20 elements (binomial: sd = sqrt(p (1 - p) / n))."""
    n = 1 << 20
    for seed, site in [(0, 0), (123456789, dropout.site_id("dec.4x4_in0")), (2 ** 64 - 1, 1)]:
        rate = dropout.keep_mask_numpy(n, p, dropout.stream_key(seed, site)).mean()
        assert abs(rate - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n), (seed, site, rate)


def test_dropout_float32_scale_rounded_like_the_kernel(rng):
    x = rng.standard_normal((6, 7)).astype(np.float32)
    y, _ = dropout.dropout_forward(x, 0.3, 11, 5)
    keep = dropout.keep_mask_numpy(x.size, 0.3, dropout.stream_key(11, 5)).reshape(x.shape)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.where(keep, x * np.float32(1 / 0.7), np.float32(0)))


@pytest.mark.gpu
def test_dropout_cupy_mask_equals_numpy(rng):
    from ttfm_np import backend
    if not backend.gpu_available():
        pytest.skip(f"no usable GPU: {backend.gpu_problem()}")
    import cupy as cp
    site = dropout.site_id("enc.16x16_block1")
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((3, 5, 17, 19)).astype(dtype)
        y, c = dropout.dropout_forward(x, 0.25, 2 ** 40 + 3, site)
        yg, cg = dropout.dropout_forward(cp.asarray(x), 0.25, 2 ** 40 + 3, site)
        np.testing.assert_array_equal(cp.asnumpy(yg), y)            # the same mask and the same rounding
        R = rng.standard_normal(x.shape).astype(dtype)
        np.testing.assert_array_equal(cp.asnumpy(dropout.dropout_backward(cp.asarray(R), cg)[0]),
                                      dropout.dropout_backward(R, c)[0])


# ---------------------------------------------------------------------------- time embedding

def test_sinusoidal_features_formula():
    t = np.array([0.0, 0.25, 1.0])
    f = embedding.sinusoidal_features(t, 8, scale=1000.0)
    w = 10000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(f, np.concatenate([np.cos(1000 * t[:, None] * w), np.sin(1000 * t[:, None] * w)], 1))


@pytest.mark.parametrize("two_time", [False, True])
def test_time_embedding_grad(rng, two_time):
    p = embedding.init_time_embedding(np.random.default_rng(0), "emb", 8, 12, two_time)
    p = {k: rng.standard_normal(v.shape) * 0.5 for k, v in p.items()}      # random, W_d nonzero
    s = rng.uniform(0, 1, 3)
    t = np.minimum(s + rng.uniform(0, 0.5, 3), 1.0) if two_time else None
    e, cache = embedding.time_embedding_forward(p, "emb", s, t, 8)
    R = rng.standard_normal(e.shape)
    d_times, grads = embedding.time_embedding_backward(R, cache)
    assert d_times is None and set(grads) == set(p)                 # full names; no gradient w.r.t. times
    loss = weighted_sum_loss(lambda: embedding.time_embedding_forward(p, "emb", s, t, 8)[0], R)
    check_gradients(loss, p, grads, tol=TOL)


def test_two_time_embedding_starts_as_one_time(rng):
    p = embedding.init_time_embedding(np.random.default_rng(0), "emb", 8, 12, two_time=True)
    s, t = rng.uniform(0, 1, 4), rng.uniform(0, 1, 4)
    e2, _ = embedding.time_embedding_forward(p, "emb", s, t, 8)
    e1, _ = embedding.time_embedding_forward(p, "emb", s, None, 8)
    np.testing.assert_array_equal(e1, e2)                        # W_d = 0 at initialisation


def test_dropout_rows_of_a_batch_get_the_masks_of_the_whole_batch(rng):
    """A data-parallel rank holding rows [lo, hi) passes (seed, lo): its masks equal the whole batch's rows."""
    x = rng.standard_normal((6, 3, 4, 5))
    site = dropout.site_id("enc.4x4_block0")
    y_all, _ = dropout.dropout_forward(x, 0.3, 99, site)
    for lo, hi in ((0, 2), (2, 5), (5, 6)):
        y_part, cache = dropout.dropout_forward(x[lo:hi], 0.3, (99, lo), site)
        np.testing.assert_array_equal(y_part, y_all[lo:hi])
        dy = rng.standard_normal(y_part.shape)
        np.testing.assert_allclose(dropout.dropout_backward(dy, cache)[0], np.where(y_part != 0, dy / 0.7, 0), rtol=1e-15)
    assert not np.array_equal(dropout.dropout_forward(x[2:5], 0.3, 99, site)[0], y_all[2:5])   # no offset: other masks
