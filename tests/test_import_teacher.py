"""import-teacher: torchcfm checkpoints as teacher run folders (import_teacher.py, cli.py import-teacher).

Without torch: the architecture options, the checkpoint layouts, and the refusal of a state dict
with missing / unexpected / wrongly shaped keys. With torch and torchcfm: a round trip with no
download -- torchcfm's module (random weights) saved with torch.save in torchcfm's layout,
imported, distilled for two steps, evaluated and sampled from the command line."""
import copy
import hashlib
import json

import numpy as np
import pytest

from cli_checks import invoke
from ttfm_np import adm_unet, ckpt, import_teacher, model, sampling
from ttfm_np import params as P


def _tiny_cfg():
    return import_teacher.config_from_wrapper_kwargs(dict(WRAPPER))


# torchcfm UNetModelWrapper arguments of a small model: GroupNorm(32) needs >= 32 channels; 8x8 keeps it fast
WRAPPER = dict(dim=[3, 8, 8], num_res_blocks=1, num_channels=32, channel_mult=[1, 2], num_heads=4,
               num_head_channels=16, attention_resolutions="4", dropout=0.1)


def _state_dict_of(params, cfg):
    """Our parameters in torchcfm's names and shapes (the attention's Conv1d weights get their last axis)."""
    names = adm_unet.torch_names(cfg)
    return {names[k]: (v[..., None] if k.endswith(("qkv.weight", "proj.weight")) else v) for k, v in params.items()}


def test_config_of_the_published_architecture():
    cfg = import_teacher.config_from_wrapper_kwargs(import_teacher.ARCHS["torchcfm-unet-cifar10"])
    assert cfg == adm_unet.TORCHCFM_CIFAR10
    assert (cfg.time_scale, cfg.norm_groups, cfg.attn_resolutions) == (1.0, 32, (16,))
    with pytest.raises(ValueError, match="does not implement use_scale_shift_norm=True"):
        import_teacher.config_from_wrapper_kwargs(dict(WRAPPER, use_scale_shift_norm=True))
    with pytest.raises(ValueError, match=r"unknown UNetModelWrapper arguments \['channels'\]"):
        import_teacher.config_from_wrapper_kwargs(dict(WRAPPER, channels=3))
    with pytest.raises(ValueError, match="unknown architecture 'adm'"):
        import_teacher.resolve_arch("adm")


def test_state_dict_round_trip_and_refusals(rng):
    cfg = _tiny_cfg()
    params = P.randomize(model.init_model(cfg, 0), seed=2)
    sd = _state_dict_of(params, cfg)
    back = import_teacher.params_from_state_dict(sd, cfg)
    assert back.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
    # DistributedDataParallel's "module." prefix is stripped
    back = import_teacher.params_from_state_dict({"module." + k: v for k, v in sd.items()}, cfg)
    np.testing.assert_array_equal(back["mid.attn.qkv.weight"], params["mid.attn.qkv.weight"])
    bad = dict(sd)
    del bad["middle_block.1.qkv.bias"]
    bad["label_emb.weight"] = np.zeros((10, 128), np.float32)
    bad["out.2.weight"] = np.zeros((3, 32, 1, 1), np.float32)
    with pytest.raises(ValueError) as info:
        import_teacher.params_from_state_dict(bad, cfg, "EMA weights (ema_model)")
    msg = str(info.value)
    assert "missing: middle_block.1.qkv.bias" in msg and "unexpected: label_emb.weight" in msg
    assert "wrong shape: out.2.weight (3, 32, 1, 1) (expected (3, 32, 3, 3))" in msg and "--arch" in msg


def test_checkpoint_layouts():
    sd = {"a": np.zeros(2, np.float32)}
    both = import_teacher.split_checkpoint({"net_model": sd, "ema_model": {"a": np.ones(2, np.float32)},
                                            "optim": {}, "step": 400000}, "f.pt")
    assert both["params"] is sd and both["ema"]["a"][0] == 1 and both["step"] == 400000
    bare = import_teacher.split_checkpoint(sd, "f.pt")
    assert bare["params"] is sd and bare["ema"] is None and bare["step"] is None
    ema_only = import_teacher.split_checkpoint({"ema_model": sd}, "f.pt")
    assert ema_only["params"] is sd and ema_only["ema"] is None
    with pytest.raises(ValueError, match="neither a torchcfm training checkpoint"):
        import_teacher.split_checkpoint({"model": {"a": 1}}, "f.pt")


