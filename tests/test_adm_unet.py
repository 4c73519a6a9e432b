"""The ADM U-Net (adm_unet.py) and its pieces: float64 finite-difference gradient checks of the
residual block, the head-major attention, the resampling layers and the whole network (one-time
and two-time, with dropout); the two-time warm start; equivalence with torchcfm's own module
(same weights: velocity and input gradient to 1e-10 in float64); the GPU path on the stand-in."""
import dataclasses
import math

import numpy as np
import pytest

from gradcheck import check_gradients
from ttfm_np import adm_unet, backend, model, ttfm
from ttfm_np import params as P
from ttfm_np.adm_attention import adm_attention_backward, adm_attention_forward, head_major_rows, init_adm_attention
from ttfm_np.adm_resample import downsample_backward, downsample_forward, upsample_backward, upsample_forward
from ttfm_np.adm_resblock import adm_resblock_backward, adm_resblock_forward, init_adm_resblock

TOL = 1e-6


def _random(p, seed=1):
    return P.randomize(P.astype(p, np.float64), seed=seed, std=0.3)


def _tiny(two_time=False, dropout=0.2):
    """Every path of the network at 8x8 / 4x4: stem conv, ResBlocks with and without a 1x1 skip,
    attention at 4x4 (encoder, middle, decoder) with 2 and 4 heads, stride-2 down, nearest+conv up,
    the decoder's concatenations, dropout."""
    return adm_unet.ADMConfig(in_channels=2, resolution=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                              attn_resolutions=(4,), num_heads=2, num_head_channels=4, norm_groups=4,
                              dropout=dropout, two_time=two_time)


# ----------------------------------------------------------------------------- layers

@pytest.mark.parametrize("cin,cout,dropout_seed", [(4, 8, 5), (8, 8, None)])
def test_adm_resblock_gradients(rng, cin, cout, dropout_seed):
    p = _random(init_adm_resblock(np.random.default_rng(0), "b", cin, cout, 6))
    x = rng.standard_normal((2, cin, 5, 5))
    emb_act = rng.standard_normal((2, 6))
    y, cache = adm_resblock_forward(p, "b", x, emb_act, groups=4, dropout=0.3, dropout_seed=dropout_seed)
    assert y.shape == (2, cout, 5, 5)
    R = rng.standard_normal(y.shape)
    (dx, de), grads = adm_resblock_backward(R, cache)
    assert set(grads) == set(p)
    loss = lambda: float(np.sum(R * adm_resblock_forward(p, "b", x, emb_act, groups=4, dropout=0.3,
                                                         dropout_seed=dropout_seed)[0]))
    check_gradients(loss, dict(p, x=x, emb_act=emb_act), dict(grads, x=dx, emb_act=de), tol=TOL)


def test_adm_resblock_is_its_skip_path_at_init(rng):
    """conv1 starts at zero (ADM's zero_module): y = skip(x) exactly."""
    p = P.astype(init_adm_resblock(np.random.default_rng(0), "b", 8, 8, 6), np.float64)
    x = rng.standard_normal((2, 8, 4, 4))
    y, _ = adm_resblock_forward(p, "b", x, rng.standard_normal((2, 6)), groups=4)
    np.testing.assert_array_equal(y, x)


def test_head_major_rows_matches_the_legacy_split():
    """ADM's QKVAttentionLegacy reshapes qkv (3C, L) to (heads, 3d, L) and splits each head's rows
    into q, k, v; the permutation must pick exactly those rows in attention.py's order."""
    C, heads, d = 12, 3, 4
    rows = np.arange(3 * C)
    legacy = rows.reshape(heads, 3 * d)                           # (heads, 3d): head h's q, k, v rows
    q, k, v = legacy[:, :d], legacy[:, d:2 * d], legacy[:, 2 * d:]  # (heads, d) each
    part_major = np.concatenate([q.reshape(-1), k.reshape(-1), v.reshape(-1)])
    np.testing.assert_array_equal(head_major_rows(C, heads), part_major)
    with pytest.raises(ValueError, match="12 channels cannot be split into 5 heads"):
        head_major_rows(12, 5)


