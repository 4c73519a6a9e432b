"""Forward-mode tangents (JVP) of the ADM U-Net (adm_*.py) and their backward (reverse over
forward), in float64 on fresh random inputs and tangents, dropout on wherever the network has it:

* every layer's y_dot (residual block with and without its 1x1 skip, head-major attention with
  1 and 2 heads, conv down / upsampling) and the whole network's u_dot (one-time and two-time,
  tangents in x, s and t) against central differences, the primal against the forward;
* the adjoint identity <backward(dy), x_dot> == <dy, jvp(x_dot)> (layers and network);
* every `*_jvp_backward` (gradients of L = <R, y> + <R_dot, y_dot> w.r.t. inputs, tangents and
  parameters) against finite differences of L, the whole tiny network included;
* the GPU path (CuPy, or the stand-in) against NumPy;
* a torchcfm-style teacher imported from a torch.save file distills with the losses that need
  the tangent pass (--loss lfmd with its default jvp derivative, --loss meanflow).
"""
import json

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from gradcheck import check_gradients, rel_error
from test_import_teacher import _state_dict_of
from test_torch_reader import torchless_zip
from ttfm_np import adm_unet, backend, ckpt, import_teacher, model
from ttfm_np import params as P
from ttfm_np.adm_attention import (adm_attention_backward, adm_attention_forward, adm_attention_jvp,
                                   adm_attention_jvp_backward, init_adm_attention)
from ttfm_np.adm_resample import (downsample_backward, downsample_forward, downsample_jvp, downsample_jvp_backward,
                                  upsample_backward, upsample_forward, upsample_jvp, upsample_jvp_backward)
from ttfm_np.adm_resblock import (adm_resblock_backward, adm_resblock_forward, adm_resblock_jvp,
                                  adm_resblock_jvp_backward, init_adm_resblock)

EPS = 1e-5          # central difference step: truncation ~ eps^2 |f'''| ~ 1e-10, round-off ~ 1e-16 / eps ~ 1e-11
TOL = 1e-6          # the project's gradient-check tolerance


def _random(p, seed=1):
    return P.randomize(P.astype(p, np.float64), seed=seed, std=0.3)


def _central(f, eps=EPS):
    """(f(eps) - f(-eps)) / 2 eps for f(a) = the function at (inputs + a * tangents)."""
    return (f(eps) - f(-eps)) / (2 * eps)


# ----------------------------------------------------------------------------- layers

def _layer(name, rng):
    """(params, inputs, tangents, forward(p, *inputs) -> (y, cache), backward(dy, cache) -> (d_inputs, grads),
    jvp(p, inputs, tangents) -> (y, y_dot, cache), jvp_backward) of one ADM layer; inputs and tangents are
    tuples (the residual block reads (x, emb_act)), the backward's input gradients a tuple in the same order."""
    n = rng.standard_normal
    if name.startswith("resblock"):
        cin, cout, seed = (4, 8, 5) if name == "resblock_skip" else (8, 8, 9)        # dropout on in both
        p = _random(init_adm_resblock(np.random.default_rng(0), "b", cin, cout, 6))
        kw = dict(groups=4, dropout=0.3, dropout_seed=seed)
        inputs = (n((2, cin, 5, 5)), n((2, 6)))
        fwd = lambda p, x, ea: adm_resblock_forward(p, "b", x, ea, **kw)
        bwd = lambda dy, c: adm_resblock_backward(dy, c)                              # ((dx, d_ea), grads)
        jvp = lambda p, xs, ds: adm_resblock_jvp(p, "b", *xs, *ds, **kw)
        jvp_bwd = lambda R, Rd, c: adm_resblock_jvp_backward(R, Rd, c)               # ((dx, de), (dxd, ded), g)
        return p, inputs, fwd, bwd, jvp, jvp_bwd
    if name.startswith("attention"):
        heads = int(name[-1])
        p = _random(init_adm_attention(np.random.default_rng(0), "a", 8))
        kw = dict(heads=heads, groups=4)
        fwd = lambda p, x: adm_attention_forward(p, "a", x, **kw)
        bwd = lambda dy, c: (lambda dx, g: ((dx,), g))(*adm_attention_backward(dy, c))
        jvp = lambda p, xs, ds: adm_attention_jvp(p, "a", xs[0], ds[0], **kw)
        jvp_bwd = lambda R, Rd, c: (lambda dx, dxd, g: ((dx,), (dxd,), g))(*adm_attention_jvp_backward(R, Rd, c))
        return p, (n((2, 8, 3, 3)),), fwd, bwd, jvp, jvp_bwd
    forward, backward, jvp_f, jvp_b, H = {
        "downsample": (downsample_forward, downsample_backward, downsample_jvp, downsample_jvp_backward, 6),
        "upsample": (upsample_forward, upsample_backward, upsample_jvp, upsample_jvp_backward, 3)}[name]
    p = {"weight": n((6, 4, 3, 3)), "bias": n(6)}
    fwd = lambda p, x: forward(x, p["weight"], p["bias"])
    bwd = lambda dy, c: (lambda dx, g: ((dx,), g))(*backward(dy, c))
    jvp = lambda p, xs, ds: jvp_f(xs[0], p["weight"], p["bias"], ds[0])
    jvp_bwd = lambda R, Rd, c: (lambda dx, dxd, g: ((dx,), (dxd,), g))(*jvp_b(R, Rd, c))
    return p, (n((2, 4, H, H)),), fwd, bwd, jvp, jvp_bwd


