"""The losses that need an exact time derivative: LFMD with --lfmd-derivative jvp and MeanFlow.

* LFMD-jvp (loss and gradient) against a sixth-order central difference in float64, at
  interior pairs and at t = 1, with dropout on in the U-Net;
* MeanFlow's loss is zero for an exact flow map (a Gaussian teacher whose flow map is known in
  closed form) and not for a wrong one; its gradient (target under stop-gradient) against finite
  differences;
* the option's validation and how checkpoints written before the option resume.
"""
import numpy as np
import pytest

from gradcheck import check_gradients, rel_error
from test_ttfm_losses import _batch, _teacher, _warm_perturbed
from ttfm_np import ckpt, losses, model, params as P, sampling, train, ttfm

# sixth-order central difference: f'(t) = sum_k C_k f(t + k h) / h + O(h^6)
STENCIL6 = {1: 3 / 4, -1: -3 / 4, 2: -3 / 20, -2: 3 / 20, 3: 1 / 60, -3: -1 / 60}


def _lfmd_reference(student, teacher, x_s, s, t, dropout_seed, h):
    """Loss and semi-gradient of LFMD with d/dt phi from the sixth-order stencil (float64).
    time_scale * h = 0.03: truncation ~ (0.03)^6 / 140 ~ 5e-12, round-off ~ 1e-16 / h ~ 4e-12 (relative)."""
    (sp, scfg), (tp, tcfg) = student, teacher
    runs = {k: ttfm.phi_forward(sp, scfg, x_s, s, t + k * h, dropout_seed) for k in STENCIL6}
    dphi = sum(c * runs[k][0] for k, c in STENCIL6.items()) / h
    phi_t = ttfm.phi_forward(sp, scfg, x_s, s, t, dropout_seed, need_grad=False)[0]
    v = model.model_forward(tp, tcfg, phi_t, t, need_grad=False)[0]
    loss, dres = losses.mse_and_grad(dphi, v)
    grads = {}
    for k, c in STENCIL6.items():
        losses._add_grads(grads, ttfm.phi_backward(dres, runs[k][1])[1], c / h)
    return loss, grads


@pytest.mark.parametrize("kind,where", [("mlp", "interior"), ("mlp", "t=1"), ("unet", "interior"), ("unet", "t=1")])
def test_lfmd_jvp_equals_sixth_order_difference(rng, kind, where):
    student, teacher = _warm_perturbed(kind)
    if kind == "unet":                                   # dropout on: the jvp and the stencil share one mask
        sp, scfg = student
        student = (sp, type(scfg)(**dict(scfg.to_dict(), dropout=0.2, channel_mult=tuple(scfg.channel_mult),
                                             attn_resolutions=tuple(scfg.attn_resolutions))))
    x_s, s, t = _batch(rng, (2,) if kind == "mlp" else (1, 8, 8), 6)
    if where == "t=1":
        t = np.ones_like(t)                              # where the old one-sided stencil applied
    opts = losses.DistillLossConfig(loss="lfmd", lfmd_derivative="jvp").validate()
    loss, grads, m = losses.distill_loss(student, None, teacher, x_s, s, t, opts, 7)
    assert "fd_step" not in m
    ref_loss, ref_grads = _lfmd_reference(student, teacher, x_s, s, t, 7, h=0.03 / student[1].time_scale)
    assert abs(loss - ref_loss) <= 1e-9 * ref_loss, (loss, ref_loss)
    assert set(grads) == set(ref_grads)
    flat = lambda g: np.concatenate([g[k].ravel() for k in sorted(g)])
    assert rel_error(flat(grads), flat(ref_grads)) < 1e-8, rel_error(flat(grads), flat(ref_grads))
    # the fd default step is measurably worse than the jvp (the error this option removes)
    fd = losses.DistillLossConfig(loss="lfmd", lfmd_derivative="fd").validate()
    fd_loss = losses.distill_loss(student, None, teacher, x_s, s, t, fd, 7)[0]
    assert abs(fd_loss - ref_loss) > 100 * abs(loss - ref_loss)


def test_lfmd_derivative_option():
    assert losses.DistillLossConfig(loss="lfmd").validate().lfmd_derivative == losses.LOSS_DEFAULTS["lfmd"]["lfmd_derivative"]
    assert losses.DistillLossConfig(loss="lfmd", lfmd_derivative="fd").validate().lfmd_derivative == "fd"
    assert losses.DistillLossConfig(loss="itvm").validate().lfmd_derivative is None      # not an ITVM setting
    with pytest.raises(ValueError, match="lfmd_derivative"):
        losses.DistillLossConfig(loss="lfmd", lfmd_derivative="exact").validate()