@pytest.mark.parametrize("heads", [1, 2])
def test_adm_attention_gradients(rng, heads):
    p = _random(init_adm_attention(np.random.default_rng(0), "a", 8))
    x = rng.standard_normal((2, 8, 3, 3))
    y, cache = adm_attention_forward(p, "a", x, heads=heads, groups=4)
    R = rng.standard_normal(y.shape)
    dx, grads = adm_attention_backward(R, cache)
    assert set(grads) == set(p)
    loss = lambda: float(np.sum(R * adm_attention_forward(p, "a", x, heads=heads, groups=4)[0]))
    check_gradients(loss, dict(p, x=x), dict(grads, x=dx), tol=TOL)


def test_resampling_gradients_and_shapes(rng):
    W, b = rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(6)
    for forward, backward, H, Ho in ((downsample_forward, downsample_backward, 8, 4),
                                     (upsample_forward, upsample_backward, 3, 6)):
        x = rng.standard_normal((2, 4, H, H))
        y, cache = forward(x, W, b)
        assert y.shape == (2, 6, Ho, Ho)
        R = rng.standard_normal(y.shape)
        dx, grads = backward(R, cache)
        loss = lambda: float(np.sum(R * forward(x, W, b)[0]))
        check_gradients(loss, {"x": x, "weight": W, "bias": b}, dict(grads, x=dx), tol=TOL)


# ----------------------------------------------------------------------------- whole network

@pytest.mark.parametrize("two_time", [False, True])
def test_tiny_adm_unet_gradients(rng, two_time):
    cfg = _tiny(two_time)
    p = _random(model.init_model(cfg, 0))
    x = rng.standard_normal((2,) + cfg.sample_shape)
    s = rng.uniform(0, 1, 2)
    t = rng.uniform(0, 1, 2) if two_time else None
    u, cache = model.model_forward(p, cfg, x, s, t, dropout_seed=3)
    assert u.shape == x.shape and u.dtype == np.float64
    R = rng.standard_normal(u.shape)
    dx, grads = model.model_backward(R, cache)
    assert set(grads) == set(p), f"missing grads: {set(p) - set(grads)}"
    loss = lambda: float(np.sum(R * model.model_forward(p, cfg, x, s, t, dropout_seed=3)[0]))
    check_gradients(loss, dict(p, __input__=x), dict(grads, __input__=dx), n_max=3, tol=TOL)


def test_forward_only_and_config_round_trip(rng):
    cfg = _tiny()
    p = _random(model.init_model(cfg, 0))
    x, s = rng.standard_normal((2,) + cfg.sample_shape), rng.uniform(0, 1, 2)
    u, _ = model.model_forward(p, cfg, x, s)
    u2, none = model.model_forward(p, cfg, x, s, need_grad=False)
    assert none is None
    np.testing.assert_array_equal(u, u2)
    assert model.config_from_dict(cfg.to_dict()) == cfg
    # the untrained network outputs exactly zero (zero-initialised output conv)
    u0, _ = model.model_forward(P.astype(model.init_model(cfg, 0), np.float64), cfg, x, s, need_grad=False)
    np.testing.assert_array_equal(u0, 0.0)


