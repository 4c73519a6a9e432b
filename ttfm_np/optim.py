"""Adam (with bias correction and optional weight decay), gradient clipping,
learning-rate warmup and the EMA of parameters.

Adam (Kingma & Ba 2015) with torch.optim.Adam / AdamW semantics, per parameter
p with gradient g at step k = 1, 2, ...:

    g <- g + wd p                       (weight decay as L2, torch.optim.Adam; decoupled=False)
    p <- p (1 - lr wd)                  (decoupled weight decay, AdamW;        decoupled=True)
    m <- b1 m + (1 - b1) g              (computed as m + (1 - b1)(g - m), torch's lerp)
    v <- b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^k),   v_hat = v / (1 - b2^k)          (bias correction)
    p <- p - lr m_hat / (sqrt(v_hat) + eps)
       = p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)      bc1 = 1 - b1^k, bc2 = 1 - b2^k

EMA of the parameters, applied after every optimizer step:

    p_ema <- mu p_ema + (1 - mu) p

The optimizer state is plain data (AdamState: an int and two dicts of arrays
keyed like the parameters), so a checkpoint saves and restores it exactly.

NumPy path: every update is written with `out=` into one scratch buffer (no
temporaries), and tensors are processed in 256 KiB chunks so the ~12
elementwise passes run out of L2 cache instead of main memory. Measured on
this project's 2-core CPU against plain array expressions: 2.8x faster on one
16.8M-element float32 tensor, ~15% on 590k-element conv weights (which fit in
L3 either way); the EMA update 1.8x on the large tensor.
CuPy path: one fused CUDA kernel per tensor (kernels/adam.cu `adam_update`,
kernels/ema.cu `ema_update`): one read of p, g, m, v and one write of p, m, v.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .flatparams import FlatParams, all_flat
from .flatparams import zeros_like as flat_zeros_like

# Elements per chunk in the NumPy path: 256 KiB per array, so p, g, m, v and
# the scratch buffers of one chunk stay in L2 cache together.
_CHUNK_BYTES = 256 * 1024
# Elements per partial sum of a FlatParams' squared gradient norm (global_grad_norm).
_NORM_PIECE = 1 << 16


@dataclass
class AdamState:
    """Adam's state: the step count k and the moments m, v (dicts keyed like the params)."""
    step: int = 0
    m: dict = field(default_factory=dict)      # first moments, same keys/shapes/dtypes as params
    v: dict = field(default_factory=dict)      # second moments


def adam_init(params) -> AdamState:
    """Fresh state: step 0, zero moments (in one buffer each when params is a FlatParams)."""
    if isinstance(params, FlatParams):
        return AdamState(step=0, m=flat_zeros_like(params), v=flat_zeros_like(params))
    return AdamState(step=0,
                     m={k: backend.array_module(p).zeros_like(p) for k, p in params.items()},
                     v={k: backend.array_module(p).zeros_like(p) for k, p in params.items()})


def adam_state_to_device(state: AdamState, xp, dtype) -> AdamState:
    """A copy of the state on the device of xp, in dtype (a loaded checkpoint is NumPy)."""
    return AdamState(step=int(state.step),
                     m={k: backend.to_device(a, xp).astype(dtype) for k, a in state.m.items()},
                     v={k: backend.to_device(a, xp).astype(dtype) for k, a in state.v.items()})


@dataclass(frozen=True)
class _AdamCoefficients:
    """The scalars of one step, computed once in float64 on the host."""
    one_minus_b1: float     # 1 - b1
    b2: float
    one_minus_b2: float     # 1 - b2
    eps: float
    step_size: float        # lr / bc1
    bc2_sqrt: float         # sqrt(1 - b2^k)
    decay: float            # 1 - lr wd for decoupled weight decay, else 1
    l2: float               # wd for L2 weight decay (added to the gradient), else 0