def test_checkpoints_from_before_the_option_resume_under_its_old_value():
    """An LFMD checkpoint without lfmd_derivative was trained with the finite difference: it resumes
    with --lfmd-derivative fd, not under the new jvp default; other losses resume as before."""
    def config(**loss):
        return dict(task="student", loss=losses.DistillLossConfig(**loss).validate().to_dict())
    for name in ("lfmd", "itvm", "ecd"):
        old = config(loss=name)
        old["loss"].pop("lfmd_derivative")
        if name == "lfmd":
            assert train.config_differences(old, config(loss="lfmd", lfmd_derivative="fd")) == []
            diffs = train.config_differences(old, config(loss="lfmd", lfmd_derivative="jvp"))
            assert diffs == ["loss.lfmd_derivative: (not set: fd before the option existed) -> jvp"]
        else:
            assert train.config_differences(old, config(loss=name)) == []


# ----------------------------------------------------------------------------- MeanFlow

SIGMA = 1.7        # data N(0, SIGMA^2 I), noise N(0, I), independent coupling


def _gaussian_flow():
    """sigma_t^2 = (1 - t)^2 + t^2 SIGMA^2; the marginal-preserving flow is x_t = (sigma_t / sigma_s) x_s:
        v(x, t) = sigma_t' / sigma_t x = (t SIGMA^2 - (1 - t)) / sigma_t^2 x,
        u(x, s, t) = (sigma_t / sigma_s - 1) / (t - s) x   (the exact average velocity; v at t = s)."""
    sig = lambda t: np.sqrt((1 - t) ** 2 + t ** 2 * SIGMA ** 2)
    v = lambda x, t: ((t * SIGMA ** 2 - (1 - t)) / sig(t) ** 2)[:, None] * x

    def u(x, s, t, power=1.0):
        gap = t - s
        ratio = (sig(t) / sig(s)) ** power
        safe = np.where(gap != 0, gap, 1.0)
        return np.where((gap != 0)[:, None], ((ratio - 1) / safe)[:, None] * x, v(x, s))
    return v, u


@pytest.mark.parametrize("power,exact", [(1.0, True), (1.1, False)])
def test_meanflow_loss_vanishes_for_the_exact_flow_map(rng, monkeypatch, power, exact):
    """The loss's composition (time convention, tangent (v, 1, 0), sign of (t - s)) with closed-form
    networks; the tangent of the stand-in u is a central difference, independent of the jvp code."""
    v, u = _gaussian_flow()
    monkeypatch.setattr(losses, "teacher_velocity", lambda teacher, x, t: v(x, t))

    def fake_jvp(params, cfg, x, s, t, x_dot, s_dot, t_dot, dropout_seed=None, need_grad=True):
        eps = 1e-5
        f = lambda a: u(x + a * x_dot, s + a * s_dot, t + a * t_dot, power)
        return u(x, s, t, power), (f(eps) - f(-eps)) / (2 * eps), None
    monkeypatch.setattr(losses, "model_jvp", fake_jvp)
    x_s = rng.standard_normal((64, 3))
    s = rng.uniform(0, 0.8, 64)
    t = np.where(rng.random(64) < 0.2, s, np.minimum(1.0, s + rng.uniform(0, 0.6, 64)))   # some t = s
    target, u_pass = losses.meanflow_target((None, None), None, x_s, s, t)
    mse = float(((u(x_s, s, t, power) - target) ** 2).mean())
    if exact:
        assert mse < 1e-18, mse
    else:
        assert mse > 1e-4, mse


