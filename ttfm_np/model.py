"""One interface over the network families (the DDPM++ U-Net and the ADM U-Net for images,
the MLP for 2-D data).

    cfg    = config_from_dict(d)           # d["kind"] is "unet", "adm" or "mlp"
    params = init_model(cfg, seed)
    u, cache = model_forward(params, cfg, x, s, t=None, dropout_seed=None, need_grad=True)
    dx, grads = model_backward(du, cache)

t=None evaluates a one-time (teacher) network v(x, s); with t the two-time
student's u(x, s, t). The cache is the caller's: evaluate as many times as you
like, then call the backward of whichever evaluations need gradients. It holds
everything the backward needs (the config included), so the backward takes
nothing else. need_grad=False (teacher, EMA targets, sampling) returns
(u, None) and keeps no layer's cache alive while it runs.

dropout_seed: an int, or None for evaluation mode (no dropout). The dropout
masks are a pure function of (dropout_seed, layer, element) (dropout.py), so
every evaluation given the same dropout_seed drops the same units.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from . import adm_unet, backend, block_processes, mlp, parallel, unet


class Family(NamedTuple):
    """A network family's functions: its config class, init, forward/backward, and the
    forward-mode tangent pass with its backward (reverse over forward)."""
    config: type
    init: Callable
    forward: Callable
    backward: Callable
    jvp: Callable
    jvp_backward: Callable


FAMILIES = {   # kind -> Family
    "unet": Family(unet.UNetConfig, unet.init_unet, unet.unet_forward, unet.unet_backward,
                   unet.unet_jvp, unet.unet_jvp_backward),
    "adm": Family(adm_unet.ADMConfig, adm_unet.init_adm_unet, adm_unet.adm_unet_forward, adm_unet.adm_unet_backward,
                  adm_unet.adm_unet_jvp, adm_unet.adm_unet_jvp_backward),
    "mlp": Family(mlp.MLPConfig, mlp.init_mlp, mlp.mlp_forward, mlp.mlp_backward, mlp.mlp_jvp, mlp.mlp_jvp_backward),
}


def _family(kind) -> Family:
    if kind not in FAMILIES:
        raise ValueError(f"unknown model kind {kind!r} in config (expected one of {', '.join(FAMILIES)})")
    return FAMILIES[kind]


def config_from_dict(d: dict):
    return _family(d.get("kind")).config.from_dict(d)


def make_config(model: str, data_shape: tuple, two_time: bool = False, **overrides):
    """A config from a preset name and the shape of one data sample.

    model: "mlp" (or "mlp-small", "mlp-tiny") for vectors, a U-Net preset (tiny, small, cifar10,
    celebahq64) for images (C, H, W).
    """
    if model in ("mlp", "mlp-small", "mlp-tiny"):
        if len(data_shape) != 1:
            raise ValueError(f"the MLP is for vector data; this dataset's samples have shape {data_shape}: "
                             "use a U-Net preset (tiny, small, cifar10, celebahq64)")
        kw = dict(mlp.PRESETS[model[4:] if model.startswith("mlp-") else "mlp"])
        kw.update(overrides)
        return mlp.MLPConfig(dim=data_shape[0], two_time=two_time, **kw)
    if len(data_shape) != 3:
        raise ValueError(f"U-Net presets are for images (C, H, W); this dataset's samples have shape "
                         f"{data_shape}: use --model mlp")
    C, H, W = data_shape
    if H != W:
        raise ValueError(f"the U-Net needs square images, got {H}x{W}")
    return unet.preset_config(model, in_channels=C, resolution=H, two_time=two_time, **overrides)


def init_model(cfg, seed: int = 0):
    return _family(cfg.kind).init(cfg, seed)


# The MLP splits into blocks only when every block gets this many rows: below, a layer call costs
# about its Python overhead and two threads only contend for the GIL. Measured (benchmarks/unet_step.py
# --model mlp --threads 2 against torch, AVX-512): batch 4096 1.15-1.17x -> 0.89-0.92x, batch 1024
# 1.12x -> 0.90x with blocks; the main job's batch of 256 runs on one thread and never splits.
MLP_MIN_BLOCK_ROWS = 512


def _sample_blocks(cfg, x, dropout_seed):
    """Blocks of samples that model_forward runs as separate passes on parallel workers, or None.

    With more than one worker (parallel.workers(): OpenBLAS's thread count) a U-Net on NumPy runs
    each block's whole forward and backward on its own worker (a process, block_processes.py, or a
    thread where those are switched off): every layer works per sample
    (GroupNorm normalises within a sample), so the blocks' outputs are the batch's, and the
    parameter gradients are the blocks' sums. Nothing then runs on one thread alone, which the
    per-layer splits (groupnorm.py, conv.py) leave to the attention, the residual adds and the
    copies. The MLP splits too when each block gets MLP_MIN_BLOCK_ROWS rows or more (its rows are
    independent as well; the main job runs its 2-D models on one thread, so one worker: no split).
    Not split: CuPy arrays, and dropout with a seed (its masks are drawn for the whole batch)."""
    if backend.is_cupy(backend.array_module(x)):
        return None
    workers = parallel.workers()
    if cfg.kind == "mlp" and len(x) < MLP_MIN_BLOCK_ROWS * workers:
        return None
    if dropout_seed is not None and getattr(cfg, "dropout", 0.0) > 0:
        return None
    blocks = parallel.split_range(len(x), workers)
    return blocks if len(blocks) > 1 else None


class _BlockCaches(NamedTuple):
    """The cache of a forward run per block of samples: the blocks and one network cache each."""
    blocks: list
    caches: list


def model_forward(params, cfg, x, s, t=None, dropout_seed=None, need_grad: bool = True):
    """u(x, s[, t]) -> (u, cache), or (u, None) when need_grad is False."""
    forward = _family(cfg.kind).forward
    blocks = _sample_blocks(cfg, x, dropout_seed)
    if blocks is not None and block_processes.applies(cfg):
        u, cache = block_processes.forward(forward, params, cfg, x, s, t, dropout_seed, need_grad, blocks)
        return u, (None if cache is None else (cfg.kind, cache))
    if blocks is not None:
        parts = parallel.run_blocks(lambda lo, hi: forward(params, cfg, x[lo:hi], parallel.rows(s, lo, hi),
                                                           parallel.rows(t, lo, hi), dropout_seed, need_grad), blocks)
        u = np.concatenate([p[0] for p in parts])
        cache = _BlockCaches(blocks, [p[1] for p in parts]) if need_grad else None
        return u, (None if cache is None else (cfg.kind, cache))
    u, cache = forward(params, cfg, x, s, t, dropout_seed, need_grad)
    return u, (None if cache is None else (cfg.kind, cache))


def model_backward(du, cache):
    """du (like u) -> dx (like x), grads (dict like params)."""
    if cache is None:
        raise ValueError("this evaluation kept no cache: call model_forward with need_grad=True "
                         "for evaluations that need a backward")
    kind, net_cache = cache
    backward = _family(kind).backward
    if isinstance(net_cache, block_processes.BlockCache):    # the forward ran its blocks on worker processes
        return block_processes.backward(backward, du, net_cache)
    if isinstance(net_cache, _BlockCaches):
        # the forward ran per block of samples: the backward too, on the same blocks; dx stacks,
        # the parameter gradients add up (in block order: the same sum for the same worker count)
        by_block = dict(zip(net_cache.blocks, net_cache.caches))
        parts = parallel.run_blocks(lambda lo, hi: backward(du[lo:hi], by_block[(lo, hi)]), net_cache.blocks)
        return np.concatenate([p[0] for p in parts]), parallel.add_dicts([p[1] for p in parts])
    return backward(du, net_cache)


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def time_tangent(value, like):
    """A time tangent as an (N,) array of like's dtype: None -> 0, a number -> that number for every row."""
    xp = backend.array_module(like)
    if value is None:
        return xp.zeros(like.shape, dtype=like.dtype)
    if isinstance(value, (int, float)) or (hasattr(value, "shape") and value.shape == () and like.shape != ()):
        return xp.full(like.shape, float(value), dtype=like.dtype)           # a number (Python or 0-d array)
    if getattr(value, "shape", None) != like.shape:
        raise ValueError(f"a time tangent must be a number or an array of one entry per sample, shape {like.shape}, "
                         f"got {getattr(value, 'shape', type(value).__name__)}")
    return value.astype(like.dtype, copy=False)