def _coefficients(step, lr, betas, eps, weight_decay, decoupled) -> _AdamCoefficients:
    b1, b2 = float(betas[0]), float(betas[1])
    bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step       # bias corrections
    wd = float(weight_decay)
    return _AdamCoefficients(one_minus_b1=1.0 - b1, b2=b2, one_minus_b2=1.0 - b2, eps=float(eps),
                             step_size=float(lr) / bc1, bc2_sqrt=math.sqrt(bc2),
                             decay=1.0 - float(lr) * wd if decoupled else 1.0,
                             l2=0.0 if decoupled else wd)


def _adam_update_arrays(xp, p, g, m, v, tmp, tmp2, c: _AdamCoefficients):
    """The reference update on same-shaped arrays, in place; tmp (and tmp2 for L2) are scratch.

    p, g, m, v, tmp, tmp2: one shape (a whole tensor, or one flat chunk of it).

    Written with out= so it allocates nothing; the order of operations follows
    torch's single-tensor Adam so float32 results agree to the last bits.
    """
    if c.l2:
        xp.multiply(p, c.l2, out=tmp2)
        tmp2 += g
        g = tmp2                                         # g <- g + wd p
    if c.decay != 1.0:
        p *= c.decay                                     # p <- p (1 - lr wd)
    xp.subtract(g, m, out=tmp)
    tmp *= c.one_minus_b1
    m += tmp                                             # m <- m + (1 - b1)(g - m)
    v *= c.b2
    xp.multiply(g, g, out=tmp)
    tmp *= c.one_minus_b2
    v += tmp                                             # v <- b2 v + (1 - b2) g^2
    xp.sqrt(v, out=tmp)
    tmp /= c.bc2_sqrt
    tmp += c.eps                                         # denom = sqrt(v) / sqrt(bc2) + eps
    xp.divide(m, tmp, out=tmp)
    tmp *= c.step_size
    p -= tmp                                             # p <- p - (lr / bc1) m / denom