def test_meanflow_gradient_holds_the_target(rng):
    """dL/dtheta of mean_n w_n || u_theta - sg(u_tgt(theta0)) ||^2, w_n = sg(1 / (||d_n||^2 + c)^p), against
    finite differences (two-time MLP); p = 0 is the plain squared error."""
    tp, tcfg = _teacher()
    tp = P.randomize(tp, seed=3, std=0.3)
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    sp = P.randomize(sp, seed=5, std=0.3)
    x_s, s, t = _batch(rng, (2,), 6)
    opts = losses.DistillLossConfig(loss="meanflow", meanflow_p=1.0).validate()
    loss, grads, _ = losses.distill_loss((sp, scfg), None, (tp, tcfg), x_s, s, t, opts)
    target, _ = losses.meanflow_target((P.copy(sp), scfg), (tp, tcfg), x_s, s, t)
    u0 = model.model_forward(sp, scfg, x_s, s, t, need_grad=False)[0]
    d = u0 - target
    w = 1.0 / ((d ** 2).sum(axis=1) + 1e-3) ** opts.meanflow_p     # the adaptive weight, held like the target
    assert w.std() > 0
    f = lambda: losses.mse_and_grad(model.model_forward(sp, scfg, x_s, s, t, need_grad=False)[0], target, w)[0]
    assert f() == pytest.approx(loss, rel=1e-14)
    assert set(grads) == set(sp)
    check_gradients(f, sp, grads, n_max=4, tol=1e-6)
    # p = 0: the plain squared error
    plain = losses.DistillLossConfig(loss="meanflow", meanflow_p=0.0).validate()
    assert losses.distill_loss((sp, scfg), None, (tp, tcfg), x_s, s, t, plain)[0] == pytest.approx(
        float((d ** 2).mean()), rel=1e-14)
    with pytest.raises(ValueError, match="meanflow_p"):
        losses.DistillLossConfig(loss="meanflow", meanflow_p=-1.0).validate()


def test_meanflow_target_is_the_tangent_along_the_teacher_flow(rng):
    """u_tgt - v = (t - s) d/ds u(x_s(s), s, t), the derivative taken by moving x along v (central
    difference of u at (x_s + eps v, s + eps, t)), for a real student network."""
    tp, tcfg = _teacher()
    tp = P.randomize(tp, seed=3, std=0.3)
    sp, scfg = ttfm.student_from_teacher(tp, tcfg)
    sp = P.randomize(sp, seed=5, std=0.3)
    scfg = type(scfg)(**dict(scfg.to_dict(), time_scale=5.0))
    x_s, s, t = _batch(rng, (2,), 6)
    target, _ = losses.meanflow_target((sp, scfg), (tp, tcfg), x_s, s, t)
    v = model.model_forward(tp, tcfg, x_s, s, need_grad=False)[0]
    eps = 1e-5
    u = lambda a: model.model_forward(sp, scfg, x_s + a * v, s + a, t, need_grad=False)[0]
    ref = v + (t - s)[:, None] * (u(eps) - u(-eps)) / (2 * eps)
    assert rel_error(target, ref) < 1e-8


def test_cli_distills_with_meanflow_and_both_lfmd_derivatives(tmp_path):
    from click.testing import CliRunner

    import cli
    r = CliRunner()
    t = tmp_path / "teacher"
    res = r.invoke(cli.cli, ["train", "--data", "toy:moons", "--model", "mlp-tiny", "--steps", "20",
                             "--batch-size", "32", "--out", str(t)])
    assert res.exit_code == 0, res.output
    for args in (["--loss", "meanflow"], ["--loss", "lfmd"], ["--loss", "lfmd", "--lfmd-derivative", "fd"]):
        out = tmp_path / "-".join(args)
        res = r.invoke(cli.cli, ["distill", "--data", "toy:moons", "--teacher", str(t), "--steps", "5",
                                 "--batch-size", "32", "--out", str(out), "--eval-steps", "1", "--eval-n", "16",
                                 "--eval-n-ref", "4", *args])
        assert res.exit_code == 0, res.output
        # the MLP's time features have frequency 1000: MeanFlow's update is unstable there (method.md §5.8)
        assert ("Warning: MeanFlow on a student whose time features have frequency 1000" in res.output) == (
            args[1] == "meanflow"), res.output
        saved = ckpt.load_checkpoint(str(out / "checkpoint.h5"))["config"]
        want = None if args[1] == "meanflow" else (args[3] if len(args) > 2 else losses.LOSS_DEFAULTS["lfmd"]["lfmd_derivative"])
        assert saved["loss"]["loss"] == args[1] and saved["loss"]["lfmd_derivative"] == want
    res = r.invoke(cli.cli, ["distill", "--data", "toy:moons", "--teacher", str(t), "--loss", "lfmd",
                             "--lfmd-derivative", "exact"])
    assert res.exit_code != 0 and "lfmd-derivative" in res.output