def test_interface_errors(rng):
    cfg = _tiny()
    p = model.init_model(cfg, 0)
    with pytest.raises(ValueError, match=r"built for inputs \(N, 2, 8, 8\)"):
        model.model_forward(p, cfg, np.zeros((1, 3, 8, 8), np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="one-time"):
        model.model_forward(p, cfg, np.zeros((1, 2, 8, 8), np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="cannot be split into 32 GroupNorm groups"):
        adm_unet.layout(dataclasses.replace(cfg, norm_groups=32))


def test_torchcfm_cifar10_size():
    """The torchcfm CIFAR-10 architecture: 35.7M parameters, 4 levels 32..4, attention at 16x16."""
    cfg = adm_unet.TORCHCFM_CIFAR10
    enc, mid, dec, _ = adm_unet.layout(cfg)
    assert [e["name"] for e in enc if e.get("attention")] == ["enc.4", "enc.5"]
    assert mid == dict(channels=256, heads=4) and len(dec) == 12
    assert sum(1 for e in dec if e["up"]) == 3
    assert P.count(model.init_model(cfg, 0)) == 35_746_307


def test_student_warm_start_equals_teacher_for_every_t(rng):
    """W_d = 0: u(x, s, t) = v(x, s) for every t (the student starts as the teacher)."""
    cfg = _tiny(dropout=0.0)
    teacher = _random(model.init_model(cfg, 0))
    student, scfg = ttfm.student_from_teacher(teacher, cfg)
    assert scfg.two_time and scfg.kind == "adm" and student["emb.delta.weight"].shape == (32, 32)
    x, s = rng.standard_normal((3,) + cfg.sample_shape), rng.uniform(0, 1, 3)
    v, _ = model.model_forward(teacher, cfg, x, s, need_grad=False)
    for t in (s, rng.uniform(0, 1, 3)):
        u, _ = model.model_forward(student, scfg, x, s, t, need_grad=False)
        np.testing.assert_array_equal(u, v)


# ----------------------------------------------------------------------------- torchcfm's module

def _torchcfm():
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch)")
    unet = pytest.importorskip("torchcfm.models.unet.unet",
                               reason="torchcfm is not installed (pip install --no-deps torchcfm pot)")
    return torch, unet


SMALL = dict(dim=(3, 16, 16), num_res_blocks=1, num_channels=32, channel_mult=[1, 2], num_heads=4,
             num_head_channels=16, attention_resolutions="8", dropout=0.1)


def small_torchcfm_config():
    """Our config of the torchcfm module built with SMALL (2 and 4 heads, attention at 8x8)."""
    return adm_unet.ADMConfig(in_channels=3, resolution=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                              attn_resolutions=(8,), num_heads=4, num_head_channels=16, dropout=0.1)


def _random_torch_net(torch, unet, seed=0):
    torch.manual_seed(seed)
    net = unet.UNetModelWrapper(**SMALL).eval()
    with torch.no_grad():                      # no zero-initialised layer: every path carries signal
        for p in net.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return net


def _params_from(net, cfg):
    from ttfm_np import import_teacher
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    return import_teacher.params_from_state_dict(sd, cfg, dtype=next(iter(sd.values())).dtype)


def lift_float32_casts(monkeypatch, torch, unet, net):
    """Let torchcfm's module compute in float64: its float32-only steps (GroupNorm32's x.float(), the
    softmax's weight.float(), the float32 time-feature frequencies) kept for float32 tensors and
    lifted for float64 ones, with the same formulas."""
    net.dtype = torch.float64                  # UNetModel casts its input to self.dtype (float32 unless fp16)
    original_float = torch.Tensor.float

    def features64(timesteps, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        args = timesteps[:, None].double() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    monkeypatch.setattr(unet, "timestep_embedding", features64)
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda self, *a, **k: self if self.dtype == torch.float64 else original_float(self, *a, **k))


@pytest.mark.torch
def test_matches_torchcfm_float64(rng, monkeypatch):
    """Same weights, float64: velocity and input gradient to 1e-10 (relative to the largest entry).

    torchcfm runs a few steps in float32 whatever the weights' dtype (GroupNorm32's x.float(), the
    softmax's weight.float(), the time features' float32 frequencies); in float64 those casts would
    cap the agreement at float32 rounding. They are lifted here for float64 tensors only, with
    the same formulas (the float32 test below runs torchcfm unpatched)."""
    torch, unet = _torchcfm()
    net = _random_torch_net(torch, unet).double()
    lift_float32_casts(monkeypatch, torch, unet, net)
    cfg = small_torchcfm_config()
    params = _params_from(net, cfg)
    x, t = rng.standard_normal((3, 3, 16, 16)), rng.uniform(0, 1, 3)
    xt = torch.tensor(x, requires_grad=True)
    v = net(torch.tensor(t), xt)
    R = rng.standard_normal(v.shape)
    (v * torch.tensor(R)).sum().backward()
    u, cache = model.model_forward(params, cfg, x, t)
    dx, _ = model.model_backward(R, cache)
    v, gx = v.detach().numpy(), xt.grad.numpy()
    assert np.abs(v).max() > 0.1 and np.abs(gx).max() > 0.1           # not a vacuous comparison
    assert np.abs(u - v).max() <= 1e-10 * np.abs(v).max()
    assert np.abs(dx - gx).max() <= 1e-10 * np.abs(gx).max()


@pytest.mark.torch
def test_matches_torchcfm_float32(rng):
    """torchcfm as shipped (float32 weights): our float32 velocity agrees to 1e-4 of its largest entry.

    Both sides round every product and sum to float32 (eps 6e-8) through ~25 layers with sums of up
    to K = 9 * 128 terms in differently ordered GEMMs (and torchcfm computes the time features with
    float32 frequencies), so the difference is rounding of order sqrt(K) * eps * depth ~ 5e-5 of the
    output's scale at worst; measured 1.3e-6. 1e-4 bounds the worst case."""
    torch, unet = _torchcfm()
    net = _random_torch_net(torch, unet)
    cfg = small_torchcfm_config()
    params = P.astype(_params_from(net, cfg), np.float32)
    x, t = rng.standard_normal((3, 3, 16, 16)).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
    with torch.no_grad():
        v = net(torch.tensor(t), torch.tensor(x)).numpy()
    u, _ = model.model_forward(params, cfg, x, t, need_grad=False)
    assert u.dtype == np.float32
    assert np.abs(u - v).max() <= 1e-4 * np.abs(v).max()


@pytest.mark.torch
def test_torch_names_cover_torchcfm_cifar10_exactly():
    """Every state-dict key of torchcfm's CIFAR-10 module has one of our parameters, shapes alike."""
    torch, unet = _torchcfm()
    net = unet.UNetModelWrapper(dim=(3, 32, 32), num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2],
                                num_heads=4, num_head_channels=64, attention_resolutions="16", dropout=0.1)
    sd = net.state_dict()
    names = adm_unet.torch_names(adm_unet.TORCHCFM_CIFAR10)
    assert sorted(names.values()) == sorted(sd)
    ours = model.init_model(adm_unet.TORCHCFM_CIFAR10, 0)
    for name, key in names.items():
        assert ours[name].size == sd[key].numel(), name


