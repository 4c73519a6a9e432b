"""ttfm_np: flow matching and two-timed flow model distillation (ITVM), by hand.

Every forward and backward pass is written out in NumPy (CPU) or CuPy with
custom CUDA kernels (GPU). Start with:

    from ttfm_np import backend, model, params
    xp = backend.select_device("cpu")
    cfg = model.make_config("tiny", (3, 16, 16))
    p = model.init_model(cfg, seed=0)
    u, cache = model.model_forward(p, cfg, x, t)                   # need_grad=False: (u, None)
    dx, grads = model.model_backward(du, cache)

Every backward has one shape: `dx, grads = thing_backward(dy, cache)`, grads
a new dict (layers: local names like "weight"; blocks/networks: full names).

One file per concept: linear, conv, groupnorm, activations, attention,
resample, dropout, embedding, resblock, tape, unet, mlp, model, optim, ckpt, data,
flow, train, ttfm, losses, inception, fid.
"""
__version__ = "0.1.0"

# Must run before anything imports numpy: it picks NumPy's OpenBLAS kernels (see blas.py).
from .blas import prefer_measured_kernels as _prefer_measured_kernels

_prefer_measured_kernels()
