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
    dx, dW, db = linear.linear_backward(R, cache)
    loss = weighted_sum_loss(lambda: linear.linear_forward(x, W, b)[0], R)
    check_gradients(loss, {"x": x, "W": W, "b": b}, {"x": dx, "W": dW, "b": db}, tol=TOL)


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
    dx, dW, db = conv.conv2d_backward(R, cache)
    loss = weighted_sum_loss(lambda: conv.conv2d_forward(x, Wt, b, stride, pad)[0], R)
    check_gradients(loss, {"x": x, "W": Wt, "b": b}, {"x": dx, "W": dW, "b": db}, tol=TOL)


def test_conv2d_float32_stays_float32(rng):
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    Wt = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y, cache = conv.conv2d_forward(x, Wt, None, 1, 1)
    assert y.dtype == np.float32
    dx, dW, db = conv.conv2d_backward(np.ones_like(y), cache)
    assert dx.dtype == dW.dtype == np.float32 and db is None


def test_conv2d_channel_mismatch_names_the_problem(rng):
    with pytest.raises(ValueError, match="3 channels"):
        conv.conv2d_forward(rng.standard_normal((1, 3, 4, 4)), rng.standard_normal((2, 5, 3, 3)), None, 1, 1)


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
    dx, dg, db = groupnorm.groupnorm_backward(R, cache)
    loss = weighted_sum_loss(lambda: groupnorm.groupnorm_forward(x, gamma, beta, 3, 1e-5, silu)[0], R)
    check_gradients(loss, {"x": x, "gamma": gamma, "beta": beta}, {"x": dx, "gamma": dg, "beta": db}, tol=TOL)


def test_groupnorm_rejects_bad_groups(rng):
    with pytest.raises(ValueError, match="cannot be split"):
        groupnorm.groupnorm_forward(rng.standard_normal((1, 6, 2, 2)), np.ones(6), np.zeros(6), 4)


def test_silu_forward_and_grad(rng):
    x = rng.standard_normal((5, 7)) * 3
    y, cache = activations.silu_forward(x)
    np.testing.assert_allclose(y, x / (1 + np.exp(-x)), rtol=1e-12)
    R = rng.standard_normal(y.shape)
    dx = activations.silu_backward(R, cache)
    check_gradients(weighted_sum_loss(lambda: activations.silu_forward(x)[0], R), {"x": x}, {"x": dx}, tol=TOL)


def test_silu_no_overflow_warning():
    x = np.array([-1000.0, 1000.0], np.float32)
    with np.errstate(all="raise"):
        y, _ = activations.silu_forward(x)
    np.testing.assert_allclose(y, [0.0, 1000.0])


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
    dx, dWqkv, dbqkv, dWo, dbo = attention.attention_backward(R, cache)
    loss = weighted_sum_loss(lambda: attention.attention_forward(x, Wqkv, bqkv, Wo, bo, heads)[0], R)
    check_gradients(loss, {"x": x, "Wqkv": Wqkv, "bqkv": bqkv, "Wo": Wo, "bo": bo},
                    {"x": dx, "Wqkv": dWqkv, "bqkv": dbqkv, "Wo": dWo, "bo": dbo}, n_max=20, tol=TOL)


# ---------------------------------------------------------------------------- resampling, dropout

def test_upsample_nearest(rng):
    x = rng.standard_normal((2, 3, 3, 4))
    y, cache = resample.upsample_nearest2x_forward(x)
    np.testing.assert_array_equal(y, x.repeat(2, axis=2).repeat(2, axis=3))
    R = rng.standard_normal(y.shape)
    dx = resample.upsample_nearest2x_backward(R, cache)
    check_gradients(weighted_sum_loss(lambda: resample.upsample_nearest2x_forward(x)[0], R),
                    {"x": x}, {"x": dx}, tol=TOL)


def test_avgpool2x2(rng):
    x = rng.standard_normal((2, 3, 4, 6))
    y, cache = resample.avgpool2x2_forward(x)
    np.testing.assert_allclose(y[0, 1, 1, 2], x[0, 1, 2:4, 4:6].mean())
    R = rng.standard_normal(y.shape)
    dx = resample.avgpool2x2_backward(R, cache)
    check_gradients(weighted_sum_loss(lambda: resample.avgpool2x2_forward(x)[0], R), {"x": x}, {"x": dx}, tol=TOL)


def test_dropout_seeded_and_grad(rng):
    x = rng.standard_normal((50, 40))
    y1, c1 = dropout.dropout_forward(x, 0.3, np.random.default_rng(7))
    y2, _ = dropout.dropout_forward(x, 0.3, np.random.default_rng(7))
    np.testing.assert_array_equal(y1, y2)                         # same seed, same mask
    kept = y1 != 0
    assert 0.6 < kept.mean() < 0.8
    np.testing.assert_allclose(y1[kept], x[kept] / 0.7)
    R = rng.standard_normal(x.shape)
    dx = dropout.dropout_backward(R, c1)
    loss = weighted_sum_loss(lambda: dropout.dropout_forward(x, 0.3, np.random.default_rng(7))[0], R)
    check_gradients(loss, {"x": x}, {"x": dx}, n_max=30, tol=TOL)
    with pytest.raises(ValueError, match="dropout probability"):
        dropout.dropout_forward(x, 1.0, rng)


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
    grads = {}
    embedding.time_embedding_backward(R, cache, "emb", grads)
    loss = weighted_sum_loss(lambda: embedding.time_embedding_forward(p, "emb", s, t, 8)[0], R)
    check_gradients(loss, p, grads, tol=TOL)


def test_two_time_embedding_starts_as_one_time(rng):
    p = embedding.init_time_embedding(np.random.default_rng(0), "emb", 8, 12, two_time=True)
    s, t = rng.uniform(0, 1, 4), rng.uniform(0, 1, 4)
    e2, _ = embedding.time_embedding_forward(p, "emb", s, t, 8)
    e1, _ = embedding.time_embedding_forward(p, "emb", s, None, 8)
    np.testing.assert_array_equal(e1, e2)                        # W_d = 0 at initialisation
