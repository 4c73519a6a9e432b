"""Adam (with bias correction and optional decoupled weight decay), gradient
clipping, learning-rate warmup and the EMA of parameters.

Adam (Kingma & Ba 2015; torch.optim.Adam/AdamW semantics), per parameter p
with gradient g at step k = 1, 2, ...:

    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^k),  v_hat = v / (1 - b2^k)
    p <- p - lr * wd * p                     (decoupled weight decay, AdamW)
    p <- p - lr * m_hat / (sqrt(v_hat) + eps)

EMA:  p_ema <- mu p_ema + (1 - mu) p   (after every optimizer step)

On the GPU both updates are one fused CUDA kernel per tensor
(kernels/adam.cu `adam_update`, kernels/ema.cu `ema_update`): one read and one
write of every array instead of the ~10 passes the array expressions take.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import backend


@dataclass
class AdamState:
    step: int = 0
    m: dict = field(default_factory=dict)      # first moments, same keys/shapes as params
    v: dict = field(default_factory=dict)      # second moments


def adam_init(params) -> AdamState:
    return AdamState(step=0,
                     m={k: backend.array_module(p).zeros_like(p) for k, p in params.items()},
                     v={k: backend.array_module(p).zeros_like(p) for k, p in params.items()})


def adam_state_to_device(state: AdamState, xp, dtype) -> AdamState:
    return AdamState(step=int(state.step),
                     m={k: backend.to_device(a, xp).astype(dtype) for k, a in state.m.items()},
                     v={k: backend.to_device(a, xp).astype(dtype) for k, a in state.v.items()})


def _adam_update_numpy(p, g, m, v, lr, b1, b2, eps, wd, bc1, bc2):
    """In place, with out= so no full-size temporaries beyond one buffer."""
    m *= b1
    m += (1.0 - b1) * g                                  # m = b1 m + (1 - b1) g
    v *= b2
    v += (1.0 - b2) * (g * g)                            # v = b2 v + (1 - b2) g^2
    if wd:
        p *= 1.0 - lr * wd                               # p = p - lr wd p
    denom = np.sqrt(v / bc2)
    denom += eps                                         # sqrt(v_hat) + eps
    p -= (lr / bc1) * (m / denom)                        # p = p - lr m_hat / denom


def _adam_update_cupy(p, g, m, v, lr, b1, b2, eps, wd, bc1, bc2):
    from . import cuda
    kernel = cuda.get_kernel("adam", "adam_update", p.dtype)
    t = p.dtype.type
    cuda.launch_1d(kernel, p.size, (p, g, m, v, np.int64(p.size), t(lr), t(b1), t(b2), t(eps), t(wd),
                                    t(bc1), t(bc2)))


def adam_step(params, grads, state: AdamState, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 0.0):
    """One Adam step, updating params and state in place."""
    state.step += 1
    b1, b2 = betas
    bc1, bc2 = 1.0 - b1 ** state.step, 1.0 - b2 ** state.step   # bias corrections
    for k, p in params.items():
        g = grads[k]
        contiguous = p.flags.c_contiguous and g.flags.c_contiguous
        if backend.is_cupy(backend.array_module(p)) and contiguous:
            _adam_update_cupy(p, g.astype(p.dtype, copy=False), state.m[k], state.v[k], lr, b1, b2, eps,
                              weight_decay, bc1, bc2)
        else:
            _adam_update_numpy(p, g, state.m[k], state.v[k], lr, b1, b2, eps, weight_decay, bc1, bc2)


def global_grad_norm(grads) -> float:
    """sqrt(sum over all tensors of sum g^2), accumulated in float64."""
    total = 0.0
    for g in grads.values():
        xp = backend.array_module(g)
        total += float(xp.vdot(g.ravel(), g.ravel()))
    return math.sqrt(total)


def clip_grad_norm(grads, max_norm: float) -> float:
    """Scale all gradients by min(1, max_norm / ||g||) in place; returns the norm before clipping."""
    norm = global_grad_norm(grads)
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-12)
        for k in grads:
            grads[k] *= scale
    return norm


def warmup_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warmup: lr * min(1, step / warmup_steps) for step = 1, 2, ..."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, step / warmup_steps)


def ema_update(ema_params, params, decay: float):
    """p_ema <- decay p_ema + (1 - decay) p, in place."""
    for k, e in ema_params.items():
        p = params[k]
        if backend.is_cupy(backend.array_module(e)) and e.flags.c_contiguous and p.flags.c_contiguous:
            from . import cuda
            kernel = cuda.get_kernel("ema", "ema_update", e.dtype)
            cuda.launch_1d(kernel, e.size, (e, p, np.int64(e.size), e.dtype.type(decay)))
        else:
            e *= decay
            e += (1.0 - decay) * p
