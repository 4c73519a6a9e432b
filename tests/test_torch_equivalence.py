"""Whole networks against an independent implementation: the same U-Net and
MLP in PyTorch (benchmarks/torch_reference.py), same weights, float64.
Forward outputs and autograd gradients (input and every parameter) must agree."""
import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch", reason="PyTorch not installed: optional comparison with torch skipped")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import torch_reference as tr  # noqa: E402

from ttfm_np import model, params as P, unet  # noqa: E402


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("kind,two_time", [("unet", False), ("unet", True), ("mlp", False), ("mlp", True)])
def test_network_matches_torch(rng, kind, two_time):
    if kind == "unet":
        cfg = unet.preset_config("tiny", in_channels=3, resolution=16, two_time=two_time)
        x = rng.standard_normal((2, 3, 16, 16))
    else:
        cfg = model.make_config("mlp-tiny", (2,), two_time=two_time)
        x = rng.standard_normal((5, 2))
    p = P.randomize(P.astype(model.init_model(cfg, 0), np.float64), seed=3, std=0.3)
    s = rng.uniform(0, 1, x.shape[0])
    t = np.clip(s + rng.uniform(0, 0.5, x.shape[0]), 0, 1) if two_time else None
    u, cache = model.model_forward(p, cfg, x, s, t)
    dout = rng.standard_normal(u.shape)
    dx, grads = model.model_backward(dout, cache)

    net = tr.load_params(tr.build_torch_model(cfg).double(), p)
    xt = torch.tensor(x, requires_grad=True)
    ut = net(xt, torch.tensor(s), None if t is None else torch.tensor(t))
    (ut * torch.tensor(dout)).sum().backward()
    assert _rel(u, ut.detach().numpy()) < 1e-10
    assert _rel(dx, xt.grad.numpy()) < 1e-8
    named = dict(net.named_parameters())
    for k, g in grads.items():
        tg = named[tr.torch_name(k, cfg)].grad.numpy().reshape(g.shape)
        assert _rel(g, tg) < 1e-8, k
