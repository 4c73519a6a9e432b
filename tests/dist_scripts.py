"""Programs that tests/test_distributed.py runs under `mpiexec -n K` (or plainly, K = 1).

    python tests/dist_scripts.py fid PNG_FOLDER OUT.npz
    python tests/dist_scripts.py train teacher|itvm OUT STEPS [resume]
    python tests/dist_scripts.py cli COMMAND ARGS...     (cli.py with a tiny quick toy teacher recipe)
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ttfm_np import distributed as D  # noqa: E402


class _FakeInception:
    """Stands in for the Inception network: 12 fixed nonlinear features of the pixels (no weights file)."""

    def __init__(self):
        self.w = np.random.default_rng(8).standard_normal((3 * 8 * 8, 12))

    def features(self, x):
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        return 3.0 + np.tanh(x @ self.w)


def fid(folder, out):
    """pipeline.fid_stats and fid_score of a PNG folder, the batches split over the ranks; rank 0 writes OUT.npz."""
    from ttfm_np import inception, pipeline
    comm = D.setup("auto", device="cpu")
    inception.load_inception = _FakeInception
    with D.fail_together(comm):                     # an error on one rank must not leave the other waiting
        path, n = pipeline.fid_stats(folder, batch_size=4, out=out + ".stats.npz")
        score = pipeline.fid_score(folder=folder, batch_size=3, ref=path)    # other batches, same images
    if comm.is_root:
        with np.load(path) as f:
            np.savez(out, mu=f["mu"], sigma=f["sigma"], n=n, fid=score["fid"])


def train(kind, out, steps, resume=""):
    """A float64 MLP run on toy data (teacher, or ITVM from a fixed random teacher), global batch 8."""
    from ttfm_np import backend, losses, model, ttfm, train as T
    from ttfm_np.data import BatchIterator, make_toy
    from ttfm_np.objectives import DistillObjective, FlowMatchingObjective

    D.setup("auto", device="cpu")
    xp = backend.select_device("cpu")
    tcfg = T.TrainConfig(steps=int(steps), batch_size=8, lr=1e-2, warmup=0, grad_clip=1.0, ema_decay=0.9,
                         seed=3, log_every=1, ckpt_every=2, sample_every=0, dtype="float64")
    data = make_toy("moons", 256, 0).astype(np.float64)
    teacher_cfg = model.make_config("mlp-tiny", (2,))
    if kind == "teacher":
        cfg, init = teacher_cfg, model.init_model(teacher_cfg, 5)
        objective = FlowMatchingObjective(cfg, sample_kind="toy")
    else:
        tp = model.init_model(teacher_cfg, 11)
        tp["out.weight"] = np.random.default_rng(12).standard_normal(tp["out.weight"].shape)   # a non-zero field
        teacher = ({k: xp.asarray(v, np.float64) for k, v in tp.items()}, teacher_cfg)
        init, cfg = ttfm.student_from_teacher(tp, teacher_cfg)               # as pipeline.distill starts
        objective = DistillObjective(cfg, teacher, losses.DistillLossConfig(loss="itvm"), sample_kind="toy")
    objective.save_samples = lambda params, path: None          # no pictures: the test is about the numbers
    try:
        T.train_loop(out, model_cfg=cfg, init_params=init, objective=objective,
                     data_iter=BatchIterator(data, tcfg.batch_size, seed=tcfg.seed), tcfg=tcfg,
                     run_config={"data": "toy:moons", "kind": kind}, resume=bool(resume), progress=False, xp=xp)
    except T.Interrupted as exc:
        sys.exit(exc.exit_code)


# the default teacher that `distill` trains first when there is none: 40 steps instead of 4000, with
# intermediate checkpoints (as a real recipe has), so that a rank reading the teacher too early finds one
TINY_TOY_TEACHER = dict(model="mlp-tiny", steps=40, batch_size=16, lr=1e-2, warmup=2, ema_decay=0.9, ckpt_every=10)


def cli(*args):
    """The real cli.py command line, only the quick toy teacher recipe made tiny."""
    from ttfm_np import recipes
    import cli as cli_module
    recipes.QUICK_TEACHER_RECIPES["toy"] = dict(TINY_TOY_TEACHER)
    cli_module.cli.main(args=list(args), prog_name="cli.py")


if __name__ == "__main__":
    {"fid": fid, "train": train, "cli": cli}[sys.argv[1]](*sys.argv[2:])