# ----------------------------------------------------------------------------- GPU path

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adm_unet_gpu_matches_numpy(rng, dtype):
    if not backend.gpu_available():
        pytest.skip(f"no usable GPU: {backend.gpu_problem()}")
    import cupy as cp
    tol = {np.float64: 1e-10, np.float32: 2e-4}[dtype]
    cfg = _tiny(two_time=True)
    host = P.astype(P.randomize(model.init_model(cfg, 0), seed=1), dtype)
    dev = P.to_device(host, cp)
    x = rng.standard_normal((2,) + cfg.sample_shape).astype(dtype)
    s, t = rng.uniform(0, 1, 2).astype(dtype), rng.uniform(0, 1, 2).astype(dtype)
    u, cache = model.model_forward(host, cfg, x, s, t, 7)
    ug, cacheg = model.model_forward(dev, cfg, cp.asarray(x), cp.asarray(s), cp.asarray(t), 7)
    assert isinstance(ug, cp.ndarray) and ug.dtype == dtype

    def rel(got, want):
        got = backend.to_numpy(got).astype(np.float64)
        return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))

    assert rel(ug, u) < tol
    du = rng.standard_normal(u.shape).astype(dtype)
    dx, grads = model.model_backward(du, cache)
    dxg, gradsg = model.model_backward(cp.asarray(du), cacheg)
    assert rel(dxg, dx) < tol
    assert gradsg.keys() == grads.keys() == host.keys()
    worst = max(grads, key=lambda k: rel(gradsg[k], grads[k]))
    assert rel(gradsg[worst], grads[worst]) < tol, worst


@pytest.mark.torch
def test_forward_flops_match_torch_flop_counter():
    """adm_unet.forward_flops counts what torch's FlopCounterMode counts on torchcfm's module (convs,
    linears, the attention's batched products): equal, for the small and the CIFAR-10 network."""
    torch, unet = _torchcfm()
    from torch.utils.flop_counter import FlopCounterMode
    cifar = dict(dim=(3, 32, 32), num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4,
                 num_head_channels=64, attention_resolutions="16", dropout=0.1)
    for kw, cfg in ((SMALL, small_torchcfm_config()), (cifar, adm_unet.TORCHCFM_CIFAR10)):
        with torch.device("meta"):            # shapes only: nothing is computed, so counting is instant
            net = unet.UNetModelWrapper(**kw).eval()
            t, x = torch.rand(2), torch.randn(2, *kw["dim"])
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(t, x)
        assert adm_unet.forward_flops(cfg, 2) == counter.get_total_flops()
    # the README's figure: 1.59 TFLOP per forward pass of the CIFAR-10 network at batch 128
    assert adm_unet.forward_flops(adm_unet.TORCHCFM_CIFAR10, 128) == 1_592_795_332_608
