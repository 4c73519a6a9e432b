"""GPU memory of one training step, measured on the CuPy stand-in.

The stand-in counts every device buffer from its allocation until its last view
dies (cupy._standin.counters: live_bytes, peak_bytes). One step's peak above
what was alive before it (params, EMA, teacher) is the step's working memory:
a constant (gradients, weight-sized temporaries) plus a part that grows with
the batch. Measured at batch 2 and 4 on the `cifar10` preset (52.6M parameters,
3x32x32) and extrapolated linearly:

    peak(B) = persistent + adam_moments + act(2) + (B - 2) * (act(4) - act(2)) / 2

(Batch 1 is a special case: a (1, C, H, W) array transposed to (C, 1, H, W) is
still contiguous, so some copies are skipped and batch 1 needs less per sample.)

The measurement runs in the stand-in's allocations-only mode: GEMM results and
kernel outputs are allocated exactly as in a real run, but not computed
(allocation sizes never depend on values; the test on the tiny preset checks
that both modes give the same peak). Not counted: cuBLAS workspaces and the
memory pool's rounding/caching (the gpu_check.sh run on a real GPU reports the
pool's figure beside this one).
"""
import numpy as np
import pytest

import conftest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not conftest.USING_CUPY_STANDIN, reason="device-byte counters exist on the CuPy stand-in only")]

GiB, MiB = 1024 ** 3, 1024 ** 2
TARGET_BYTES_AT_128 = 40 * GiB            # an A100-40GB can then run the recipe's batch 128


def _setup(kind, preset, res=32, channels=3):
    import cupy
    from ttfm_np import losses, model, objectives, ttfm
    from ttfm_np import params as P
    tcfg = model.make_config(preset, (channels, res, res))
    host = model.init_model(tcfg, 0)
    teacher = (P.to_device(host, cupy), tcfg)
    if kind == "teacher":
        return objectives.FlowMatchingObjective(tcfg), teacher[0], None
    shost, scfg = ttfm.student_from_teacher(host, tcfg)
    loss, _, derivative = kind.partition(":")              # lfmd:fd / lfmd:jvp: --lfmd-derivative
    opts = losses.DistillLossConfig(loss=loss, **({"lfmd_derivative": derivative} if derivative else {}))
    objective = objectives.DistillObjective(scfg, teacher, opts)
    return objective, P.to_device(shost, cupy), P.to_device(shost, cupy)


def step_memory(kind, batch, preset="cifar10", res=32, channels=3, compute=False):
    """(bytes alive before the step, peak bytes above that during loss_and_grads, parameter bytes)."""
    import cupy
    counters = cupy._standin.counters
    objective, params, ema = _setup(kind, preset, res, channels)
    x1 = cupy.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, channels, res, res)).astype(np.float32))
    cupy._standin.reset_peak()
    before = counters["live_bytes"]
    with np.errstate(all="ignore"):
        if compute:
            loss, grads, _ = objective.loss_and_grads(params, ema, x1, np.random.default_rng(1), 7)
        else:
            with cupy._standin.allocations_only():
                loss, grads, _ = objective.loss_and_grads(params, ema, x1, np.random.default_rng(1), 7)
    assert grads.keys() == params.keys()
    return before, counters["peak_bytes"] - before, sum(p.nbytes for p in params.values())


def extrapolate(kind, preset="cifar10", batch=128):
    before, act2, param_bytes = step_memory(kind, 2, preset)
    _, act4, _ = step_memory(kind, 4, preset)
    per_sample = (act4 - act2) // 2
    adam = 2 * param_bytes                               # Adam's m and v, allocated once at the start
    fixed = before + adam + act2 - 2 * per_sample
    return dict(per_sample=per_sample, fixed=fixed, at_batch=fixed + batch * per_sample)


def test_cupy_conv_caches_its_input_not_the_unfolded_matrix(rng):
    """A 3x3 conv's backward needs cols = im2col(x) (9x x); the forward keeps x and the backward
    unfolds it again, as on the CPU (before: the GPU cache held cols)."""
    import cupy
    from ttfm_np import conv
    x = cupy.asarray(rng.standard_normal((2, 8, 16, 16)).astype(np.float32))
    W = cupy.asarray(rng.standard_normal((8, 8, 3, 3)).astype(np.float32))
    live0 = cupy._standin.counters["live_bytes"]
    y, cache = conv.conv2d_forward(x, W, None, 1, 1)
    kept = cupy._standin.counters["live_bytes"] - live0 - y.nbytes
    assert kept <= x.nbytes, f"the forward keeps {kept} bytes alive beyond y; x is {x.nbytes}"
    dx, grads = conv.conv2d_backward(cupy.asarray(rng.standard_normal(y.shape).astype(np.float32)), cache)
    assert dx.shape == x.shape and grads["weight"].shape == W.shape


def test_allocations_only_mode_measures_the_same_peak_and_is_linear_in_batch():
    """The method behind the cifar10 figures, on the tiny U-Net: computing or not gives the same
    peak, and the peak grows linearly with the batch (so two batch sizes determine it)."""
    for kind in ("teacher", "lfmd"):
        computed = step_memory(kind, 2, "tiny", res=16, compute=True)[1]
        counted = step_memory(kind, 2, "tiny", res=16)[1]
        assert counted == computed, kind
        a2, a3, a5 = (step_memory(kind, b, "tiny", res=16)[1] for b in (2, 3, 5))
        assert a5 - a3 == 2 * (a3 - a2) and a3 > a2, (kind, a2, a3, a5)


@pytest.mark.parametrize("kind", ["teacher", "itvm", "lfmd:jvp", "lfmd:fd", "ecd", "meanflow"])
def test_cifar10_step_fits_40gib_at_batch_128(kind):
    """Issue 14 measured 388 / 1086 / 1486 / 746 MiB per sample (teacher / ITVM / LFMD / ECD) before
    the input-cached GPU convolution, cache-free teacher/EMA passes and early cache drops."""
    m = extrapolate(kind)
    print(f"{kind}: {m['per_sample'] / MiB:.0f} MiB/sample + {m['fixed'] / MiB:.0f} MiB fixed "
          f"-> batch 128: {m['at_batch'] / GiB:.1f} GiB")
    assert m["at_batch"] < TARGET_BYTES_AT_128, f"{kind}: {m['at_batch'] / GiB:.1f} GiB at batch 128"