def _chunks(n: int, itemsize: int):
    step = max(1, _CHUNK_BYTES // itemsize)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _adam_update_numpy(p, g, m, v, c: _AdamCoefficients, scratch: "_Scratch"):
    """NumPy: chunked over the flat arrays when p, m, v are contiguous (views), whole arrays otherwise."""
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        tmp, tmp2 = np.empty_like(p), (np.empty_like(p) if c.l2 else None)
        _adam_update_arrays(np, p, g, m, v, tmp, tmp2, c)
        return
    pf, mf, vf = p.reshape(-1), m.reshape(-1), v.reshape(-1)     # views: updates land in p, m, v
    gf = np.ravel(g)                                             # a view, or a copy if g is strided
    for a, b in _chunks(pf.size, pf.itemsize):
        tmp, tmp2 = (buf[:b - a] for buf in scratch[p.dtype])
        _adam_update_arrays(np, pf[a:b], gf[a:b], mf[a:b], vf[a:b], tmp, tmp2, c)


def _kernel_ok(*arrays) -> bool:
    """The fused kernels need contiguous float32/float64 arrays of one dtype."""
    dtype = arrays[0].dtype
    return (dtype in (np.float32, np.float64)
            and all(a.flags.c_contiguous and a.dtype == dtype for a in arrays))


def _adam_update_cupy(p, g, m, v, c: _AdamCoefficients):
    """CuPy: the fused kernel kernels/adam.cu `adam_update`, one pass over the tensor.

    Strided or non-float parameters/moments (never made by this library) take the
    same math as array expressions instead.
    """
    from . import cuda
    xp = backend.array_module(p)
    if not _kernel_ok(p, m, v):
        _adam_update_arrays(xp, p, g, m, v, xp.empty_like(p), xp.empty_like(p), c)
        return
    g = xp.ascontiguousarray(g, dtype=p.dtype)
    t = p.dtype.type                                    # float32 or float64, as the kernel's SCALAR
    kernel = cuda.get_kernel("adam", "adam_update", p.dtype)
    cuda.launch_1d(kernel, p.size, (p, g, m, v, np.int64(p.size),
                                    t(c.one_minus_b1), t(c.b2), t(c.one_minus_b2), t(c.eps),
                                    t(c.step_size), t(c.bc2_sqrt), t(c.decay), t(c.l2)))


def _adam_update(p, g, m, v, c: _AdamCoefficients, scratch):
    """One tensor's Adam update on its own device: the single NumPy/CuPy dispatch of Adam."""
    if backend.is_cupy(backend.array_module(p)):
        _adam_update_cupy(p, g, m, v, c)
    else:
        _adam_update_numpy(p, g, m, v, c, scratch)


def _check_array(name: str, a):
    """Parameters, moments and EMA copies are updated in place, so they must be arrays (not scalars)."""
    if not (isinstance(a, np.ndarray) or type(a).__module__.startswith("cupy")):
        raise TypeError(f"{name}: {type(a).__name__} cannot be updated in place; store parameters as "
                        "numpy/cupy arrays (a 0-d array for a scalar)")


def _check_keys(what: str, expected, got):
    if expected.keys() != got.keys():
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        raise ValueError(f"{what} do not match the parameters: missing {missing}, unexpected {extra}")


def adam_step(params, grads, state: AdamState, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 0.0, decoupled: bool = True) -> None:
    """One Adam step, updating params and state (step, m, v) in place.

    weight_decay with decoupled=True is AdamW's p <- p (1 - lr wd) (torch.optim.AdamW);
    with decoupled=False it is added to the gradient as L2 (torch.optim.Adam).
    """
    b1, b2 = betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"Adam betas must lie in [0, 1), got {tuple(betas)}")
    if lr < 0 or eps < 0 or weight_decay < 0:
        raise ValueError(f"Adam needs lr, eps, weight_decay >= 0, got lr={lr}, eps={eps}, "
                         f"weight_decay={weight_decay}")
    _check_keys("gradients", params, grads)
    _check_keys("Adam first moments", params, state.m)
    _check_keys("Adam second moments", params, state.v)
    for k, p in params.items():        # all checks before the first write: an error leaves everything as it was
        _check_array(k, p)
        if not (grads[k].shape == state.m[k].shape == state.v[k].shape == p.shape):
            raise ValueError(f"{k}: parameter {p.shape}, gradient {grads[k].shape}, moments "
                             f"{state.m[k].shape}/{state.v[k].shape} must have one shape")
    state.step += 1
    c = _coefficients(state.step, lr, betas, eps, weight_decay, decoupled)
    scratch = _Scratch(2)              # NumPy: one pair of chunk buffers per dtype, shared by all tensors
    if all_flat(params, state.m, state.v):
        # one update over the whole buffers (flatparams.py): the same arithmetic element for element
        _adam_update(params.buffer, _flat_gradient(params, grads), state.m.buffer, state.v.buffer, c, scratch)
        return
    for k, p in params.items():
        g, m, v = grads[k], state.m[k], state.v[k]
        if g.dtype != p.dtype:         # e.g. float32 gradients for float64 parameters: g^2 in p's precision
            g = g.astype(p.dtype)
        _adam_update(p, g, m, v, c, scratch)


def _flat_gradient(params: FlatParams, grads):
    """grads as one 1-D array lined up with params.buffer (grads' own buffer when it is a FlatParams alike)."""
    xp = backend.array_module(params.buffer)
    if params.same_layout(grads):
        return grads.buffer
    return xp.concatenate([xp.ravel(grads[k]).astype(params.buffer.dtype, copy=False) for k in params])


