"""Whole networks: finite-difference gradient checks in float64 for the tiny
U-Net and the MLP, one-time (teacher) and two-time (student), w.r.t. the input
and every parameter tensor; plus shapes, presets and interface errors."""
import dataclasses
import tracemalloc

import numpy as np
import pytest

from gradcheck import check_gradients
from ttfm_np import model, params as P, unet


def _random_params(cfg, seed=0):
    return P.randomize(P.astype(model.init_model(cfg, seed), np.float64), seed=seed + 1, std=0.3)


def _check_network(cfg, x, s, t, rng, dropout_seed=None, n_max=3):
    p = _random_params(cfg)
    u, cache = model.model_forward(p, cfg, x, s, t, dropout_seed)
    assert u.shape == x.shape and u.dtype == np.float64
    R = rng.standard_normal(u.shape)
    dx, grads = model.model_backward(R, cache)
    assert set(grads) == set(p), f"missing grads: {set(p) - set(grads)}"
    # the same dropout_seed in every evaluation: the same masks (dropout.py)
    loss = lambda: float(np.sum(R * model.model_forward(p, cfg, x, s, t, dropout_seed)[0]))
    tensors = dict(p, __input__=x)
    analytic = dict(grads, __input__=dx)
    return check_gradients(loss, tensors, analytic, n_max=n_max, tol=1e-6)


def _tiny_unet(two_time, in_channels=1, dropout=0.2):
    """The smallest U-Net with every path: 8x8 and 4x4 levels (stride-2 down, nearest up),
    attention at 4x4 (encoder block, decoder in0 and last block), 1x1 skip convs where the
    channels change, the decoder's concatenations, dropout in every block."""
    return unet.preset_config("tiny", in_channels=in_channels, resolution=8, attn_resolutions=(4,),
                              dropout=dropout, two_time=two_time)


@pytest.mark.parametrize("two_time", [False, True])
def test_tiny_unet_gradients(rng, two_time):
    """Every parameter tensor and the input, with dropout active (the same dropout_seed in
    every evaluation gives the same masks, so finite differences see one fixed network)."""
    cfg = _tiny_unet(two_time)
    layers = {e["kind"] for e in unet.layout(cfg)[0] + unet.layout(cfg)[1]}
    assert layers == {"conv", "down", "up", "block"}
    x = rng.standard_normal((2, 1, 8, 8))
    s = rng.uniform(0, 1, 2)
    t = np.clip(s + rng.uniform(0, 0.5, 2), 0, 1) if two_time else None
    errors = _check_network(cfg, x, s, t, rng, dropout_seed=3, n_max=2)
    assert any(".attn.qkv." in k for k in errors) and any(".skip." in k for k in errors)
    assert "emb.fc0.weight" in errors and ("emb.delta.weight" in errors) == two_time


def test_dropout_seed_fixes_the_masks(rng):
    """Same dropout_seed: identical outputs; another seed: other masks; None: no dropout."""
    cfg = _tiny_unet(two_time=False, dropout=0.3)
    p = _random_params(cfg)
    x, s = rng.standard_normal((2, 1, 8, 8)), rng.uniform(0, 1, 2)
    u = lambda seed: model.model_forward(p, cfg, x, s, None, seed)[0]
    np.testing.assert_array_equal(u(5), u(5))
    assert not np.array_equal(u(5), u(6))
    assert not np.array_equal(u(5), u(None))
    np.testing.assert_array_equal(u(None), model.model_forward(p, dataclasses.replace(cfg, dropout=0.0), x, s)[0])


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_forward_only_returns_no_cache(rng, kind):
    """need_grad=False: the same output, no cache; a backward on it names the fix."""
    if kind == "unet":
        cfg, x = _tiny_unet(two_time=True), rng.standard_normal((2, 1, 8, 8))
    else:
        cfg, x = model.make_config("mlp-tiny", (2,), two_time=True), rng.standard_normal((5, 2))
    p = _random_params(cfg)
    s, t = rng.uniform(0, 0.5, x.shape[0]), rng.uniform(0.5, 1, x.shape[0])
    u, cache = model.model_forward(p, cfg, x, s, t, 4)
    u0, none = model.model_forward(p, cfg, x, s, t, 4, need_grad=False)
    assert cache is not None and none is None
    np.testing.assert_array_equal(u, u0)
    with pytest.raises(ValueError, match="need_grad=True"):
        model.model_backward(u, none)


def test_forward_only_memory_does_not_grow_with_depth(rng):
    """Peak traced memory (NumPy allocations) of one forward: with caches it grows by the
    caches of every added block; forward-only (need_grad=False) it grows only by the block's
    skip activations, because each layer's cache is dropped the moment it is produced."""
    x, s = rng.standard_normal((4, 3, 16, 16)).astype(np.float32), np.full(4, 0.5, np.float32)
    from ttfm_np import parallel
    parallel.set_workers(1)       # one pass: with sample blocks on two threads the peaks of both blocks overlap in time

    def peak(blocks, need_grad):
        cfg = unet.preset_config("tiny", in_channels=3, resolution=16, num_res_blocks=blocks)
        p = P.astype(model.init_model(cfg, 0), np.float32)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            out = model.model_forward(p, cfg, x, s, need_grad=need_grad)  # noqa: F841 (kept alive)
            return tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()

    try:
        growth_cached = peak(3, True) - peak(1, True)
        growth_forward_only = peak(3, False) - peak(1, False)
    finally:
        parallel.set_workers(None)
    assert growth_cached > 0 and growth_forward_only < 0.1 * growth_cached, (growth_forward_only, growth_cached)


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
    dxb, gb = model.model_backward(Rb, cb)
    dxa, ga = model.model_backward(Ra, ca)
    dxa2, ga2 = model.model_backward(Ra, model.model_forward(p, cfg, xa, s, t)[1])
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