LAYERS = ["resblock_skip", "resblock_identity", "attention_1", "attention_2", "downsample", "upsample"]


@pytest.mark.parametrize("name", LAYERS)
def test_adm_layer_jvp_matches_central_differences(name, rng):
    p, xs, fwd, _, jvp, _ = _layer(name, rng)
    ds = tuple(rng.standard_normal(x.shape) for x in xs)
    y, yd, _ = jvp(p, xs, ds)
    np.testing.assert_array_equal(y, fwd(p, *xs)[0])                    # the primal is the forward's output
    ref = _central(lambda a: fwd(p, *(x + a * d for x, d in zip(xs, ds)))[0])
    assert np.abs(ref).max() > 0.1                                      # not a vacuous comparison
    assert rel_error(yd, ref) < TOL, (name, rel_error(yd, ref))


@pytest.mark.parametrize("name", LAYERS)
def test_adm_layer_jvp_is_the_transpose_of_backward(name, rng):
    """<backward(dy), x_dot> == <dy, jvp(x_dot)>: one Jacobian, applied from either side."""
    p, xs, fwd, bwd, jvp, _ = _layer(name, rng)
    ds = tuple(rng.standard_normal(x.shape) for x in xs)
    y, cache = fwd(p, *xs)
    dy = rng.standard_normal(y.shape)
    d_inputs, _ = bwd(dy, cache)
    lhs = float(sum(np.sum(g * d) for g, d in zip(d_inputs, ds)))
    rhs = float(np.sum(dy * jvp(p, xs, ds)[1]))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs)), (name, lhs, rhs)


@pytest.mark.parametrize("name", LAYERS)
def test_adm_layer_jvp_backward_matches_finite_differences(name, rng):
    """Reverse over forward: d/d(inputs, tangents, params) of L = <R, y> + <R_dot, y_dot>."""
    p, xs, _, _, jvp, jvp_bwd = _layer(name, rng)
    ds = tuple(rng.standard_normal(x.shape) for x in xs)
    y, yd, cache = jvp(p, xs, ds)
    R, Rd = rng.standard_normal(y.shape), rng.standard_normal(yd.shape)
    d_inputs, d_tangents, grads = jvp_bwd(R, Rd, cache)
    names = [f"__x{i}__" for i in range(len(xs))] + [f"__d{i}__" for i in range(len(ds))]
    assert set(grads) == set(p), set(p) ^ set(grads)           # full names (blocks) or local ones (resampling)

    def loss():
        y, yd, _ = jvp(p, xs, ds)
        return float(np.sum(R * y) + np.sum(Rd * yd))
    check_gradients(loss, dict(p, **dict(zip(names, xs + ds))),
                    dict(grads, **dict(zip(names, tuple(d_inputs) + tuple(d_tangents)))), n_max=4)


# ----------------------------------------------------------------------------- whole network