def model_jvp(params, cfg, x, s, t, x_dot, s_dot, t_dot=None, dropout_seed=None, need_grad: bool = True):
    """(u, u_dot, cache): u(x, s[, t]) and its directional derivative
        u_dot = du/dx x_dot + du/ds s_dot [+ du/dt t_dot]
    (parameters fixed). s_dot, t_dot: (N,) arrays or numbers (None = 0). cache None when need_grad is False."""
    s_dot = time_tangent(s_dot, s)
    t_dot = None if t is None else time_tangent(t_dot, t)
    jvp = _family(cfg.kind).jvp
    u, u_dot, cache = jvp(params, cfg, x, s, t, x_dot, s_dot, t_dot, dropout_seed, need_grad)
    return u, u_dot, (None if cache is None else (cfg.kind, cache))


def model_jvp_backward(du, du_dot, cache):
    """Reverse over forward: for a loss L(u, u_dot) with dL/du = du, dL/du_dot = du_dot
    -> (dL/dx, dL/dx_dot, dL/dparams)."""
    if cache is None:
        raise ValueError("this evaluation kept no cache: call model_jvp with need_grad=True "
                         "for evaluations that need a backward")
    kind, net_cache = cache
    backward = _family(kind).jvp_backward
    return backward(du, du_dot, net_cache)
