"""Forward-mode tangents (JVP) through every layer and network, and their backward
(reverse over forward), all in float64 on fresh random inputs and tangents:

* y_dot of every `*_jvp` against central differences (f(x + eps x_dot) - f(x - eps x_dot)) / 2 eps,
  and its primal y against the layer's forward;
* the adjoint identity <backward(dy), x_dot> == <dy, jvp(x_dot)> (the backward and the tangent
  are transposes of one Jacobian);
* every `*_jvp_backward` (gradients of L = <R, y> + <R_dot, y_dot> w.r.t. x, x_dot and the
  parameters) against finite differences of L;
* a few layers against torch.func.jvp where torch is installed.
Dropout is on wherever a layer or network has it (one dropout_seed: one mask).
"""
import numpy as np
import pytest

from gradcheck import check_gradients, rel_error
from ttfm_np import embedding, model, params as P, ttfm, unet
from ttfm_np.activations import silu_backward, silu_forward, silu_jvp, silu_jvp_backward
from ttfm_np.attention import attention_backward, attention_forward, attention_jvp, attention_jvp_backward
from ttfm_np.conv import conv2d_backward, conv2d_forward, conv2d_jvp, conv2d_jvp_backward
from ttfm_np.dropout import dropout_backward, dropout_forward, dropout_jvp, dropout_jvp_backward
from ttfm_np.groupnorm import groupnorm_backward, groupnorm_forward, groupnorm_jvp, groupnorm_jvp_backward
from ttfm_np.linear import linear_backward, linear_forward, linear_jvp, linear_jvp_backward
from ttfm_np.resample import (upsample_nearest2x_backward, upsample_nearest2x_forward, upsample_nearest2x_jvp,
                              upsample_nearest2x_jvp_backward)
from ttfm_np.resblock import init_resblock, resblock_backward, resblock_forward, resblock_jvp, resblock_jvp_backward

EPS = 1e-5          # central difference step: truncation ~ eps^2 |f'''| ~ 1e-10, round-off ~ 1e-16 / eps ~ 1e-11
TOL = 1e-6          # the project's gradient-check tolerance


def _layer(name, rng):
    """(x, params, forward(x, p), backward, jvp(x, p, x_dot), jvp_backward) of one layer."""
    n = rng.standard_normal
    if name == "linear":
        p = dict(weight=n((6, 5)), bias=n(6))
        return (n((3, 4, 5)), p, lambda x, p: linear_forward(x, p["weight"], p["bias"]), linear_backward,
                lambda x, p, xd: linear_jvp(x, p["weight"], p["bias"], xd), linear_jvp_backward)
    if name == "silu":
        return (2 * n((4, 7)), {}, lambda x, p: silu_forward(x), silu_backward,
                lambda x, p, xd: silu_jvp(x, xd), silu_jvp_backward)
    if name.startswith("conv"):
        k, stride, pad = {"conv3x3": (3, 1, 1), "conv_stride2": (3, 2, 1), "conv1x1": (1, 1, 0)}[name]
        p = dict(weight=n((4, 3, k, k)), bias=n(4))
        return (n((2, 3, 6, 6)), p, lambda x, p: conv2d_forward(x, p["weight"], p["bias"], stride, pad),
                conv2d_backward, lambda x, p, xd: conv2d_jvp(x, p["weight"], p["bias"], xd, stride, pad),
                conv2d_jvp_backward)
    if name.startswith("groupnorm"):
        silu = name.endswith("silu")
        p = dict(gamma=1 + 0.3 * n(8), beta=n(8))
        return (n((2, 8, 4, 4)) + 1, p,
                lambda x, p: groupnorm_forward(x, p["gamma"], p["beta"], 4, silu=silu), groupnorm_backward,
                lambda x, p, xd: groupnorm_jvp(x, p["gamma"], p["beta"], 4, xd, silu=silu), groupnorm_jvp_backward)
    if name == "attention":
        p = {"qkv.weight": 0.5 * n((24, 8)), "qkv.bias": n(24), "proj.weight": 0.5 * n((8, 8)), "proj.bias": n(8)}
        args = lambda p: (p["qkv.weight"], p["qkv.bias"], p["proj.weight"], p["proj.bias"], 2)
        return (n((2, 8, 3, 3)), p, lambda x, p: attention_forward(x, *args(p)), attention_backward,
                lambda x, p, xd: attention_jvp(x, *args(p), xd), attention_jvp_backward)
    if name == "dropout":
        return (n((3, 4, 5)), {}, lambda x, p: dropout_forward(x, 0.3, 11, 7), dropout_backward,
                lambda x, p, xd: dropout_jvp(x, xd, 0.3, 11, 7), dropout_jvp_backward)
    if name == "upsample":
        return (n((2, 3, 3, 3)), {}, lambda x, p: upsample_nearest2x_forward(x), upsample_nearest2x_backward,
                lambda x, p, xd: upsample_nearest2x_jvp(x, xd), upsample_nearest2x_jvp_backward)
    raise KeyError(name)