def _tiny(two_time, dropout=0.2):
    """Every path at 8x8 / 4x4 (as tests/test_adm_unet.py): stem conv, blocks with and without a 1x1 skip,
    attention at 4x4 with 2 and 4 heads in encoder, middle and decoder, stride-2 down, nearest+conv up,
    the decoder's concatenations, dropout."""
    return adm_unet.ADMConfig(in_channels=2, resolution=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                              attn_resolutions=(4,), num_heads=2, num_head_channels=4, norm_groups=4,
                              dropout=dropout, two_time=two_time)


def _network_case(two_time, rng):
    cfg = _tiny(two_time)
    p = _random(model.init_model(cfg, 0))
    x = rng.standard_normal((2,) + cfg.sample_shape)
    s = rng.uniform(0, 0.6, 2)
    t = s + rng.uniform(0, 0.4, 2) if two_time else None
    tangents = (rng.standard_normal(x.shape), rng.standard_normal(2), rng.standard_normal(2) if two_time else None)
    return cfg, p, x, s, t, tangents


SEED = 3            # dropout on: one mask for every evaluation given this seed


@pytest.mark.parametrize("two_time", [False, True])
def test_adm_unet_jvp_matches_central_differences(two_time, rng):
    """u_dot along (x_dot, s_dot[, t_dot]); the time embedding's tangent in s and t included."""
    cfg, p, x, s, t, (xd, sd, td) = _network_case(two_time, rng)
    u, ud, _ = model.model_jvp(p, cfg, x, s, t, xd, sd, td, SEED, need_grad=False)
    np.testing.assert_array_equal(u, model.model_forward(p, cfg, x, s, t, SEED, need_grad=False)[0])
    f = lambda a: model.model_forward(p, cfg, x + a * xd, s + a * sd, None if t is None else t + a * td, SEED,
                                      need_grad=False)[0]
    ref = _central(f)
    assert np.abs(ref).max() > 0.1 and rel_error(ud, ref) < TOL, rel_error(ud, ref)
    # the time directions alone (x_dot = 0): the embedding's tangent reaches the output
    ud_t = model.model_jvp(p, cfg, x, s, t, np.zeros_like(x), sd, td, SEED, need_grad=False)[1]
    g = lambda a: model.model_forward(p, cfg, x, s + a * sd, None if t is None else t + a * td, SEED,
                                      need_grad=False)[0]
    ref_t = _central(g)
    assert np.abs(ref_t).max() > 1e-3 and rel_error(ud_t, ref_t, floor=1e-3) < TOL, rel_error(ud_t, ref_t, 1e-3)
    # the dropout masks are on and the same in the tangent: another seed changes both u and u_dot
    u2, ud2, _ = model.model_jvp(p, cfg, x, s, t, xd, sd, td, SEED + 1, need_grad=False)
    assert not np.allclose(u2, u) and not np.allclose(ud2, ud)


@pytest.mark.parametrize("two_time", [False, True])
def test_adm_unet_jvp_is_the_transpose_of_backward(two_time, rng):
    """<dx of model_backward(dy), x_dot> == <dy, u_dot(x_dot, 0, 0)> through the whole network."""
    cfg, p, x, s, t, (xd, _, _) = _network_case(two_time, rng)
    u, cache = model.model_forward(p, cfg, x, s, t, SEED)
    dy = rng.standard_normal(u.shape)
    dx, _ = model.model_backward(dy, cache)
    ud = model.model_jvp(p, cfg, x, s, t, xd, 0.0, 0.0 if two_time else None, SEED, need_grad=False)[1]
    lhs, rhs = float(np.sum(dx * xd)), float(np.sum(dy * ud))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs)), (lhs, rhs)


def test_adm_unet_jvp_backward_matches_finite_differences(rng):
    """Reverse over forward through the whole tiny ADM net (the two-time student, whose tangent the
    LFMD-jvp and MeanFlow losses differentiate; the one-time network runs the same code without W_d):
    the gradient of L = <R, u> + <R_dot, u_dot> w.r.t. every parameter tensor, the input and its
    tangent, against central differences of L."""
    cfg, p, x, s, t, (xd, sd, td) = _network_case(True, rng)
    u, ud, cache = model.model_jvp(p, cfg, x, s, t, xd, sd, td, SEED)
    R, Rd = rng.standard_normal(u.shape), rng.standard_normal(u.shape)
    dx, dxd, grads = model.model_jvp_backward(R, Rd, cache)
    assert set(grads) == set(p), set(p) ^ set(grads)

    def loss():
        u, ud, _ = model.model_jvp(p, cfg, x, s, t, xd, sd, td, SEED, need_grad=False)
        return float(np.sum(R * u) + np.sum(Rd * ud))
    # one entry of each of the ~90 tensors (two loss evaluations per entry) keeps this at a few seconds;
    # the layer tests above sample more entries of every kind of tensor
    check_gradients(loss, dict(p, __x__=x, __xd__=xd), dict(grads, __x__=dx, __xd__=dxd), n_max=1)


