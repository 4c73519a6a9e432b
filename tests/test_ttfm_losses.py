"""Two-timed student and distillation losses: warm start, sampling grids,
float64 gradient checks of every loss w.r.t. the student's parameters, and the
stop-gradient/EMA semantics of the targets."""
import numpy as np
import pytest

from gradcheck import check_gradients
from ttfm_np import flow, losses, model, params as P, ttfm, unet


def _teacher(kind="mlp", seed=0):
    if kind == "mlp":
        cfg = model.make_config("mlp-tiny", (2,))
    else:
        cfg = unet.preset_config("tiny", in_channels=1, resolution=8, attn_resolutions=(4,))
    p = P.randomize(P.astype(model.init_model(cfg, seed), np.float64), seed=seed + 10, std=0.3)
    return p, cfg


def _batch(rng, shape, n):
    x0 = rng.standard_normal((n,) + shape)
    x1 = rng.standard_normal((n,) + shape)
    a, b = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    s, t = np.minimum(a, b), np.maximum(a, b)
    s[0] = t[0] = 0.4                                       # one pair with t = s
    t[1] = 1.0                                              # one pair ending at t = 1
    x_s = flow.bcast(1 - s, x0) * x0 + flow.bcast(s, x1) * x1
    return x_s, s, t


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_warm_start_is_exact(rng, kind):
    tp, tcfg = _teacher(kind)
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    shape = (2,) if kind == "mlp" else (1, 8, 8)
    x = rng.standard_normal((3,) + shape)
    s, t = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    u, _ = model.model_forward(sp, scfg, x, s, t)
    v, _ = model.model_forward(tp, tcfg, x, s)
    np.testing.assert_array_equal(u, v)                     # u(x, s, t) = v(x, s) at step 0
    phi, _ = ttfm.phi_forward(sp, scfg, x, s, s)
    np.testing.assert_array_equal(phi, x)                   # phi(x, s, s) = x


def test_sampling_grid_and_reverse(rng):
    tp, tcfg = _teacher()
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    z = rng.standard_normal((4, 2))
    # one step from 0 to 1 at warm start is the teacher's one Euler step
    x1 = ttfm.sample(sp, scfg, z, n_steps=1)
    np.testing.assert_allclose(x1, z + model.model_forward(tp, tcfg, z, np.zeros(4))[0], rtol=1e-12)
    # a custom grid equals the uniform grid with the same times
    np.testing.assert_allclose(ttfm.sample(sp, scfg, z, grid=[0, 0.5, 1]), ttfm.sample(sp, scfg, z, n_steps=2))
    # decreasing grid maps toward noise: one step back from 1 to 0
    back = ttfm.sample(sp, scfg, x1, grid=[1.0, 0.0])
    np.testing.assert_allclose(back, x1 - model.model_forward(tp, tcfg, x1, np.ones(4))[0], rtol=1e-12)
    for bad in ([0.0], [0, 0.7, 0.5, 1], [0, 1.5]):
        with pytest.raises(ValueError):
            ttfm.make_grid(grid=bad)
    with pytest.raises(ValueError, match=">= 1"):
        ttfm.make_grid(n_steps=0)


OPTS = [
    dict(loss="itvm"),                                       # the defaults: relative Delta, Heun target
    dict(loss="itvm", delta_mode="absolute", target_solver="euler"),
    dict(loss="itvm", target_solver="heun", delta_mode="relative"),
    dict(loss="itvm", lambda_init=0.0),
    dict(loss="lfmd", lfmd_teacher_grad=True, lfmd_derivative="fd"),   # the exact gradient (the default
    dict(loss="lfmd", lfmd_teacher_grad=True, lfmd_derivative="jvp"),  # semi-gradient: below)
    dict(loss="ecd"),
]


