"""Load a checkpoint (teacher or student) and draw samples from it.

    model = load_model("runs/teacher", role="teacher")         # LoadedModel (a run folder or its checkpoint.h5)
    x = model.generate(z, steps=4, solver="euler")             # z: noise (N, ...) at t = 0
    x = model.sample(n=64, steps=4, seed=0)                    # NumPy samples, noise from the seed scheme

A teacher (one-time network) is integrated with an ODE solver (flow.py);
a student (two-time network) takes `steps` jumps phi(x, tau_k, tau_{k+1}).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import backend, ckpt, flow, seeds, ttfm
from . import params as P
from .model import config_from_dict, init_model, model_forward

ROLES = ("teacher", "student")


class NonFiniteSamples(ValueError):
    """A model produced NaN/Inf samples (diverged weights)."""


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
    def role(self) -> str:
        return "student" if self.is_student else "teacher"

    @property
    def data(self) -> str:
        """The dataset the model was trained on ('' if the checkpoint does not say)."""
        return self.config.get("data", "") or ""

    @property
    def sample_shape(self) -> tuple:
        return self.cfg.sample_shape

    def velocity(self, x, t):
        """Teacher velocity v(x, t) (evaluation mode)."""
        if self.is_student:
            raise ValueError(f"{self.path} is a two-timed student, not a flow-matching teacher")
        return model_forward(self.params, self.cfg, x, t, need_grad=False)[0]

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

    def noise(self, n: int, seed: int, batch_index: int = 0):
        """z ~ N(0, I), (n, *sample_shape), drawn on the host from (seed, "noise", batch_index)."""
        z = seeds.generator(seed, "noise", batch_index).standard_normal((n,) + self.sample_shape)
        return backend.to_device(z, backend.get_xp()).astype(self.params["emb.fc0.weight"].dtype)

    def sample(self, n: int, steps: int, solver: str = "euler", seed: int = 0, batch_size: int = 256,
               first_batch: int = 0):
        """n samples as a NumPy array, generated in batches of batch_size (batch i uses noise batch i).

        Raises NonFiniteSamples when the model returns NaN/Inf (diverged weights).
        """
        out = []
        for i, start in enumerate(range(0, n, batch_size)):
            z = self.noise(min(batch_size, n - start), seed, first_batch + i)
            out.append(check_finite(backend.to_numpy(self.generate(z, steps, solver)), self.path))
        return np.concatenate(out, axis=0)


def check_finite(x, source: str):
    """x unchanged, or NonFiniteSamples naming the source and the fraction of bad values."""
    xp = backend.array_module(x)
    bad = int((~xp.isfinite(x)).sum())
    if bad:
        raise NonFiniteSamples(f"{source} produced {bad} non-finite values ({bad / x.size:.1%} of the samples): "
                               "its weights have diverged; use an earlier checkpoint (checkpoint.prev.h5) "
                               "or retrain with a lower --lr")
    return x


def load_model(path: str, weights: str = "ema", dtype: str = "float32", role: str | None = None,
               data: str | None = None) -> LoadedModel:
    """Read a checkpoint (or a run folder) and move its weights (EMA by default) to the current device.

    role: "teacher" or "student" to insist on one (a clear error otherwise).
    data: the dataset the caller works with; a model trained on another one is an error.
    """
    if weights not in ("ema", "params"):
        raise ValueError(f"weights must be 'ema' or 'params', got {weights!r}")
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    state = ckpt.load_checkpoint(path)
    path = state["path"]
    config = state["config"] or {}
    if "model" not in config:
        raise ckpt.CheckpointError(f"{path} has no model config: it was not written by ttfm_np's train/distill")
    cfg = config_from_dict(config["model"])
    chosen = state["ema"] if weights == "ema" and state.get("ema") else state["params"]
    try:        # names and shapes must be the model's (else a matmul fails deep inside, naming nothing)
        ckpt.check_params_match(init_model(cfg), chosen)
    except ckpt.CheckpointError as exc:
        raise ckpt.CheckpointError(f"{path}: {exc}") from None
    params = P.to_device(P.astype(chosen, np.dtype(dtype)), backend.get_xp())
    loaded = LoadedModel(params=params, cfg=cfg, config=config, path=path)
    if role is not None and loaded.role != role:
        hint = ("a flow-matching teacher checkpoint (written by `train`)" if role == "teacher" else
                "a two-timed student checkpoint (written by `distill`)")
        raise ValueError(f"{path} is a {'two-timed student' if loaded.is_student else 'flow-matching teacher'}, "
                         f"but a {role} is needed here: pass {hint}")
    if data is not None and loaded.data and loaded.data != data:
        raise ValueError(f"{path} was trained on {loaded.data}, not {data}: pass --data {loaded.data} "
                         "or a checkpoint trained on the same data")
    return loaded