def test_adm_unet_jvp_errors(rng):
    cfg, p, x, s, t, (xd, sd, td) = _network_case(True, rng)
    with pytest.raises(ValueError, match="tangents of the same shape"):
        model.model_jvp(p, cfg, x, s, t, xd[:1], sd, td)
    with pytest.raises(ValueError, match="needs both s and t"):
        model.model_jvp(p, cfg, x, s, None, xd, sd)
    with pytest.raises(ValueError, match="kept no cache"):
        model.model_jvp_backward(x, x, model.model_jvp(p, cfg, x, s, t, xd, sd, td, need_grad=False)[2])


# ----------------------------------------------------------------------------- GPU path

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adm_unet_jvp_and_backward_gpu_match_numpy(rng, dtype):
    """The tangent pass and its backward on CuPy (or the stand-in running the real kernels) against NumPy:
    two-time, dropout on; float64 to rounding, float32 within test_gpu_jvp's 3e-4 (other reduction orders)."""
    if not backend.gpu_available():
        pytest.skip(f"no usable GPU: {backend.gpu_problem()}")
    import cupy as cp
    tol = {np.float64: 1e-10, np.float32: 3e-4}[dtype]
    cfg = _tiny(two_time=True)
    host = P.astype(P.randomize(model.init_model(cfg, 0), seed=1), dtype)
    dev = P.to_device(host, cp)
    x = rng.standard_normal((2,) + cfg.sample_shape).astype(dtype)
    s = rng.uniform(0, 0.6, 2).astype(dtype)
    t = (s + rng.uniform(0, 0.4, 2)).astype(dtype)
    xd, sd, td = (rng.standard_normal(a.shape).astype(dtype) for a in (x, s, t))

    def rel(got, want):
        got = backend.to_numpy(got).astype(np.float64)
        return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))

    u, ud, cache = model.model_jvp(host, cfg, x, s, t, xd, sd, td, 7)
    ug, udg, cacheg = model.model_jvp(dev, cfg, *(cp.asarray(a) for a in (x, s, t, xd, sd, td)), 7)
    assert isinstance(udg, cp.ndarray) and udg.dtype == dtype
    assert rel(ug, u) < tol and rel(udg, ud) < tol
    R, Rd = rng.standard_normal(u.shape).astype(dtype), rng.standard_normal(u.shape).astype(dtype)
    dx, dxd, grads = model.model_jvp_backward(R, Rd, cache)
    dxg, dxdg, gradsg = model.model_jvp_backward(cp.asarray(R), cp.asarray(Rd), cacheg)
    assert rel(dxg, dx) < tol and rel(dxdg, dxd) < tol
    assert gradsg.keys() == grads.keys() == host.keys()
    worst = max(grads, key=lambda k: rel(gradsg[k], grads[k]))
    assert rel(gradsg[worst], grads[worst]) < tol, worst


# ----------------------------------------------------------------------------- distilling an imported teacher

# torchcfm UNetModelWrapper arguments of a small network: one level at 4x4 with attention (stem, ResBlock,
# attention with 2 heads, middle, decoder blocks on the skips), so two 1-step distillations stay at a few
# seconds; tests/test_import_teacher.py has a two-level one. 64 channels, not 32: with GroupNorm(32) on 32
# channels every group is one channel, and the norm after the ResBlock's time shift (a per-channel constant)
# removes it, so the network would not depend on t at all.
ONE_LEVEL = dict(dim=[3, 4, 4], num_res_blocks=1, num_channels=64, channel_mult=[1], num_heads=2,
                 num_head_channels=32, attention_resolutions="4", dropout=0.1)