@pytest.mark.parametrize("kw", OPTS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_loss_gradients_mlp(rng, kw):
    """Finite differences move only the student; the EMA copy is a separate, fixed dict."""
    tp, tcfg = _teacher()
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    sp = P.randomize(sp, seed=5, std=0.3)                    # a trained-looking student, W_d != 0
    ema = P.randomize(sp, seed=6, std=0.3)
    x_s, s, t = _batch(rng, (2,), 6)
    opts = losses.DistillLossConfig(delta=0.1, fd_step=1e-3, **kw).validate()
    loss, grads, _ = losses.distill_loss((sp, scfg), (ema, scfg), (tp, tcfg), x_s, s, t, opts)
    f = lambda: losses.distill_loss((sp, scfg), (ema, scfg), (tp, tcfg), x_s, s, t, opts)[0]
    assert abs(f() - loss) == 0
    assert set(grads) == set(sp)
    check_gradients(f, sp, grads, n_max=4, tol=1e-6)


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_itvm_one_batched_pass_equals_two_passes(rng, monkeypatch, solver):
    """The MLP on the CPU runs ITVM's two student passes as one pass of 2N rows (and the teacher's
    v(x_s, s), v(y, t') as one): the same loss, metrics and gradient as the two-pass form, in float64
    to rounding (the only difference is the order of the sums over rows in the weight gradients)."""
    tp, tcfg = _teacher()
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    sp = P.randomize(sp, seed=5, std=0.3)
    ema = P.randomize(sp, seed=6, std=0.3)
    x_s, s, t = _batch(rng, (2,), 7)
    opts = losses.DistillLossConfig(delta=0.1, target_solver=solver, lambda_init=0.7, lambda_term=1.3).validate()
    args = ((sp, scfg), (ema, scfg), (tp, tcfg), x_s, s, t, opts)
    assert losses._batch_itvm_passes(scfg, x_s)
    loss_b, grads_b, m_b = losses.distill_loss(*args)
    monkeypatch.setattr(losses, "_batch_itvm_passes", lambda cfg, x: False)
    loss_2, grads_2, m_2 = losses.distill_loss(*args)
    assert loss_b == pytest.approx(loss_2, rel=1e-13)
    assert m_b.keys() == m_2.keys() and all(m_b[k] == pytest.approx(m_2[k], rel=1e-13) for k in m_2)
    assert grads_b.keys() == grads_2.keys()
    for k in grads_2:
        np.testing.assert_allclose(grads_b[k], grads_2[k], rtol=1e-12, atol=1e-14 * np.abs(grads_2[k]).max())


def test_lfmd_semi_gradient_treats_teacher_output_as_constant(rng):
    """lfmd_teacher_grad=False: the gradient of ||dphi/dt - c||^2 with c = v(phi(theta0), t) frozen."""
    tp, tcfg = _teacher()
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    sp = P.randomize(sp, seed=5, std=0.3)
    x_s, s, t = _batch(rng, (2,), 6)
    opts = losses.DistillLossConfig(loss="lfmd", lfmd_teacher_grad=False, lfmd_derivative="fd").validate()
    _, grads, _ = losses.distill_loss((sp, scfg), None, (tp, tcfg), x_s, s, t, opts)
    h = losses.lfmd_fd_step(opts, scfg)
    assert h == 0.1 / scfg.time_scale                       # fd_step=None: the auto step
    c = model.model_forward(tp, tcfg, ttfm.phi_forward(sp, scfg, x_s, s, t)[0], t)[0]   # frozen target
    phi = lambda tt: ttfm.phi_forward(sp, scfg, x_s, s, tt)[0]
    inside = (t + h <= 1.0)[:, None]

    def f():
        central = (phi(t + h) - phi(t - h)) / (2 * h)
        one_sided = (3 * phi(t) - 4 * phi(t - h) + phi(t - 2 * h)) / (2 * h)      # t = 1: stay inside [0, 1]
        d = np.where(inside, central, one_sided)
        return float(((d - c) ** 2).mean())
    check_gradients(f, sp, grads, n_max=4, tol=1e-6)


@pytest.mark.slow
def test_itvm_gradients_unet(rng):
    tp, tcfg = _teacher("unet")
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    sp = P.randomize(sp, seed=5, std=0.3)
    x_s, s, t = _batch(rng, (1, 8, 8), 3)
    opts = losses.DistillLossConfig(delta=0.1).validate()
    loss, grads, _ = losses.distill_loss((sp, scfg), (sp.copy(), scfg), (tp, tcfg), x_s, s, t, opts)
    frozen = P.copy(sp)                                     # EMA = a frozen copy of the student
    f = lambda: losses.distill_loss((sp, scfg), (frozen, scfg), (tp, tcfg), x_s, s, t, opts)[0]
    check_gradients(f, sp, grads, n_max=2, tol=1e-6)


def test_terminal_target_is_stop_gradient_from_ema(rng):
    tp, tcfg = _teacher()
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    sp = P.randomize(sp, seed=5, std=0.3)
    x_s, s, t = _batch(rng, (2,), 8)
    opts = losses.DistillLossConfig(lambda_init=0.0, delta=0.1, delta_mode="absolute", target_solver="euler").validate()
    # EMA off (target from the live weights under sg) == EMA equal to a frozen copy
    off = losses.DistillLossConfig(lambda_init=0.0, delta=0.1, delta_mode="absolute", target_solver="euler",
                                   ema_target=False).validate()
    _, g_off, _ = losses.distill_loss((sp, scfg), (P.randomize(sp, seed=9), scfg), (tp, tcfg), x_s, s, t, off)
    _, g_copy, _ = losses.distill_loss((sp, scfg), (P.copy(sp), scfg), (tp, tcfg), x_s, s, t, opts)
    for k in sp:
        np.testing.assert_array_equal(g_off[k], g_copy[k])
    # the target is built from the EMA weights: change them and the loss changes, the student unchanged
    ema2 = P.randomize(sp, seed=11, std=0.3)
    l1 = losses.distill_loss((sp, scfg), (P.copy(sp), scfg), (tp, tcfg), x_s, s, t, opts)[0]
    l2 = losses.distill_loss((sp, scfg), (ema2, scfg), (tp, tcfg), x_s, s, t, opts)[0]
    assert l1 != l2
    # and it equals (y_hat - x_s)/(t - s) from an explicit computation
    u_tgt = losses.itvm_terminal_target((ema2, scfg), (tp, tcfg), x_s, s, t, opts)
    tp_ = np.maximum(s, t - 0.1)
    y = x_s + (tp_ - s)[:, None] * model.model_forward(ema2, scfg, x_s, s, tp_)[0]
    y_hat = y + (t - tp_)[:, None] * model.model_forward(tp, tcfg, y, tp_)[0]
    valid = t > s
    np.testing.assert_allclose(u_tgt[valid], (y_hat - x_s)[valid] / (t - s)[valid, None], rtol=1e-12)


def test_itvm_at_warm_start_is_zero_with_exact_teacher_targets(rng):
    """At warm start with Delta >= t - s the target is v(x_s, s) and u = v: both terms vanish."""
    tp, tcfg = _teacher()
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    x_s, s, t = _batch(rng, (2,), 6)
    opts = losses.DistillLossConfig(delta=1.0, delta_mode="absolute", target_solver="euler").validate()
    loss, grads, m = losses.distill_loss((sp, scfg), (sp, scfg), (tp, tcfg), x_s, s, t, opts)
    assert m["loss_init"] == 0.0 and m["loss_term"] < 1e-25


def test_bad_loss_options():
    for kw, msg in [(dict(loss="foo"), "unknown loss"), (dict(delta=0.0), "delta"),
                    (dict(target_solver="rk9"), "target_solver"),
                    (dict(lambda_init=0.0, lambda_term=0.0), "not both 0")]:
        with pytest.raises(ValueError, match=msg):
            losses.DistillLossConfig(**kw).validate()


# ----------------------------------------------------------------------------- LFMD's finite-difference step

def _warm_perturbed(kind, seed=0, perturb=0.05):
    """A student warm-started from a random teacher of realistic scale, then every weight
    (W_d included) moved a little, so phi depends on t non-linearly (at the exact warm
    start phi is linear in t and any step h would be exact)."""
    tp, tcfg = _teacher(kind, seed)
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    rnd = P.randomize(sp, seed=seed + 20, std=1.0)
    sp = {k: v + perturb * rnd[k] * (np.abs(v).mean() + 0.05) for k, v in sp.items()}
    return (sp, scfg), (tp, tcfg)


def _lfmd_f(student, teacher, x_s, s, t, dtype, fd_step=None):
    st = (P.astype(student[0], dtype), student[1])
    te = (P.astype(teacher[0], dtype), teacher[1])
    opts = losses.DistillLossConfig(loss="lfmd", fd_step=fd_step, lfmd_derivative="fd").validate()
    loss, grads, m = losses.lfmd_loss(st, st, te, x_s.astype(dtype), s.astype(dtype), t.astype(dtype), opts)
    return loss, np.concatenate([np.asarray(grads[k], np.float64).ravel() for k in sorted(grads)]), m


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_lfmd_default_step_float32_matches_tiny_step_float64(rng, kind):
    """The default h (0.1 / time_scale) in float32: loss within 1 %, gradient within 3 %, of a
    float64 reference with h = 1e-6 (whose own error, measured against h = 2e-6, is ~1e-6)."""
    student, teacher = _warm_perturbed(kind)
    x_s, s, t = _batch(rng, (2,) if kind == "mlp" else (1, 8, 8), 8)
    ref_l, ref_g, _ = _lfmd_f(student, teacher, x_s, s, t, np.float64, fd_step=1e-6)
    l, g, m = _lfmd_f(student, teacher, x_s, s, t, np.float32)
    assert m["fd_step"] == pytest.approx(1e-4)
    assert abs(l - ref_l) <= 0.01 * abs(ref_l)
    assert np.linalg.norm(g - ref_g) <= 0.03 * np.linalg.norm(ref_g)
    # the old step h = 1e-3 (time_scale * h = 1) is measurably worse: truncation, not rounding
    old_l, _, _ = _lfmd_f(student, teacher, x_s, s, t, np.float64, fd_step=1e-3)
    assert abs(old_l - ref_l) > 3 * abs(l - ref_l)


def test_lfmd_stencil_is_second_order_also_at_t1(rng):
    """float64 error falls ~h^2 (x ~100 for h / 10), including pairs at t = 1 (one-sided stencil)."""
    student, teacher = _warm_perturbed("mlp")
    x_s, s, _ = _batch(rng, (2,), 8)
    t = np.ones(8)                                          # every pair on the one-sided stencil
    ref = _lfmd_f(student, teacher, x_s, s, t, np.float64, fd_step=1e-6)[0]
    e1 = abs(_lfmd_f(student, teacher, x_s, s, t, np.float64, fd_step=3e-4)[0] - ref)
    e2 = abs(_lfmd_f(student, teacher, x_s, s, t, np.float64, fd_step=3e-5)[0] - ref)
    assert e1 / e2 > 30


def test_lfmd_step_option():
    mlp_cfg = model.make_config("mlp-tiny", (2,), two_time=True)
    auto = losses.DistillLossConfig(loss="lfmd").validate()
    assert losses.lfmd_fd_step(auto, mlp_cfg) == pytest.approx(1e-4)
    import dataclasses
    assert losses.lfmd_fd_step(auto, dataclasses.replace(mlp_cfg, time_scale=100.0)) == pytest.approx(1e-3)
    assert losses.lfmd_fd_step(losses.DistillLossConfig(loss="lfmd", fd_step=3e-4), mlp_cfg) == 3e-4   # explicit wins
    for bad in (0.0, -1e-4, 0.5):
        with pytest.raises(ValueError, match="fd_step"):
            losses.DistillLossConfig(loss="lfmd", fd_step=bad).validate()


def test_lfmd_with_dropout_sees_one_mask_per_seed(rng):
    """LFMD's finite difference compares student evaluations at t +- h: with one dropout_seed
    they share their masks, so the loss stays of the dropout-free size (different masks would
    add (mask noise / h)^2, orders of magnitude larger), and a call is reproducible."""
    tp, tcfg = _teacher("unet")
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    scfg = type(scfg)(**dict(scfg.to_dict(), dropout=0.3, channel_mult=tuple(scfg.channel_mult),
                             attn_resolutions=tuple(scfg.attn_resolutions)))
    sp = P.randomize(sp, seed=5, std=0.3)
    x_s, s, t = _batch(rng, (1, 8, 8), 3)
    opts = losses.DistillLossConfig(loss="lfmd", lfmd_derivative="fd").validate()
    run = lambda seed: losses.distill_loss((sp, scfg), None, (tp, tcfg), x_s, s, t, opts, seed)[0]
    no_dropout, with_dropout = run(None), run(7)
    assert with_dropout == run(7) and with_dropout != no_dropout
    assert with_dropout < 10 * no_dropout, (with_dropout, no_dropout)



def test_lfmd_with_dropout_equals_lfmd_with_one_explicit_mask(rng, monkeypatch):
    """LFMD under dropout_seed = 7 equals LFMD where every evaluation is forced to use one
    explicit mask per dropout site (the mask seed 7 gives): so all evaluations inside the
    finite difference share it. Fresh masks per evaluation instead make the loss explode
    ((mask noise / 2h)^2 with h = 1e-4), which is what this guards against."""
    from ttfm_np import dropout as DO, resblock
    (sp, scfg), (tp, tcfg) = _warm_perturbed("unet")
    scfg = type(scfg)(**dict(scfg.to_dict(), dropout=0.2, channel_mult=tuple(scfg.channel_mult),
                             attn_resolutions=tuple(scfg.attn_resolutions)))
    x_s, s, t = _batch(rng, (1, 8, 8), 4)
    opts = losses.DistillLossConfig(loss="lfmd", lfmd_derivative="fd").validate()
    lib_loss, lib_grads, _ = losses.distill_loss((sp, scfg), None, (tp, tcfg), x_s, s, t, opts, 7)
    no_dropout = losses.distill_loss((sp, scfg), None, (tp, tcfg), x_s, s, t, opts, None)[0]

    def explicit(x, p, seed, site):
        """The mask of seed 7 at this site, whatever seed the caller passes; y = x * keep / (1 - p)."""
        if seed is None or p == 0:
            return x, None
        keep = DO.keep_mask_numpy(x.size, p, DO.stream_key(7, site)).reshape(x.shape)
        m = keep / (1 - p)
        return x * m, ("explicit", m)

    def explicit_backward(dy, cache):
        return (dy, {}) if cache is None else (dy * cache[1], {})
    monkeypatch.setattr(resblock, "dropout_forward", explicit)
    monkeypatch.setattr(resblock, "dropout_backward", explicit_backward)
    fixed_loss, fixed_grads, _ = losses.distill_loss((sp, scfg), None, (tp, tcfg), x_s, s, t, opts, 12345)
    assert lib_loss == pytest.approx(fixed_loss, rel=1e-10)
    for k in fixed_grads:
        np.testing.assert_allclose(lib_grads[k], fixed_grads[k], rtol=1e-8, atol=1e-12 * np.abs(fixed_grads[k]).max())
    assert fixed_loss != no_dropout and fixed_loss < 10 * no_dropout            # O(1): the dropout-free size

    # fresh masks per evaluation (what a Generator-based dropout did): orders of magnitude larger
    calls = iter(range(10**6))

    def fresh(x, p, seed, site):
        if seed is None or p == 0:
            return x, None
        m = DO.keep_mask_numpy(x.size, p, DO.stream_key(next(calls), site)).reshape(x.shape) / (1 - p)
        return x * m, ("fresh", m)
    monkeypatch.setattr(resblock, "dropout_forward", fresh)
    mixed = losses.distill_loss((sp, scfg), None, (tp, tcfg), x_s, s, t, opts, 7)[0]
    assert mixed > 100 * fixed_loss


def test_per_loss_defaults_are_filled_by_validate():
    """Shared options left at None take their loss's value (LOSS_DEFAULTS); given values win;
    validate() returns the filled-in config and distill_loss fills an unvalidated one."""
    for loss, want in losses.LOSS_DEFAULTS.items():
        raw = losses.DistillLossConfig(loss=loss)
        assert raw.frac_t1 is None and raw.delta is None            # the CLI reads these raw defaults
        got = raw.validate()
        assert {k: getattr(got, k) for k in want} == want
        assert got.validate() is got
    assert losses.DistillLossConfig(loss="lfmd", frac_t1=0.3).validate().frac_t1 == 0.3
    assert losses.DistillLossConfig(loss="ecd", delta=0.2).validate().delta == 0.2
    with pytest.raises(ValueError, match="frac_t1"):
        losses.DistillLossConfig(loss="itvm", frac_t1=1.5).validate()
    with pytest.raises(ValueError, match="student_ema_decay"):
        losses.DistillLossConfig(loss="ecd", student_ema_decay=1.0).validate()
    assert losses.DistillLossConfig(loss="lfmd").validate().student_ema_decay is None    # the recipe's EMA