@pytest.mark.parametrize("omega", [2.0, 1000.0])
def test_meanflow_fixed_point_attracts_but_transports_time_ripple(rng, monkeypatch, omega):
    """The stop-gradient MeanFlow update on the Gaussian teacher (docs/method.md §5.8, "Why it needs
    smooth time features"): perturb the exact average velocity, u = u* + e(s) x with e = delta cos(omega s).
    With a = v / x the teacher's rate and g = t - s, the identity gives the residual exactly
        r = u - u_tgt = [e (1 - g a) - g de/ds] x,
    a pull back (1 - g a > 0 here) plus a transport term of size g omega |e|. One plain step of the
    regression, u <- u - eta r, multiplies the perturbation's size by about
    sqrt((1 - eta (1 - g a))^2 + (eta g omega)^2): < 1 for time features of frequency ~1, > 1 at the
    frequency 1000 of the MLP/U-Net time features, for the same eta."""
    v, u_star = _gaussian_flow()
    monkeypatch.setattr(losses, "teacher_velocity", lambda teacher, x, t: v(x, t))
    delta = 1e-2
    e = lambda s: delta * np.cos(omega * s)
    de = lambda s: -delta * omega * np.sin(omega * s)
    u = lambda x, s, t: u_star(x, s, t) + e(s)[:, None] * x

    def fake_jvp(params, cfg, x, s, t, x_dot, s_dot, t_dot, dropout_seed=None, need_grad=True):
        eps = 1e-6     # central difference: truncation ~ (omega eps)^2 / 6 < 2e-7 relative, rounding ~ 1e-16 / eps
        f = lambda a: u(x + a * x_dot, s + a * s_dot, t + a * t_dot)
        return u(x, s, t), (f(eps) - f(-eps)) / (2 * eps), None
    monkeypatch.setattr(losses, "model_jvp", fake_jvp)
    n, g = 4000, 0.3
    x_s = rng.standard_normal((n, 2))
    s = rng.uniform(0.0, 0.7, n)
    t = s + g
    target, _ = losses.meanflow_target((None, None), None, x_s, s, t)
    r = u(x_s, s, t) - target
    a = v(np.ones((n, 1)), s)[:, 0]                              # the teacher's rate at (x_s, s)
    assert (1 - g * a).min() > 0
    predicted = (e(s) * (1 - g * a) - g * de(s))[:, None] * x_s
    assert np.abs(r - predicted).max() < 1e-5 * np.abs(predicted).max() + 1e-8     # the difference's error
    pert = e(s)[:, None] * x_s
    assert float((r * pert).sum()) > 0                           # the fixed point pulls back ...
    eta = 0.05
    growth = np.linalg.norm(pert - eta * r) / np.linalg.norm(pert)
    if omega < 10:
        assert growth < 1                                        # ... and a plain step contracts
    else:
        assert growth > 10                                       # ... unless the ripple is fast: eta g omega = 15


def test_teacher_with_smooth_time_features_for_meanflow(tmp_path):
    """train --time-scale 1: the teacher's (and so the student's) time features take t unscaled; MeanFlow
    distils from it without the fast-time-features warning. --time-scale needs --out."""
    from click.testing import CliRunner

    import cli
    r = CliRunner()
    t = tmp_path / "teacher-ts1"
    res = r.invoke(cli.cli, ["train", "--data", "toy:moons", "--model", "mlp-tiny", "--steps", "10",
                             "--batch-size", "32", "--time-scale", "1", "--out", str(t)])
    assert res.exit_code == 0, res.output
    assert sampling.load_model(str(t / "checkpoint.h5"), role="teacher").cfg.time_scale == 1.0
    out = tmp_path / "meanflow"
    res = r.invoke(cli.cli, ["distill", "--data", "toy:moons", "--teacher", str(t), "--loss", "meanflow",
                             "--steps", "3", "--batch-size", "32", "--out", str(out), "--eval-steps", "1",
                             "--eval-n", "16", "--eval-n-ref", "4"])
    assert res.exit_code == 0 and "Warning: MeanFlow" not in res.output, res.output
    assert sampling.load_model(str(out / "checkpoint.h5"), role="student").cfg.time_scale == 1.0
    res = r.invoke(cli.cli, ["train", "--data", "toy:moons", "--model", "mlp-tiny", "--steps", "1",
                             "--time-scale", "1"])
    assert res.exit_code != 0 and "--time-scale needs --out" in res.output, res.output
