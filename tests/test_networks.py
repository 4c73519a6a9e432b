"""Whole networks: finite-difference gradient checks in float64 for the tiny
U-Net and the MLP, one-time (teacher) and two-time (student), w.r.t. the input
and every parameter tensor; plus shapes, presets and interface errors."""
import numpy as np
import pytest

from gradcheck import check_gradients
from ttfm_np import model, params as P, unet


def _random_params(cfg, seed=0):
    return P.randomize(P.astype(model.init_model(cfg, seed), np.float64), seed=seed + 1, std=0.3)


def _check_network(cfg, x, s, t, rng, dropout_seed=None, n_max=3):
    p = _random_params(cfg)
    make_rng = (lambda: np.random.default_rng(dropout_seed)) if dropout_seed is not None else (lambda: None)
    u, cache = model.model_forward(p, cfg, x, s, t, make_rng())
    assert u.shape == x.shape and u.dtype == np.float64
    R = rng.standard_normal(u.shape)
    dx, grads = model.model_backward(R, cache, p, cfg)
    assert set(grads) == set(p), f"missing grads: {set(p) - set(grads)}"
    loss = lambda: float(np.sum(R * model.model_forward(p, cfg, x, s, t, make_rng())[0]))
    tensors = dict(p, __input__=x)
    analytic = dict(grads, __input__=dx)
    return check_gradients(loss, tensors, analytic, n_max=n_max, tol=1e-6)


@pytest.mark.parametrize("two_time", [False, True])
def test_tiny_unet_gradients(rng, two_time):
    cfg = unet.preset_config("tiny", in_channels=2, resolution=16, two_time=two_time)
    x = rng.standard_normal((2, 2, 16, 16))
    s = rng.uniform(0, 1, 2)
    t = np.clip(s + rng.uniform(0, 0.5, 2), 0, 1) if two_time else None
    errors = _check_network(cfg, x, s, t, rng)
    assert any(".attn.qkv." in k for k in errors) and "emb.fc0.weight" in errors


def test_tiny_unet_gradients_with_dropout(rng):
    cfg = unet.preset_config("tiny", in_channels=1, resolution=8, dropout=0.2, attn_resolutions=(4,))
    x = rng.standard_normal((2, 1, 8, 8))
    _check_network(cfg, x, rng.uniform(0, 1, 2), None, rng, dropout_seed=3, n_max=2)


@pytest.mark.parametrize("two_time", [False, True])
def test_mlp_gradients(rng, two_time):
    cfg = model.make_config("mlp-tiny", (2,), two_time=two_time)
    x = rng.standard_normal((5, 2))
    s = rng.uniform(0, 1, 5)
    t = np.clip(s + rng.uniform(0, 0.5, 5), 0, 1) if two_time else None
    _check_network(cfg, x, s, t, rng, n_max=6)


def test_repeated_forwards_then_backwards(rng):
    """Two evaluations, then both backwards in either order: caches are independent values."""
    cfg = unet.preset_config("tiny", in_channels=1, resolution=8, attn_resolutions=(4,), two_time=True)
    p = _random_params(cfg)
    xa, xb = rng.standard_normal((2, 1, 8, 8)), rng.standard_normal((2, 1, 8, 8))
    s, t = np.array([0.1, 0.3]), np.array([0.5, 0.9])
    Ra, Rb = rng.standard_normal(xa.shape), rng.standard_normal(xb.shape)
    ua, ca = model.model_forward(p, cfg, xa, s, t)
    ub, cb = model.model_forward(p, cfg, xb, s, s)
    dxb, gb = model.model_backward(Rb, cb, p, cfg)
    dxa, ga = model.model_backward(Ra, ca, p, cfg)
    dxa2, ga2 = model.model_backward(Ra, model.model_forward(p, cfg, xa, s, t)[1], p, cfg)
    np.testing.assert_array_equal(dxa, dxa2)
    for k in p:
        np.testing.assert_array_equal(ga[k], ga2[k])


def test_zero_initialised_output_and_preset_shapes(rng):
    cfg = unet.preset_config("tiny", in_channels=3, resolution=16)
    p = unet.init_unet(cfg)
    assert not p["out.conv.weight"].any()
    u, _ = unet.unet_forward(p, cfg, rng.standard_normal((2, 3, 16, 16)).astype(np.float32), np.array([0.1, 0.9], np.float32))
    assert u.dtype == np.float32 and not u.any()          # zero output conv -> zero velocity at init


def test_preset_parameter_counts():
    """Counts documented in the README (python cli.py params --model cifar10)."""
    assert P.count(unet.init_unet(unet.preset_config("small", 3, 32))) == 6_339_587
    assert 50e6 < P.count(unet.init_unet(unet.preset_config("cifar10", 3, 32))) < 60e6


def test_interface_errors(rng):
    cfg = unet.preset_config("tiny", in_channels=1, resolution=8, attn_resolutions=(4,))
    p = unet.init_unet(cfg)
    with pytest.raises(ValueError, match="built for inputs"):
        unet.unet_forward(p, cfg, np.zeros((1, 3, 8, 8), np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="one-time"):
        unet.unet_forward(p, cfg, np.zeros((1, 1, 8, 8), np.float32), np.zeros(1, np.float32), np.ones(1, np.float32))
    with pytest.raises(ValueError, match="not divisible"):
        unet.layout(unet.preset_config("small", 3, 18))
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        unet.preset_config("huge")
    with pytest.raises(ValueError, match="use --model mlp"):
        model.make_config("tiny", (2,))