@pytest.mark.parametrize("loss", ["lfmd", "meanflow"])
def test_imported_torchcfm_teacher_distills_with_the_tangent_losses(tmp_path, rng, loss):
    """A torchcfm-layout state dict (written without torch, as torch.save lays it out) imported with
    import-teacher, then one distillation step with a loss that needs model_jvp on the ADM network:
    LFMD with its default --lfmd-derivative jvp, MeanFlow. (Before the ADM tangent pass existed,
    distill refused both for this network.) tests/test_import_teacher.py has the torch round trip."""
    from PIL import Image
    cfg = import_teacher.config_from_wrapper_kwargs(ONE_LEVEL)
    weights = P.astype(P.randomize(model.init_model(cfg, 0), seed=1, std=0.15), np.float32)
    torchless_zip(tmp_path / "w.pt", _state_dict_of(weights, cfg))
    (tmp_path / "arch.json").write_text(json.dumps(ONE_LEVEL))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)).save(imgs / f"{i}.png")
    invoke = lambda *a: CliRunner().invoke(cli.cli, [str(v) for v in a])
    res = invoke("import-teacher", tmp_path / "w.pt", "--arch", tmp_path / "arch.json", "--data", f"imagefolder:{imgs}",
                 "--out", tmp_path / "teacher")
    assert res.exit_code == 0, res.output
    res = invoke("distill", "--data", f"imagefolder:{imgs}", "--teacher", tmp_path / "teacher", "--loss", loss,
                 "--steps", 1, "--batch-size", 2, "--eval-steps", "1", "--eval-n", 2, "--eval-n-ref", 2,
                 "--out", tmp_path / "student")
    assert res.exit_code == 0, res.output
    student = ckpt.load_checkpoint(str(tmp_path / "student"))
    assert student["step"] == 1 and student["config"]["model"]["kind"] == "adm"
    assert student["config"]["loss"]["loss"] == loss
    if loss == "lfmd":
        assert student["config"]["loss"]["lfmd_derivative"] == "jvp"          # the default: the tangent pass
    row = json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["loss"]) and row["grad_norm"] > 0
    changed = [k for k in weights if not np.array_equal(student["params"][k], weights[k])]
    assert len(changed) > len(weights) // 2                                  # the step moved the network


# ----------------------------------------------------------------------------- torchcfm's module

@pytest.mark.torch
def test_adm_unet_jvp_matches_torch_func_jvp_of_torchcfm(rng, monkeypatch):
    """The teacher network's tangent along (x_dot, t_dot) against torch.func.jvp of torchcfm's own module
    (ONE_LEVEL: 2 heads, so the head-major rows matter) with the same random weights, float64: to 1e-10
    of the largest entry (rounding only). torchcfm's float32 casts are lifted for float64 tensors as in
    test_adm_unet.test_matches_torchcfm_float64."""
    from test_adm_unet import _torchcfm, lift_float32_casts
    torch, unet = _torchcfm()
    torch.manual_seed(0)
    net = unet.UNetModelWrapper(**ONE_LEVEL).double().eval()         # eval: no dropout on either side
    with torch.no_grad():                                            # no zero-initialised layer
        for p in net.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    lift_float32_casts(monkeypatch, torch, unet, net)
    cfg = import_teacher.config_from_wrapper_kwargs(ONE_LEVEL)
    params = import_teacher.params_from_state_dict({k: v.numpy() for k, v in net.state_dict().items()}, cfg,
                                                   dtype=np.float64)
    x, t = rng.standard_normal((2,) + cfg.sample_shape), rng.uniform(0, 1, 2)
    xd, td = rng.standard_normal(x.shape), rng.standard_normal(2)
    T = torch.tensor
    for xd_ in (xd, np.zeros_like(xd)):                              # zero x_dot: the time direction alone
        with torch.no_grad():
            v, vd = torch.func.jvp(lambda t_, x_: net(t_, x_), (T(t), T(x)), (T(td), T(xd_)))
        u, ud, _ = model.model_jvp(params, cfg, x, t, None, xd_, td, need_grad=False)
        v, vd = v.numpy(), vd.numpy()
        assert np.abs(vd).max() > 1e-2                                # not a vacuous comparison
        assert np.abs(u - v).max() <= 1e-10 * np.abs(v).max()
        assert np.abs(ud - vd).max() <= 1e-10 * np.abs(vd).max()