LAYERS = ["linear", "silu", "conv3x3", "conv_stride2", "conv1x1", "groupnorm", "groupnorm_silu", "attention",
          "dropout", "upsample"]


def _central(f, x, xd, eps=EPS):
    return (f(x + eps * xd) - f(x - eps * xd)) / (2 * eps)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_jvp_matches_central_differences(name, rng):
    x, p, fwd, _, jvp, _ = _layer(name, rng)
    xd = rng.standard_normal(x.shape)
    y, yd, _ = jvp(x, p, xd)
    np.testing.assert_array_equal(y, fwd(x, p)[0])                 # the primal is the forward's output
    ref = _central(lambda z: fwd(z, p)[0], x, xd)
    assert rel_error(yd, ref) < TOL, (name, rel_error(yd, ref))
    if name == "dropout":
        assert np.count_nonzero(yd == 0) > 0 and np.count_nonzero(yd) > 0       # dropout was on


@pytest.mark.parametrize("name", LAYERS)
def test_layer_jvp_is_the_transpose_of_backward(name, rng):
    """<backward(dy), x_dot> == <dy, jvp(x_dot)>: the same Jacobian, applied from either side."""
    x, p, fwd, bwd, jvp, _ = _layer(name, rng)
    xd = rng.standard_normal(x.shape)
    y, cache = fwd(x, p)
    dy = rng.standard_normal(y.shape)
    lhs = float(np.sum(bwd(dy, cache)[0] * xd))
    rhs = float(np.sum(dy * jvp(x, p, xd)[1]))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs)), (name, lhs, rhs)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_jvp_backward_matches_finite_differences(name, rng):
    """Reverse over forward: d/d(x, x_dot, params) of L = <R, y> + <R_dot, y_dot>."""
    x, p, _, _, jvp, jvp_bwd = _layer(name, rng)
    xd = rng.standard_normal(x.shape)
    y, yd, cache = jvp(x, p, xd)
    R, Rd = rng.standard_normal(y.shape), rng.standard_normal(yd.shape)
    dx, dxd, grads = jvp_bwd(R, Rd, cache)
    assert set(grads) == set(p)

    def loss():
        y, yd, _ = jvp(x, p, xd)
        return float(np.sum(R * y) + np.sum(Rd * yd))
    check_gradients(loss, dict(p, __x__=x, __x_dot__=xd), dict(grads, __x__=dx, __x_dot__=dxd), n_max=8)


def test_time_embedding_jvp_in_the_times(rng):
    """e(s, t) = E(s) + W_d E(t - s): tangent along (s_dot, t_dot) and its backward."""
    p = P.randomize(P.astype(embedding.init_time_embedding(rng, "emb", 8, 12, True), np.float64), seed=1)
    s, t = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    sd, td = rng.standard_normal(3), rng.standard_normal(3)
    scale = 3.0                                     # a moderate frequency keeps the difference exact to ~1e-10
    e, ed, cache = embedding.time_embedding_jvp(p, "emb", s, sd, t, td, 8, scale)
    np.testing.assert_array_equal(e, embedding.time_embedding_forward(p, "emb", s, t, 8, scale)[0])
    f = lambda a: embedding.time_embedding_forward(p, "emb", s + a * sd, t + a * td, 8, scale)[0]
    ref = (f(EPS) - f(-EPS)) / (2 * EPS)
    assert rel_error(ed, ref) < TOL
    R, Rd = rng.standard_normal(e.shape), rng.standard_normal(e.shape)
    _, _, grads = embedding.time_embedding_jvp_backward(R, Rd, cache)
    assert set(grads) == set(p)

    def loss():
        e, ed, _ = embedding.time_embedding_jvp(p, "emb", s, sd, t, td, 8, scale)
        return float(np.sum(R * e) + np.sum(Rd * ed))
    check_gradients(loss, p, grads, n_max=6)


