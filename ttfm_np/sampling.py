"""Load a checkpoint (teacher or student) and draw samples from it.

    model = load_model("runs/teacher/checkpoint.h5")          # LoadedModel
    x = model.generate(z, steps=4, solver="euler")             # z: noise (N, ...) at t = 0
    sampler = load_sampler(path, steps=1)                      # callable(n, seed) -> samples

A teacher (one-time network) is integrated with an ODE solver (flow.py);
a student (two-time network) takes `steps` jumps phi(x, tau_k, tau_{k+1}).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import backend, ckpt, flow, ttfm
from . import params as P
from .model import config_from_dict, model_forward


@dataclass
class LoadedModel:
    params: dict
    cfg: object
    config: dict          # the run's full config (model, data, train, ...)
    path: str

    @property
    def is_student(self) -> bool:
        return bool(self.cfg.two_time)

    @property
    def sample_shape(self) -> tuple:
        if self.cfg.kind == "mlp":
            return (self.cfg.dim,)
        return (self.cfg.in_channels, self.cfg.resolution, self.cfg.resolution)

    def velocity(self, x, t):
        """Teacher velocity v(x, t) (evaluation mode)."""
        if self.is_student:
            raise ValueError(f"{self.path} is a two-timed student, not a flow-matching teacher")
        return model_forward(self.params, self.cfg, x, t)[0]

    def generate(self, z, steps: int, solver: str = "euler", grid=None, chunk: int = 128):
        """Noise z at t=0 -> samples at t=1 with `steps` steps (student) or an ODE solver (teacher).

        z is processed in chunks of `chunk` samples to bound the memory of the network passes.
        """
        xp = backend.array_module(z)
        out = []
        for i in range(0, z.shape[0], chunk):
            zi = z[i:i + chunk]
            if self.is_student:
                out.append(ttfm.sample(self.params, self.cfg, zi, n_steps=steps, grid=grid))
            else:
                out.append(flow.solve_ode(self.velocity, zi, grid=grid, n_steps=steps, method=solver))
        return xp.concatenate(out, axis=0)

    def noise(self, n: int, seed: int):
        xp = backend.get_xp()
        z = np.random.default_rng(seed).standard_normal((n,) + self.sample_shape).astype(np.float32)
        return xp.asarray(z).astype(self.params["emb.fc0.weight"].dtype)


def load_model(path: str, weights: str = "ema", dtype: str = "float32") -> LoadedModel:
    """Read a checkpoint and move its weights (EMA by default) to the current device."""
    if weights not in ("ema", "params"):
        raise ValueError(f"weights must be 'ema' or 'params', got {weights!r}")
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.h5")
    state = ckpt.load_checkpoint(path)
    config = state["config"] or {}
    if "model" not in config:
        raise ValueError(f"{path} has no model config: it was not written by ttfm_np's train/distill")
    cfg = config_from_dict(config["model"])
    chosen = state["ema"] if weights == "ema" and state.get("ema") else state["params"]
    params = P.to_device(P.astype(chosen, np.dtype(dtype)), backend.get_xp())
    return LoadedModel(params=params, cfg=cfg, config=config, path=path)


def load_sampler(path: str, steps: int, solver: str = "euler", weights: str = "ema", batch_size: int = 256):
    """callable(n, seed) -> NumPy samples (n, ...), generated in batches."""
    model = load_model(path, weights)

    def sample(n: int, seed: int = 0):
        out = []
        for i, start in enumerate(range(0, n, batch_size)):
            z = model.noise(min(batch_size, n - start), seed * 100003 + i)
            out.append(backend.to_numpy(model.generate(z, steps, solver)))
        return np.concatenate(out, axis=0)

    sample.model = model
    return sample
