"""Distillation losses for the two-timed student (docs/method.md section 5).

Notation: x0 ~ N(0, I) noise, x1 data, x_s = (1 - s) x0 + s x1, v the frozen
teacher, u/phi the student (theta), theta^- its EMA copy, sg = stop-gradient.
||a||^2 is the mean over the non-batch dimensions; losses average over the
batch. Each function returns (loss, grads, metrics): grads are d loss / d theta
for the student's parameters, computed by calling the student's backward once
per student evaluation that carries gradient. Teacher and EMA evaluations are
plain forwards whose results are constants (that *is* the stop-gradient).

    ITVM (the paper's):
        L_init = || u(x_s, s, s) - v(x_s, s) ||^2
        t' = max(s, t - Delta) (absolute) or t - kappa (t - s) (relative),  d = t - t'
        y  = phi_{theta^-}(x_s, s, t');   y_hat = y + d v(y, t')  (Euler) or Heun
        L_term = || u(x_s, s, t) - sg((y_hat - x_s) / (t - s)) ||^2    (pairs with t > s)
        L = lambda_init L_init + lambda_term L_term
    LFMD (Boffi et al.): || d/dt phi(x_s, s, t) - v(phi(x_s, s, t), t) ||^2, d/dt exactly (forward mode,
        --lfmd-derivative jvp) or by finite difference (fd)
    MeanFlow (Geng et al.), this project's time convention (docs/method.md section 5.8):
        L = || u(x_s, s, t) - sg(v(x_s, s) + (t - s) d/ds u(x_s(s), s, t)) ||^2,
        d/ds along the teacher's flow = the JVP of u with tangent (v(x_s, s), 1, 0) in (x, s, t)
    ECD (consistency, initial end): || phi(x_s, s, t) - sg(phi_{theta^-}(x_s + D v(x_s, s), s + D, t)) ||^2
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from . import backend
from .flow import bcast
from .model import model_backward, model_forward, model_jvp
from .ttfm import phi_backward, phi_forward, phi_jvp, phi_jvp_backward

LOSSES = ("itvm", "lfmd", "ecd", "meanflow")
LFMD_DERIVATIVES = ("jvp", "fd")             # LFMD's d/dt phi: exact forward mode, or a finite difference
PAIR_SAMPLINGS = ("minmax", "uniform-gap")     # objectives.sample_time_pairs

# Options that several losses share but whose best value differs per loss default to None in
# DistillLossConfig and take their loss's value from here (validate() fills them in). The values
# are the measured best of experiments/study_toys.py (docs/results.md, "Multi-seed toy study").
LOSS_DEFAULTS = {
    "itvm": dict(frac_t1=0.0, delta=1.0 / 64, student_ema_decay=0.95, lfmd_derivative=None,   # delta: absolute
                 meanflow_p=None),                                                             # mode only
    "lfmd": dict(frac_t1=0.0, delta=1.0 / 64, student_ema_decay=None,     # delta unused; EMA: the recipe's
                 lfmd_derivative="jvp", meanflow_p=None),                 # docs/results.md: the step-cost ratio
    "ecd":  dict(frac_t1=0.5, delta=1.0 / 16, student_ema_decay=0.9, lfmd_derivative=None, meanflow_p=None),
    # MeanFlow: not yet tuned by experiments/study_toys.py; the LFMD-like choices (no EMA target) and the
    # adaptive weight's p = 0.5, the best of p = 0, 0.5, 1 on toy:checkerboard (seed 0) with smooth time
    # features, where MeanFlow learns (docs/results.md, "MeanFlow on the toys"; Geng et al. use 1 on ImageNet)
    "meanflow": dict(frac_t1=0.0, delta=1.0 / 64, student_ema_decay=None, lfmd_derivative=None, meanflow_p=0.5),
}

# The value a loss option had in effect in runs written before the option existed: a checkpoint without
# the option resumes only under that value (train.config_differences). LFMD used the finite difference.
VALUE_BEFORE_OPTION = {"lfmd_derivative": "fd"}


@dataclass
class DistillLossConfig:
    loss: str = "itvm"              # itvm | lfmd | ecd | meanflow
    lambda_init: float = 1.0        # ITVM: weight of the initial-velocity term (0 = ablation)
    lambda_term: float = 1.0        # ITVM: weight of the terminal-velocity term
    delta: float | None = None      # ITVM (absolute mode)/ECD: teacher step Delta; None = the loss's LOSS_DEFAULTS
    delta_mode: str = "relative"    # ITVM: absolute: t' = max(s, t - delta); relative: t' = t - kappa (t - s)
    kappa: float = 0.25             # ITVM: relative Delta as a fraction of t - s
    target_solver: str = "heun"     # ITVM: euler (O(Delta) bias) or heun (O(Delta^2)) for y_hat
    ema_target: bool = True         # ITVM/ECD: target from the EMA student (False: the live weights under sg)
    fd_step: float | None = None    # LFMD: finite-difference step h in t; None = 0.1 / time_scale (lfmd_fd_step)
    lfmd_teacher_grad: bool = False  # LFMD: back-propagate through the teacher's input phi (see lfmd_loss)
    lfmd_derivative: str | None = None  # LFMD: d/dt phi by jvp (exact) or fd (finite difference); None = LOSS_DEFAULTS
    meanflow_p: float | None = None  # MeanFlow: adaptive weight sg(1 / (||u - u_tgt||^2 + c)^p), 0 = plain MSE
    pairs: str = "minmax"           # time pairs: minmax (s, t = min, max of two uniforms) | uniform-gap
    frac_t1: float | None = None    # time pairs: fraction of pairs with t = 1 (all losses); None = LOSS_DEFAULTS
    max_gap: float | None = None    # time pairs: restrict t - s <= max_gap (None: no restriction)
    # The EMA decay of the student's EMA weights (ITVM/ECD take their targets from them; every loss
    # is evaluated with them) for runs that do not set --ema-decay; None = the recipe's. Bootstrapped
    # targets move knowledge away from the diagonal one EMA time constant per hop (docs/results.md),
    # so ITVM and ECD want a fast EMA. For pipeline.distill to apply (an explicit --ema-decay wins).
    student_ema_decay: float | None = None

    def validate(self):
        """Checks every option; returns the config with the per-loss defaults filled in
        (a copy when an option was None, else self): use the returned object."""
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        # NaN passes every range test below (all comparisons with NaN are false): refuse it first
        nonfinite = {k: v for k, v in asdict(self).items() if isinstance(v, float) and not abs(v) < float("inf")}
        if nonfinite:
            raise ValueError(f"loss settings must be finite numbers, got {nonfinite}")
        missing = {k: v for k, v in LOSS_DEFAULTS[self.loss].items() if getattr(self, k) is None and v is not None}
        if missing:
            return replace(self, **missing).validate()
        if self.delta_mode not in ("absolute", "relative"):
            raise ValueError(f"delta_mode must be 'absolute' or 'relative', got {self.delta_mode!r}")
        if self.target_solver not in ("euler", "heun"):
            raise ValueError(f"target_solver must be 'euler' or 'heun', got {self.target_solver!r}")
        if not 0.0 < self.delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1], got {self.delta}")
        if not 0.0 < self.kappa <= 1.0:
            raise ValueError(f"kappa must be in (0, 1], got {self.kappa}")
        if self.fd_step is not None and not 0.0 < self.fd_step < 0.5:
            raise ValueError(f"fd_step must be in (0, 0.5) or None (auto: 0.1 / the student's time_scale), "
                             f"got {self.fd_step}")
        if self.lfmd_derivative not in (None,) + LFMD_DERIVATIVES:
            raise ValueError(f"lfmd_derivative must be one of {', '.join(LFMD_DERIVATIVES)}, got {self.lfmd_derivative!r}")
        if self.meanflow_p is not None and not 0.0 <= self.meanflow_p <= 2.0:
            raise ValueError(f"meanflow_p must be in [0, 2] (0: plain squared error, 1: the paper's), got {self.meanflow_p}")
        if self.pairs not in PAIR_SAMPLINGS:
            raise ValueError(f"pairs must be one of {', '.join(PAIR_SAMPLINGS)}, got {self.pairs!r}")
        if not 0.0 <= self.frac_t1 <= 1.0:
            raise ValueError(f"frac_t1 must be in [0, 1], got {self.frac_t1}")
        if self.max_gap is not None and not 0.0 < self.max_gap <= 1.0:
            raise ValueError(f"max_gap must be in (0, 1], got {self.max_gap}")
        if self.student_ema_decay is not None and not 0.0 <= self.student_ema_decay < 1.0:
            raise ValueError(f"student_ema_decay must be in [0, 1) or None (the recipe's), got {self.student_ema_decay}")
        if self.lambda_init < 0 or self.lambda_term < 0 or self.lambda_init + self.lambda_term == 0:
            raise ValueError("lambda_init and lambda_term must be >= 0 and not both 0")
        return self

    def to_dict(self):
        return asdict(self)


def mse_and_grad(pred, target, weight=None):
    """L = mean_n w_n * mean_d (pred - target)^2, and dL/dpred.

    weight (N,) or None: per-sample weights (e.g. 0 for pairs with t = s).
    """
    N = pred.shape[0]
    D = pred.size // N
    r = pred - target
    per_sample = (r * r).reshape(N, -1).mean(axis=1)          # (N,)
    if weight is None:
        return float(per_sample.mean()), (2.0 / (N * D)) * r
    return float((weight * per_sample).mean()), (2.0 / (N * D)) * bcast(weight, r) * r


def _add_grads(total, grads, scale=1.0):
    for k, g in grads.items():
        total[k] = total[k] + scale * g if k in total else scale * g
    return total


def teacher_velocity(teacher, x, t):
    """v(x, t) of the frozen teacher, evaluation mode, forward only. teacher = (params, cfg)."""
    params, cfg = teacher
    return model_forward(params, cfg, x, t, need_grad=False)[0]


# ----------------------------------------------------------------------------- ITVM

def itvm_target_times(s, t, opts: DistillLossConfig):
    """t' = max(s, t - Delta) or t - kappa (t - s); returns t'."""
    xp = backend.array_module(s)
    if opts.delta_mode == "absolute":
        return xp.maximum(s, t - opts.delta)
    return t - opts.kappa * (t - s)


def itvm_terminal_target(ema, teacher, x_s, s, t, opts: DistillLossConfig):
    """u_tgt = (y_hat - x_s) / (t - s), computed with forwards only (no gradient).

    ema = (params, cfg) of theta^- (or of theta itself when EMA targets are off).
    Pairs with t = s get u_tgt = 0 and must be masked out by the caller.
    """
    t_prime = itvm_target_times(s, t, opts)
    # y = phi_{theta^-}(x_s, s, t')   (= x_s exactly where t' = s)
    y, _ = phi_forward(ema[0], ema[1], x_s, s, t_prime, need_grad=False)
    return _terminal_target_from(teacher, x_s, s, t, t_prime, y, teacher_velocity(teacher, y, t_prime), opts)


def _terminal_target_from(teacher, x_s, s, t, t_prime, y, v1, opts: DistillLossConfig):
    """The teacher's step from (y, t') to t, given v1 = v(y, t'): u_tgt = (y_hat - x_s) / (t - s)."""
    xp = backend.array_module(x_s)
    d = bcast(t - t_prime, x_s)
    if opts.target_solver == "euler":
        y_hat = y + d * v1                                     # y_hat = y + d v(y, t')
    else:                                                      # Heun: trapezoid with an Euler predictor
        v2 = teacher_velocity(teacher, y + d * v1, t)
        y_hat = y + 0.5 * d * (v1 + v2)
    gap = t - s
    safe_gap = xp.where(gap > 0, gap, 1.0)
    return (y_hat - x_s) / bcast(safe_gap, x_s)


def itvm_loss(student, ema, teacher, x_s, s, t, opts: DistillLossConfig, dropout_seed=None):
    """ITVM loss and its gradient w.r.t. the student's parameters.

    student, ema, teacher: (params, cfg) pairs. Cost: 2 student forward+backward,
    1 EMA forward, 2 teacher forwards (3 with Heun); the EMA and teacher
    evaluations keep no cache, and the initial term's backward runs before the
    terminal term's forwards, so at most one student cache is alive at a time.
    """
    params, cfg = student
    if opts.lambda_init > 0 and opts.lambda_term > 0 and _batch_itvm_passes(cfg, x_s):
        return _itvm_loss_batched(student, ema, teacher, x_s, s, t, opts)
    grads, metrics, loss = {}, {}, 0.0
    if opts.lambda_init > 0:
        # L_init = || u(x_s, s, s) - v(x_s, s) ||^2
        v_s = teacher_velocity(teacher, x_s, s)
        u_init, c_init = model_forward(params, cfg, x_s, s, s, dropout_seed)
        l_init, du = mse_and_grad(u_init, v_s)
        del v_s, u_init
        _add_grads(grads, model_backward(opts.lambda_init * du, c_init)[1])
        del c_init, du                                         # no init-term cache during the terminal term
        loss += opts.lambda_init * l_init
        metrics["loss_init"] = l_init
    if opts.lambda_term > 0:
        valid = (t - s > 0).astype(x_s.dtype)                  # the terminal term needs t > s
        u_tgt = itvm_terminal_target(ema, teacher, x_s, s, t, opts)
        # L_term = || u(x_s, s, t) - sg(u_tgt) ||^2
        u_term, c_term = model_forward(params, cfg, x_s, s, t, dropout_seed)
        l_term, du = mse_and_grad(u_term, u_tgt, weight=valid)
        del u_tgt, u_term
        _add_grads(grads, model_backward(opts.lambda_term * du, c_term)[1])
        loss += opts.lambda_term * l_term
        metrics["loss_term"] = l_term
    metrics["loss"] = loss
    return loss, grads, metrics


def _batch_itvm_passes(cfg, x_s) -> bool:
    """Run ITVM's two student passes (and two of its teacher passes) as one pass of 2N samples?

    Yes for the MLP on the CPU: its layers are so small (batch 256 x width 128 in the main job) that
    a pass costs little more than its Python and per-call overhead, which one pass of 2N samples pays
    once instead of twice (docs/benchmarks.md, "Main job"). No for U-Nets and on the GPU, where
    a pass is dominated by arithmetic and the separate passes keep only one student cache alive.
    """
    return getattr(cfg, "kind", None) == "mlp" and not backend.is_cupy(backend.array_module(x_s))


def _itvm_loss_batched(student, ema, teacher, x_s, s, t, opts: DistillLossConfig):
    """itvm_loss with both terms in one student pass over the 2N rows [x_s; x_s] at times
    ([s; s], [s; t]), and the teacher's v(x_s, s) and v(y, t') in one pass over [x_s; y].

    The same loss and gradient as the two-pass form: the MLP treats every row on its own, the
    two terms keep their own means (each over its N rows), and the backward of the stacked
    output gradient [lambda_init du_init; lambda_term du_term] sums both terms' parameter
    gradients, as adding the two backwards does (up to float32 rounding of the sums)."""
    params, cfg = student
    xp = backend.array_module(x_s)
    n = x_s.shape[0]
    t_prime = itvm_target_times(s, t, opts)
    y, _ = phi_forward(ema[0], ema[1], x_s, s, t_prime, need_grad=False)   # y = phi_{theta^-}(x_s, s, t')
    v_both = teacher_velocity(teacher, xp.concatenate([x_s, y]), xp.concatenate([s, t_prime]))
    v_s, v1 = v_both[:n], v_both[n:]                                       # v(x_s, s), v(y, t')
    u_tgt = _terminal_target_from(teacher, x_s, s, t, t_prime, y, v1, opts)
    valid = (t - s > 0).astype(x_s.dtype)                                  # the terminal term needs t > s
    # rows [0, n): u(x_s, s, s) for L_init; rows [n, 2n): u(x_s, s, t) for L_term
    u_both, cache = model_forward(params, cfg, xp.concatenate([x_s, x_s]), xp.concatenate([s, s]),
                                  xp.concatenate([s, t]))
    l_init, du_init = mse_and_grad(u_both[:n], v_s)
    l_term, du_term = mse_and_grad(u_both[n:], u_tgt, weight=valid)
    du_init *= opts.lambda_init
    du_term *= opts.lambda_term
    grads = model_backward(xp.concatenate([du_init, du_term]), cache)[1]
    loss = opts.lambda_init * l_init + opts.lambda_term * l_term
    return loss, grads, dict(loss_init=l_init, loss_term=l_term, loss=loss)


# ----------------------------------------------------------------------------- LFMD

LFMD_SCALE_H = 0.1      # auto h: time_scale * h = 0.1 (experiments/lfmd_fd_study.py, docs/results.md)


def lfmd_fd_step(opts: DistillLossConfig, cfg) -> float:
    """LFMD's finite-difference step h: opts.fd_step, or (None) 0.1 / cfg.time_scale.

    The student sees t through sin/cos(time_scale * t * w_i) with w_0 = 1, so its
    fastest time feature has angular frequency time_scale (1000 by default). A
    difference with step h damps that feature by ~ 1 - (time_scale h)^2 / 6;
    time_scale * h = 0.1 keeps this below 0.2 % while float32 cancellation
    (~ eps |phi| / h) stays ~ 1e-3. Measured against the exact derivative (docs/results.md,
    experiments/lfmd_fd_vs_jvp.py): h = 0.1 / time_scale is off by 0.06-0.46 % in the loss and
    0.14-0.61 % in the gradient (float64; up to 2.1 % / 1.8 % in float32), h = 1e-3 by 5-42 % / 13-61 %.
    """
    if opts.fd_step is not None:
        return float(opts.fd_step)
    return LFMD_SCALE_H / float(cfg.time_scale)


def lfmd_loss(student, ema, teacher, x_s, s, t, opts: DistillLossConfig, dropout_seed=None):
    """Lagrangian map distillation: || d/dt phi(x_s, s, t) - v(phi(x_s, s, t), t) ||^2.

    opts.lfmd_derivative "jvp": d/dt phi exact, one forward-mode pass with the tangent
    (x_dot, s_dot, t_dot) = (0, 0, 1) (ttfm.phi_jvp), and the gradient through it by reverse over
    forward (phi_jvp_backward): exact to rounding, at every t including t = 1 (lfmd_loss_jvp).
    opts.lfmd_derivative "fd": d/dt phi by a second-order finite difference with step h (lfmd_fd_step):
        central      (phi(t + h) - phi(t - h)) / 2h                        where t + h <= 1
        one-sided    (3 phi(t) - 4 phi(t - h) + phi(t - 2h)) / 2h           where t + h > 1
    so the student is never evaluated past t = 1 and both stencils have O(h^2)
    error (a plain backward difference at t = 1 would be O(h), and with
    frac_t1 > 0 many pairs sit there). Written as one per-sample stencil
        dphi/dt ~ w_a phi(t_a) + w_b phi(t_b) + w_t phi(t),
    three student evaluations with gradient either way. All evaluations get the
    same dropout_seed, so they see the same dropout masks (dropout.py: the mask is a
    function of the seed): a difference of two evaluations with different masks
    would add mask noise / h.

    Gradient through the teacher's input (opts.lfmd_teacher_grad): the loss depends
    on theta also through phi inside v(phi, t); True keeps that path, the exact
    gradient of the objective as written (Boffi et al. minimise this loss with
    ordinary autodiff). False (the default) makes v(phi) a constant target: a
    semi-gradient method, cheaper (no teacher backward), and in the toy study
    (docs/results.md) 1.1-2.7x lower 1-step error than the exact gradient at the
    same budget (the exact gradient also pulls phi toward where v matches dphi/dt).
    The ema argument is unused (LFMD has no EMA target); it keeps the signature uniform.
    """
    if (opts.lfmd_derivative or LOSS_DEFAULTS["lfmd"]["lfmd_derivative"]) == "jvp":
        return lfmd_loss_jvp(student, teacher, x_s, s, t, opts, dropout_seed)
    params, cfg = student
    xp = backend.array_module(x_s)
    h = lfmd_fd_step(opts, cfg)
    inside = t + h <= 1.0                                         # (N,) central stencil fits in [0, 1]
    t_a = xp.where(inside, t + h, t - h)
    t_b = xp.where(inside, t - h, t - 2 * h)
    w_a = bcast(xp.where(inside, 1.0, -4.0).astype(x_s.dtype) / (2 * h), x_s)
    w_b = bcast(xp.where(inside, -1.0, 1.0).astype(x_s.dtype) / (2 * h), x_s)
    w_t = bcast(xp.where(inside, 0.0, 3.0).astype(x_s.dtype) / (2 * h), x_s)
    # phi(t) needs a backward only through the teacher's input or the one-sided stencil
    phi_t_grad = opts.lfmd_teacher_grad or not bool(inside.all())
    # Memory on a GPU: phi(t_a) and phi(t_b) are first evaluated for their values only (no cache);
    # each is evaluated again with its cache right before its backward (same dropout_seed: same
    # masks, same values). So at most two network caches (phi_t's and the teacher's) are alive at
    # once, not four, for two extra student forwards (cifar10 preset: 358 -> ~230 MiB per sample).
    # On the CPU, memory is plentiful and compute is not: the caches are kept (12 -> 10 passes).
    recompute = backend.is_cupy(xp)
    phi_a, c_a = phi_forward(params, cfg, x_s, s, t_a, dropout_seed, need_grad=not recompute)
    phi_b, c_b = phi_forward(params, cfg, x_s, s, t_b, dropout_seed, need_grad=not recompute)
    dphi_dt = w_a * phi_a + w_b * phi_b
    del phi_a, phi_b
    phi_t, c_t = phi_forward(params, cfg, x_s, s, t, dropout_seed, need_grad=phi_t_grad)
    dphi_dt += w_t * phi_t
    # the teacher's cache is kept only when its input gradient is needed
    v_out, c_v = model_forward(teacher[0], teacher[1], phi_t, t, need_grad=opts.lfmd_teacher_grad)
    loss, dres = mse_and_grad(dphi_dt, v_out)                  # residual r = dphi_dt - v(phi_t)
    del dphi_dt, v_out, phi_t
    grads = {}
    dphi_t = w_t * dres                                        # phi_t's share of the stencil (0 inside)
    if opts.lfmd_teacher_grad:
        # r = ... - v(phi_t, t): the teacher's input gradient, parameters frozen
        dphi_t = dphi_t + model_backward(-dres, c_v)[0]
    del c_v
    if phi_t_grad:
        _add_grads(grads, phi_backward(dphi_t, c_t)[1])
    del c_t, dphi_t
    for t_k, w_k, c_k in ((t_a, w_a, c_a), (t_b, w_b, c_b)):
        if recompute:                                          # phi(t_a), phi(t_b) again, with caches
            c_k = phi_forward(params, cfg, x_s, s, t_k, dropout_seed)[1]
        _add_grads(grads, phi_backward(w_k * dres, c_k)[1])
        del c_k
    del c_a, c_b
    return loss, grads, {"loss": loss, "fd_step": h}


def lfmd_loss_jvp(student, teacher, x_s, s, t, opts: DistillLossConfig, dropout_seed=None):
    """LFMD with the exact time derivative:

        (phi, phi_dot) = phi_jvp(x_s, s, t; tangent (0, 0, 1))      phi_dot = d/dt phi exactly
        r = phi_dot - v(phi, t),   L = ||r||^2
        dL/dtheta: phi_jvp_backward(dL/dphi, dL/dphi_dot = 2 r / (N D))   (reverse over forward)

    dL/dphi is 0 unless opts.lfmd_teacher_grad (then -v's input gradient of 2 r / (N D)): with the
    semi-gradient default, v(phi) is a constant target. One student tangent pass and its backward,
    one teacher forward; no step h, no special case at t = 1.
    """
    params, cfg = student
    xp = backend.array_module(x_s)
    phi_t, dphi_dt, c_t = phi_jvp(params, cfg, x_s, s, t, xp.zeros_like(x_s), 0.0, 1.0, dropout_seed)
    v_out, c_v = model_forward(teacher[0], teacher[1], phi_t, t, need_grad=opts.lfmd_teacher_grad)
    loss, dres = mse_and_grad(dphi_dt, v_out)                  # r = dphi_dt - v(phi_t, t)
    del v_out, dphi_dt
    # r = ... - v(phi_t, t): the teacher's input gradient (parameters frozen), or a constant target
    dphi_t = model_backward(-dres, c_v)[0] if opts.lfmd_teacher_grad else xp.zeros_like(x_s)
    del c_v, phi_t
    _, _, grads = phi_jvp_backward(dphi_t, dres, c_t)
    return loss, grads, {"loss": loss}


# ----------------------------------------------------------------------------- ECD

def ecd_loss(student, ema, teacher, x_s, s, t, opts: DistillLossConfig, dropout_seed=None):
    """Consistency-style initial-end distillation:

        s' = min(s + Delta, t),  x' = x_s + (s' - s) v(x_s, s)        (one teacher Euler step)
        L  = || phi(x_s, s, t) - sg(phi_{theta^-}(x', s', t)) ||^2
    """
    params, cfg = student
    xp = backend.array_module(x_s)
    s_next = xp.minimum(s + opts.delta, t)
    x_next = x_s + bcast(s_next - s, x_s) * teacher_velocity(teacher, x_s, s)
    target, _ = phi_forward(ema[0], ema[1], x_next, s_next, t, need_grad=False)
    pred, c = phi_forward(params, cfg, x_s, s, t, dropout_seed)
    loss, dpred = mse_and_grad(pred, target)
    _, grads = phi_backward(dpred, c)
    return loss, grads, {"loss": loss}


# ----------------------------------------------------------------------------- MeanFlow

def meanflow_target(student, teacher, x_s, s, t, dropout_seed=None):
    """u_tgt = v(x_s, s) + (t - s) d/ds u(x_s(s), s, t), computed with forwards only (a constant).

    x_s(s) moves along the teacher's flow, dx_s/ds = v(x_s, s), and t is held, so the total derivative
    is the directional derivative of u along (x_dot, s_dot, t_dot) = (v(x_s, s), 1, 0): one jvp pass
    of the live student (MeanFlow's target uses the current weights under stop-gradient, no EMA).
    Returns (u_tgt, u): u = u(x_s, s, t) of that same pass (the same dropout masks).
    """
    params, cfg = student
    v = teacher_velocity(teacher, x_s, s)
    u, u_dot, _ = model_jvp(params, cfg, x_s, s, t, v, 1.0, 0.0, dropout_seed, need_grad=False)
    return v + bcast(t - s, x_s) * u_dot, u


MEANFLOW_C = 1e-3      # c of the adaptive weight (Geng et al.)
# The stop-gradient update transports errors along s and amplifies time ripples of frequency omega unless
# eta (g omega)^2 < 2 (docs/method.md §5.8): pipeline.distill warns above this time-feature frequency
# (measured on toy:checkerboard: time_scale 1 learns at the recipe's learning rate, 1000 does not).
MEANFLOW_MAX_TIME_SCALE = 10.0


def meanflow_weight(d, p: float):
    """w_n = 1 / (sum_d d_n^2 + c)^p for residuals d (N, ...): a constant (no gradient flows through it)."""
    sq = (d * d).reshape(d.shape[0], -1).sum(axis=1)          # (N,)
    return (1.0 / (sq + MEANFLOW_C) ** p).astype(d.dtype)


def meanflow_loss(student, ema, teacher, x_s, s, t, opts: DistillLossConfig, dropout_seed=None):
    """MeanFlow distillation (docs/method.md section 5.8): the average velocity u over [s, t] satisfies
        u(x_s, s, t) = v(x_s, s) + (t - s) d/ds u(x_s(s), s, t)
    (d/ds of phi(x_s(s), s, t) = x_t, constant along the flow). The loss regresses u on the right-hand side
    under stop-gradient, with Geng et al.'s adaptive weight per sample (p = opts.meanflow_p, c = 1e-3):

        d_n = u - sg(u_tgt),   w_n = sg(1 / (sum_d d_n^2 + c)^p),   L = mean_n w_n mean_d d_n^2

    (p = 0: the plain squared error; p = 1 makes every sample's gradient ~ d_n / ||d_n||^2, which keeps
    the bootstrapped target from running away). At t = s the target is v(x_s, s): flow matching on the
    teacher. Cost: 1 teacher forward, 1 student jvp (no cache), 1 student forward + backward. The ema
    argument is unused (the target is the live student's).
    """
    params, cfg = student
    u_tgt, _ = meanflow_target(student, teacher, x_s, s, t, dropout_seed)
    u, c = model_forward(params, cfg, x_s, s, t, dropout_seed)
    p = LOSS_DEFAULTS["meanflow"]["meanflow_p"] if opts.meanflow_p is None else opts.meanflow_p
    weight = meanflow_weight(u - u_tgt, p) if p > 0 else None
    loss, du = mse_and_grad(u, u_tgt, weight=weight)
    del u_tgt, u
    _, grads = model_backward(du, c)
    return loss, grads, {"loss": loss}


LOSS_FUNCTIONS = {"itvm": itvm_loss, "lfmd": lfmd_loss, "ecd": ecd_loss, "meanflow": meanflow_loss}


def distill_loss(student, ema, teacher, x_s, s, t, opts: DistillLossConfig, dropout_seed=None):
    """Dispatch on opts.loss. ema=None (or opts.ema_target False) uses the live weights under sg.

    dropout_seed: int or None; every student evaluation of one call uses it (same masks);
    the teacher and the EMA target are evaluated without dropout and without caches."""
    if opts.frac_t1 is None or opts.delta is None:
        opts = opts.validate()                                 # fill in the loss's own defaults
    if ema is None or not opts.ema_target:
        ema = student
    return LOSS_FUNCTIONS[opts.loss](student, ema, teacher, x_s, s, t, opts, dropout_seed)