def test_resblock_jvp_and_backward(rng):
    """A block with a 1x1 skip, attention and dropout on: tangent in (x, emb_act) and its backward."""
    p = P.randomize(P.astype(init_resblock(rng, "b", 4, 8, 6, True), np.float64), seed=2, std=0.3)
    kw = dict(attention=True, head_channels=4, dropout=0.3, dropout_seed=5)
    x, ea = rng.standard_normal((2, 4, 4, 4)), rng.standard_normal((2, 6))
    xd, ead = rng.standard_normal(x.shape), rng.standard_normal(ea.shape)
    y, yd, cache = resblock_jvp(p, "b", x, ea, xd, ead, **kw)
    np.testing.assert_array_equal(y, resblock_forward(p, "b", x, ea, **kw)[0])
    f = lambda a: resblock_forward(p, "b", x + a * xd, ea + a * ead, **kw)[0]
    assert rel_error(yd, (f(EPS) - f(-EPS)) / (2 * EPS)) < TOL
    # adjoint identity against the existing backward
    dy = rng.standard_normal(y.shape)
    (dx, de), _ = resblock_backward(dy, resblock_forward(p, "b", x, ea, **kw)[1])
    lhs, rhs = float(np.sum(dx * xd) + np.sum(de * ead)), float(np.sum(dy * yd))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))
    R, Rd = rng.standard_normal(y.shape), rng.standard_normal(y.shape)
    (gx, gea), (gxd, gead), grads = resblock_jvp_backward(R, Rd, cache)
    assert set(grads) == set(p)

    def loss():
        y, yd, _ = resblock_jvp(p, "b", x, ea, xd, ead, **kw)
        return float(np.sum(R * y) + np.sum(Rd * yd))
    check_gradients(loss, dict(p, __x__=x, __ea__=ea, __xd__=xd, __ead__=ead),
                    dict(grads, __x__=gx, __ea__=gea, __xd__=gxd, __ead__=gead), n_max=3)


# ----------------------------------------------------------------------------- networks

def _tiny_unet(two_time):
    return unet.preset_config("tiny", in_channels=1, resolution=8, attn_resolutions=(4,), dropout=0.2,
                              two_time=two_time, time_scale=5.0)


def _mlp(two_time):
    return model.make_config("mlp-tiny", (2,), two_time=two_time, time_scale=5.0)


def _network_case(kind, two_time, rng):
    cfg = _tiny_unet(two_time) if kind == "unet" else _mlp(two_time)
    p = P.randomize(P.astype(model.init_model(cfg, 0), np.float64), seed=1, std=0.3)
    x = rng.standard_normal((2,) + cfg.sample_shape)
    s = rng.uniform(0, 0.6, 2)
    t = s + rng.uniform(0, 0.4, 2) if two_time else None
    tangents = (rng.standard_normal(x.shape), rng.standard_normal(2), rng.standard_normal(2) if two_time else None)
    return cfg, p, x, s, t, tangents


# time_scale 5 in these tests: the tangent of sin(1000 t) is exact either way, but a central difference
# of it would need eps ~ 1e-8 (truncation (1000 eps)^2 / 6), where round-off is ~1e-8 relative.
@pytest.mark.parametrize("kind,two_time", [("mlp", False), ("mlp", True), ("unet", False), ("unet", True)])
def test_model_jvp_matches_central_differences(kind, two_time, rng):
    cfg, p, x, s, t, (xd, sd, td) = _network_case(kind, two_time, rng)
    seed = 3                                          # dropout on (U-Net): one mask for every evaluation
    u, ud, _ = model.model_jvp(p, cfg, x, s, t, xd, sd, td, seed, need_grad=False)
    np.testing.assert_array_equal(u, model.model_forward(p, cfg, x, s, t, seed, need_grad=False)[0])
    f = lambda a: model.model_forward(p, cfg, x + a * xd, s + a * sd, None if t is None else t + a * td, seed,
                                      need_grad=False)[0]
    ref = (f(EPS) - f(-EPS)) / (2 * EPS)
    assert rel_error(ud, ref) < TOL, rel_error(ud, ref)