def test_cli_errors(tmp_path):
    res = invoke("import-teacher", tmp_path / "none.pt", "--out", tmp_path / "t")
    assert res.exit_code != 0 and "Error: checkpoint" in res.output and "does not exist" in res.output
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    res = invoke("import-teacher", tmp_path / "x.pt", "--data", "mnist", "--out", tmp_path / "t")
    assert res.exit_code != 0 and "Error: unknown dataset 'mnist'" in res.output
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(WRAPPER))
    res = invoke("import-teacher", tmp_path / "x.pt", "--arch", arch, "--out", tmp_path / "t")
    assert res.exit_code != 0 and "models images of shape (3, 8, 8), cifar10's are (3, 32, 32)" in res.output
    res = invoke("import-teacher", tmp_path / "x.pt", "--arch", tmp_path / "none.json", "--out", tmp_path / "t")
    assert res.exit_code != 0 and "none.json does not exist" in res.output
    res = invoke("import-teacher", tmp_path / "x.pt", "--data", f"imagefolder:{tmp_path}", "--arch", arch,
                 "--out", tmp_path / "t")
    assert res.exit_code != 0 and "x.pt is not" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- round trip with torchcfm

def _randomise_(torch, net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.torch
def test_round_trip_import_distill_eval_sample(tmp_path, rng):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch)")
    unet = pytest.importorskip("torchcfm.models.unet.unet",
                               reason="torchcfm is not installed (pip install --no-deps torchcfm pot)")
    from PIL import Image
    net = _randomise_(torch, unet.UNetModelWrapper(**WRAPPER), 0)
    ema = _randomise_(torch, copy.deepcopy(net), 1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda step: 1.0)
    path = tmp_path / "otcfm_cifar10_weights_step_20.pt"
    torch.save({"net_model": net.state_dict(), "ema_model": ema.state_dict(), "sched": sched.state_dict(),
                "optim": opt.state_dict(), "step": 20}, path)           # train_cifar10.py's layout
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(WRAPPER))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).save(imgs / f"{i}.png")
    data = f"imagefolder:{imgs}"

    # the published architecture does not fit: refused, naming keys
    res = invoke("import-teacher", path, "--data", data, "--out", tmp_path / "wrong")
    assert res.exit_code != 0 and "do not fit the architecture" in res.output and "missing: " in res.output
    assert not (tmp_path / "wrong" / "checkpoint.h5").exists()

    res = invoke("import-teacher", path, "--arch", arch, "--data", data, "--out", tmp_path / "teacher")
    assert res.exit_code == 0, res.output
    assert "torchcfm step 20" in res.output
    source = json.loads((tmp_path / "teacher" / "source.json").read_text())
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["weights"] == {"ema": "ema_model", "params": "net_model"} and source["torchcfm_step"] == 20
    state = ckpt.load_checkpoint(str(tmp_path / "teacher"))
    assert state["config"]["source"] == source and state["step"] == 20
    cfg = _tiny_cfg()
    names = adm_unet.torch_names(cfg)
    for ours, key in names.items():
        np.testing.assert_array_equal(state["ema"][ours].ravel(), ema.state_dict()[key].numpy().ravel())
        np.testing.assert_array_equal(state["params"][ours].ravel(), net.state_dict()[key].numpy().ravel())
    res = invoke("import-teacher", path, "--arch", arch, "--data", data, "--out", tmp_path / "teacher")
    assert res.exit_code != 0 and "exists already" in res.output

    # the imported teacher's velocity is torchcfm's EMA module's (float32 on both sides: rounding only;
    # 1e-4 of the largest entry, as in test_adm_unet.test_matches_torchcfm_float32)
    teacher = sampling.load_model(str(tmp_path / "teacher"), role="teacher")
    x, t = rng.standard_normal((2, 3, 8, 8)).astype(np.float32), rng.uniform(0, 1, 2).astype(np.float32)
    with torch.no_grad():
        want = ema.eval()(torch.tensor(t), torch.tensor(x)).numpy()
    got = teacher.velocity(x, t)
    assert np.abs(want).max() > 0.1 and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    res = invoke("distill", "--data", data, "--teacher", tmp_path / "teacher", "--steps", 2, "--batch-size", 2,
                 "--eval-steps", "1", "--eval-n", 2, "--eval-n-ref", 2, "--out", tmp_path / "student")
    assert res.exit_code == 0, res.output
    student = ckpt.load_checkpoint(str(tmp_path / "student"))
    assert student["step"] == 2 and student["config"]["model"]["kind"] == "adm"
    assert student["config"]["model"]["two_time"] is True and "emb.delta.weight" in student["params"]
    res = invoke("eval", "--teacher", tmp_path / "teacher", "--student", tmp_path / "student", "--steps", "1",
                 "--n", 2, "--n-ref", 2, "--out", tmp_path / "eval")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert "student 1-step" in json.dumps(rows)
    res = invoke("sample", "--ckpt", tmp_path / "student", "--steps", 1, "--n", 2, "--out", tmp_path / "s.png")
    assert res.exit_code == 0 and (tmp_path / "s.png").exists(), res.output
