"""Kernel study: the Adam update and the EMA over a parameter dict (NumPy).

Reference: float64 formulas. v1: out-of-place array expressions (one temporary
per operation). v2: the library's in-place update (ttfm_np/optim.py).
On a GPU the library runs one fused kernel per tensor (kernels/adam.cu, ema.cu).
"""
import numpy as np

from harness import Registry, run_study
from ttfm_np import optim

registry = Registry()
LR, B1, B2, EPS, WD, MU = 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.999


def make_inputs(quick, rng):
    shapes = [(8, 4), (5,)] if quick else [(256, 256, 3, 3)] * 8 + [(256,)] * 16
    p = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()}
    m = {k: 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()}
    v = {k: rng.uniform(0, 0.1, v_.shape).astype(np.float32) for k, v_ in p.items()}
    return p, g, m, v


def _flat(d):
    return np.concatenate([a.ravel() for a in d.values()])


def reference(inp):
    p, g, m, v = ({k: a.astype(np.float64) for k, a in d.items()} for d in inp)
    P, G, M, V = map(_flat, (p, g, m, v))
    M = B1 * M + (1 - B1) * G
    V = B2 * V + (1 - B2) * G * G
    newP = P * (1 - LR * WD) - LR * (M / (1 - B1)) / (np.sqrt(V / (1 - B2)) + EPS)
    return newP, M, V, MU * P + (1 - MU) * newP


@registry.version(1, "out-of-place array expressions")
def v1(inp):
    p, g, m, v = inp
    out_p, out_m, out_v, out_e = {}, {}, {}, {}
    for k in p:
        out_m[k] = B1 * m[k] + (1 - B1) * g[k]
        out_v[k] = B2 * v[k] + (1 - B2) * g[k] * g[k]
        out_p[k] = p[k] * (1 - LR * WD) - LR * (out_m[k] / (1 - B1)) / (np.sqrt(out_v[k] / (1 - B2)) + EPS)
        out_e[k] = MU * p[k] + (1 - MU) * out_p[k]
    return _flat(out_p), _flat(out_m), _flat(out_v), _flat(out_e)


@registry.version(2, "in-place update (library)")
def v2(inp):
    p, g, m, v = ({k: a.copy() for k, a in d.items()} for d in inp)
    ema = {k: a.copy() for k, a in p.items()}
    state = optim.AdamState(step=0, m=m, v=v)
    optim.adam_step(p, g, state, LR, (B1, B2), EPS, WD)
    optim.ema_update(ema, p, MU)
    return _flat(p), _flat(m), _flat(v), _flat(ema)


if __name__ == "__main__":
    run_study("adam_ema", registry, make_inputs, reference, tol=1e-5)