@pytest.mark.parametrize("kind,two_time", [("mlp", True), ("unet", False), ("unet", True)])
def test_model_jvp_backward_matches_finite_differences(kind, two_time, rng):
    """Reverse over forward through a whole network (every parameter tensor, the input and its tangent)."""
    cfg, p, x, s, t, (xd, sd, td) = _network_case(kind, two_time, rng)
    u, ud, cache = model.model_jvp(p, cfg, x, s, t, xd, sd, td, 3)
    R, Rd = rng.standard_normal(u.shape), rng.standard_normal(u.shape)
    dx, dxd, grads = model.model_jvp_backward(R, Rd, cache)
    assert set(grads) == set(p), set(p) - set(grads)

    def loss():
        u, ud, _ = model.model_jvp(p, cfg, x, s, t, xd, sd, td, 3, need_grad=False)
        return float(np.sum(R * u) + np.sum(Rd * ud))
    check_gradients(loss, dict(p, __x__=x, __xd__=xd), dict(grads, __x__=dx, __xd__=dxd), n_max=2)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_phi_jvp_and_backward(kind, rng):
    """phi(x, s, t) = x + (t - s) u: the two-time tangent (x_dot, s_dot, t_dot) and its backward."""
    cfg, p, x, s, t, (xd, sd, td) = _network_case(kind, True, rng)
    phi, phid, cache = ttfm.phi_jvp(p, cfg, x, s, t, xd, sd, td, 3)
    np.testing.assert_array_equal(phi, ttfm.phi_forward(p, cfg, x, s, t, 3, need_grad=False)[0])
    f = lambda a: ttfm.phi_forward(p, cfg, x + a * xd, s + a * sd, t + a * td, 3, need_grad=False)[0]
    assert rel_error(phid, (f(EPS) - f(-EPS)) / (2 * EPS)) < TOL
    # d/dt phi with the tangent (0, 0, 1)
    dphi_dt = ttfm.phi_jvp(p, cfg, x, s, t, np.zeros_like(x), 0.0, 1.0, 3, need_grad=False)[1]
    g = lambda a: ttfm.phi_forward(p, cfg, x, s, t + a, 3, need_grad=False)[0]
    assert rel_error(dphi_dt, (g(EPS) - g(-EPS)) / (2 * EPS)) < TOL
    R, Rd = rng.standard_normal(phi.shape), rng.standard_normal(phi.shape)
    dx, dxd, grads = ttfm.phi_jvp_backward(R, Rd, cache)

    def loss():
        phi, phid, _ = ttfm.phi_jvp(p, cfg, x, s, t, xd, sd, td, 3, need_grad=False)
        return float(np.sum(R * phi) + np.sum(Rd * phid))
    some = {k: p[k] for k in list(p)[::5]}            # every fifth tensor: the network test covers the rest
    check_gradients(loss, dict(some, __x__=x, __xd__=xd), dict(grads, __x__=dx, __xd__=dxd), n_max=2)


def test_time_tangent_shape_is_checked(rng):
    cfg, p, x, s, t, (xd, _, _) = _network_case("mlp", True, rng)
    with pytest.raises(ValueError, match="one entry per sample"):
        model.model_jvp(p, cfg, x, s, t, xd, np.ones(5), None)


# ----------------------------------------------------------------------------- torch

@pytest.mark.torch
@pytest.mark.parametrize("name", ["silu", "groupnorm_silu", "attention", "conv_stride2"])
def test_layer_jvp_matches_torch_func_jvp(name, rng):
    torch = pytest.importorskip("torch", reason="torch is not installed: the torch.func.jvp comparison is skipped")
    F = torch.nn.functional
    x, p, _, _, jvp, _ = _layer(name, rng)
    xd = rng.standard_normal(x.shape)
    T = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    tp = {k: T(v) for k, v in p.items()}
    if name == "silu":
        f = F.silu
    elif name == "groupnorm_silu":
        f = lambda z: F.silu(F.group_norm(z, 4, tp["gamma"], tp["beta"], eps=1e-5))
    elif name == "conv_stride2":
        f = lambda z: F.conv2d(z, tp["weight"], tp["bias"], stride=2, padding=1)
    else:
        def f(z):
            N, C, H, W = z.shape
            qkv = torch.einsum("oc,ncl->nol", tp["qkv.weight"], z.reshape(N, C, H * W)) + tp["qkv.bias"][None, :, None]
            q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(N, 2, C // 2, H * W).transpose(2, 3) for i in range(3))
            o = F.scaled_dot_product_attention(q, k, v)                        # (N, h, L, d)
            o = o.transpose(2, 3).reshape(N, C, H * W)
            y = torch.einsum("oc,ncl->nol", tp["proj.weight"], o) + tp["proj.bias"][None, :, None]
            return y.reshape(N, C, H, W)
    _, ref = torch.func.jvp(f, (T(x),), (T(xd),))
    yd = jvp(x, p, xd)[1]
    assert rel_error(yd, ref.numpy()) < 1e-12
