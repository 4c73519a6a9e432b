"""The training loop on the GPU path (CuPy stand-in where no GPU is present).

* host syncs per step are O(1): the same count for a network with 2 hidden layers
  as for one with 8 (issue 14, item 5: it was one sync per gradient tensor);
* a GPU run replays a CPU run of the same seed: noise and times are drawn on
  the host, so both draw the same numbers, and float64 training agrees to
  rounding (item 6: it drew them with CuPy's generator).
"""
import numpy as np
import pytest

from ttfm_np import backend, data, flow, losses, model, objectives, ttfm, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.gpu_available(), reason=f"no usable GPU: {backend.gpu_problem()}")]


def _run(tmp_path, name, xp, objective, cfg, init, steps, dtype="float32", batch=16):
    objective.save_samples = lambda params, path: None           # no pictures: not what is tested
    points = np.random.default_rng(5).standard_normal((256, 2)).astype(np.float32)
    tcfg = train.TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup=0, log_every=1, ckpt_every=0,
                             dtype=dtype, seed=3)
    return train.train_loop(str(tmp_path / name), model_cfg=cfg, init_params=init, objective=objective,
                            data_iter=data.BatchIterator(points, batch, seed=3), tcfg=tcfg,
                            run_config={"data": "test"}, progress=False, xp=xp)


def test_host_syncs_per_step_do_not_grow_with_the_parameter_count(tmp_path, gpu_counters):
    import cupy as cp
    per_step = {}
    for depth in (2, 8):
        cfg = model.make_config("mlp-tiny", (2,), depth=depth)
        init = model.init_model(cfg, 0)
        syncs = []
        for steps in (2, 5):
            gpu_counters["syncs"] = 0
            _run(tmp_path, f"d{depth}-{steps}", cp, objectives.FlowMatchingObjective(cfg),
                 cfg, init, steps)
            syncs.append(gpu_counters["syncs"])
        per_step[len(init)] = (syncs[1] - syncs[0]) / 3          # start-up and final checkpoint cancel out
    counts = list(per_step.values())
    print("host syncs per step by parameter-tensor count:", per_step)
    assert counts[0] == counts[1], per_step                      # 11 vs 23 parameter tensors (2 syncs each)
    assert counts[0] <= 3, per_step                              # the loss, the gradient norm, ...


def _recording_interpolate(monkeypatch, record):
    real = flow.interpolate

    def spy(x0, x1, t):
        record.append((backend.to_numpy(x0).copy(), backend.to_numpy(t).copy()))
        return real(x0, x1, t)
    monkeypatch.setattr(flow, "interpolate", spy)


@pytest.mark.parametrize("kind", ["teacher", "itvm"])
def test_gpu_run_replays_the_cpu_run_of_the_same_seed(tmp_path, monkeypatch, kind):
    import cupy as cp
    tcfg_model = model.make_config("mlp-tiny", (2,))
    teacher_host = model.init_model(tcfg_model, 0)
    draws, finals = {}, {}
    for dev, xp in (("cpu", np), ("gpu", cp)):
        if kind == "teacher":
            cfg, init = tcfg_model, teacher_host
            objective = objectives.FlowMatchingObjective(cfg)
        else:
            init, cfg = ttfm.student_from_teacher(teacher_host, tcfg_model)
            teacher = ({k: xp.asarray(v.astype(np.float64)) for k, v in teacher_host.items()}, tcfg_model)
            objective = objectives.DistillObjective(cfg, teacher, losses.DistillLossConfig(loss="itvm", frac_t1=0.3))
        draws[dev] = []
        with monkeypatch.context() as mp:
            _recording_interpolate(mp, draws[dev])
            params, ema, step = _run(tmp_path, f"{kind}-{dev}", xp, objective, cfg, init, 3, dtype="float64")
        assert step == 3 and all(backend.array_module(v) is xp for v in params.values())
        finals[dev] = {k: backend.to_numpy(v) for k, v in params.items()}
    assert len(draws["cpu"]) == len(draws["gpu"]) >= 3
    for (x0c, tc), (x0g, tg) in zip(draws["cpu"], draws["gpu"]):
        np.testing.assert_array_equal(x0g, x0c)                  # the same noise ...
        np.testing.assert_array_equal(tg, tc)                    # ... and the same times
    for k in finals["cpu"]:
        np.testing.assert_allclose(finals["gpu"][k], finals["cpu"][k], rtol=1e-9, atol=1e-12, err_msg=k)