class _Scratch:
    """NumPy chunk buffers, `count` per dtype, made on first use: scratch[dtype] -> tuple of arrays."""

    def __init__(self, count: int):
        self.count, self.buffers = count, {}

    def __getitem__(self, dtype):
        if dtype not in self.buffers:
            n = max(1, _CHUNK_BYTES // dtype.itemsize)
            self.buffers[dtype] = tuple(np.empty(n, dtype) for _ in range(self.count))
        return self.buffers[dtype]


def global_grad_norm(grads) -> float:
    """||g|| = sqrt(sum over all tensors of sum g^2); per-tensor sums added in float64.

    On the GPU the per-tensor sums stay on the device and are added there, so
    the whole norm costs one device-to-host copy instead of one per tensor.
    """
    if not grads:
        return 0.0
    first = next(iter(grads.values()))
    xp = backend.array_module(first)
    # a FlatParams: the buffer in pieces of _NORM_PIECE elements (a float32 dot over millions of
    # elements would lose digits; each piece's sum is added in float64 like a tensor's)
    pieces = ([grads.buffer[a:a + _NORM_PIECE] for a in range(0, grads.buffer.size, _NORM_PIECE)]
              if isinstance(grads, FlatParams) else [g.ravel() for g in grads.values()])
    # sum g^2 per tensor (BLAS dot), added in float64; on the GPU the sums stay on the device
    # and only the total comes back (one sync); on the CPU they are host floats already
    squares = [xp.vdot(g, g).astype(np.float64) for g in pieces]
    total = xp.stack(squares).sum() if backend.is_cupy(xp) else np.sum(squares, dtype=np.float64)
    return math.sqrt(float(total))


def clip_grad_norm(grads, max_norm: float) -> float:
    """Scale all gradients in place by max_norm / ||g|| when ||g|| > max_norm; return ||g|| before clipping.

    g <- g * min(1, max_norm / ||g||)  (torch.nn.utils.clip_grad_norm_). A
    non-finite norm is returned unchanged and nothing is scaled, so the caller
    sees the divergence instead of gradients silently turned into NaN.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0 (use float('inf') to disable clipping), got {max_norm}")
    norm = global_grad_norm(grads)
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-12)                # 1e-12 guards nothing here but mirrors torch's form
        for g in ([grads.buffer] if isinstance(grads, FlatParams) else grads.values()):
            g *= scale
    return norm


def warmup_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warmup: base_lr * min(1, step / warmup_steps), for step = 1, 2, ...; no warmup when <= 0."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, step / warmup_steps)


def ema_update(ema_params, params, decay: float) -> None:
    """p_ema <- decay p_ema + (1 - decay) p, in place, for every key of ema_params."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    _check_keys("EMA parameters", params, ema_params)
    for k, e in ema_params.items():
        _check_array(k, e)
        if params[k].shape != e.shape:
            raise ValueError(f"{k}: EMA copy {e.shape} and parameter {params[k].shape} must have one shape")
    one_minus = 1.0 - decay
    scratch = _Scratch(1)
    if all_flat(ema_params, params):                     # one pass over the buffers (flatparams.py)
        _ema_update(ema_params.buffer, params.buffer, decay, one_minus, scratch)
        return
    for k, e in ema_params.items():
        _ema_update(e, params[k], decay, one_minus, scratch)


def _ema_update(e, p, decay: float, one_minus: float, scratch: _Scratch):
    """One tensor's EMA on its own device: the single NumPy/CuPy dispatch of the EMA."""
    if backend.is_cupy(backend.array_module(e)):
        _ema_update_cupy(e, p, decay, one_minus)
    else:
        _ema_update_numpy(e, p, decay, one_minus, scratch)


def _ema_update_cupy(e, p, decay, one_minus):
    """kernels/ema.cu `ema_update`: e <- decay e + (1 - decay) p in one pass (array expressions if e is strided)."""
    xp = backend.array_module(e)
    p = xp.ascontiguousarray(p, dtype=e.dtype)
    if not _kernel_ok(e):
        e *= decay
        e += one_minus * p
        return
    from . import cuda
    kernel = cuda.get_kernel("ema", "ema_update", e.dtype)
    t = e.dtype.type
    cuda.launch_1d(kernel, e.size, (e, p, np.int64(e.size), t(decay), t(one_minus)))


def _ema_update_numpy(e, p, decay, one_minus, scratch):
    """Chunked in place when e is contiguous: e *= decay; e += (1 - decay) p, out of L2 cache."""
    if not e.flags.c_contiguous:
        e *= decay
        e += one_minus * p
        return
    ef, pf = e.reshape(-1), np.ravel(p)
    (buf,) = scratch[e.dtype]
    for a, b in _chunks(ef.size, ef.itemsize):
        tmp = buf[:b - a]
        ef[a:b] *= decay                                 # decay p_ema
        np.multiply(pf[a:b], one_minus, out=tmp)
        ef[a:b] += tmp                                   # + (1 - decay) p
