"""Import a torchcfm flow-matching checkpoint as a teacher run folder (no torch needed).

    python cli.py import-teacher otcfm_cifar10_weights_step_400000.pt --out runs/otcfm-teacher
    python cli.py distill --data cifar10 --teacher runs/otcfm-teacher

torchcfm's CIFAR-10 script (examples/images/cifar10/train_cifar10.py) saves

    {"net_model": state dict, "ema_model": state dict, "sched": ..., "optim": ..., "step": int}

with torch.save; under DistributedDataParallel every key carries a "module." prefix. The file is
read with torch_reader.py (a restricted unpickler: tensors, containers and numbers only). The EMA
weights become the teacher's EMA group (what `distill` and `eval` use), the raw weights its params
group; a bare state dict is taken as the only weights. Optimizer and schedule state are ignored.

Time: torchcfm's velocity v(t, x) has noise at t = 0 and data at t = 1 on the path
x_t = t x1 + (1 - t) x0 (sigma = 0), the same convention as this project (docs/method.md §1),
so the velocity is used as it is: v_ours(x, t) = v_torchcfm(t, x). The network sees t itself
(no 1000 t scaling): ADMConfig.time_scale = 1. Images are in [-1, 1] on both sides.

Architecture: `--arch torchcfm-unet-cifar10` (the published models), or a JSON file holding the
keyword arguments of torchcfm's UNetModelWrapper (dim, num_channels, num_res_blocks, channel_mult,
num_heads, num_head_channels, attention_resolutions, dropout) for other sizes. Every key and
shape of the file must be the architecture's; otherwise the import stops, naming the keys.

The folder holds checkpoint.h5 (config: task "teacher", the data, the ADM model config and a
"source" record: file, sha256, size, arch, which weights went where, torchcfm's step) and the
same record as source.json.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from . import adm_unet, atomic, ckpt, recipes, torch_reader

# torchcfm's UNetModelWrapper keyword arguments of the published CIFAR-10 models
ARCHS = {
    "torchcfm-unet-cifar10": dict(dim=[3, 32, 32], num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2],
                                  num_heads=4, num_head_channels=64, attention_resolutions="16", dropout=0.1),
}
DEFAULT_ARCH = "torchcfm-unet-cifar10"

# UNetModelWrapper options our ADM network implements only at these values
_FIXED = dict(learn_sigma=False, class_cond=False, use_checkpoint=False, num_heads_upsample=-1,
              use_scale_shift_norm=False, resblock_updown=False, use_fp16=False, use_new_attention_order=False)
_KNOWN = {"dim", "num_channels", "num_res_blocks", "channel_mult", "num_heads", "num_head_channels",
          "attention_resolutions", "dropout", "num_classes"} | set(_FIXED)


def config_from_wrapper_kwargs(kw: dict) -> adm_unet.ADMConfig:
    """Our ADMConfig of torchcfm's UNetModelWrapper(**kw) (teacher: one time)."""
    unknown = sorted(set(kw) - _KNOWN)
    if unknown:
        raise ValueError(f"unknown UNetModelWrapper arguments {unknown}; known: {', '.join(sorted(_KNOWN))}")
    unsupported = [f"{k}={kw[k]!r}" for k, v in _FIXED.items() if k in kw and kw[k] != v]
    if unsupported:
        raise ValueError(f"the ADM network here does not implement {', '.join(unsupported)}: "
                         "only torchcfm's CIFAR-10 layout (unconditional, additive time conditioning, "
                         "conv resampling, legacy attention order, float32) is supported")
    for k in ("dim", "num_channels", "num_res_blocks"):
        if k not in kw:
            raise ValueError(f"the architecture needs {k!r} (UNetModelWrapper's required arguments: "
                             "dim, num_channels, num_res_blocks)")
    dim = tuple(int(v) for v in kw["dim"])
    if len(dim) != 3 or dim[1] != dim[2]:
        raise ValueError(f"dim must be (C, H, W) with H == W, got {kw['dim']}")
    mult = kw.get("channel_mult")
    if mult is None:                              # UNetModelWrapper's defaults for the sizes it knows here
        defaults = {32: (1, 2, 2, 2), 28: (1, 2, 2)}
        if dim[2] not in defaults:
            raise ValueError(f"give channel_mult for image size {dim[2]}")
        mult = defaults[dim[2]]
    if any(float(m) != int(m) for m in mult):
        raise ValueError(f"channel_mult must be integers here, got {mult}")
    attention = kw.get("attention_resolutions", "16")
    return adm_unet.ADMConfig(
        in_channels=dim[0], resolution=dim[2], model_channels=int(kw["num_channels"]),
        channel_mult=tuple(int(m) for m in mult), num_res_blocks=int(kw["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in str(attention).split(",")), num_heads=int(kw.get("num_heads", 1)),
        num_head_channels=int(kw.get("num_head_channels", -1)), dropout=float(kw.get("dropout", 0.0)),
        norm_groups=32, two_time=False, time_scale=1.0)


def resolve_arch(arch: str) -> tuple:
    """(arch name, UNetModelWrapper kwargs): a name in ARCHS or a JSON file of the kwargs."""
    if arch in ARCHS:
        return arch, dict(ARCHS[arch])
    if not arch.endswith(".json"):
        raise ValueError(f"unknown architecture {arch!r}: use {', '.join(ARCHS)} or a .json file of "
                         "torchcfm UNetModelWrapper keyword arguments")
    if not os.path.isfile(arch):
        raise FileNotFoundError(f"architecture file {arch} does not exist")
    with open(arch, encoding="utf-8") as f:
        try:
            kw = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{arch} is not valid JSON ({exc})") from None
    if not isinstance(kw, dict):
        raise ValueError(f"{arch} must hold a JSON object of UNetModelWrapper keyword arguments")
    return os.path.abspath(arch), kw


def _strip_module_prefix(sd: dict) -> tuple:
    """DistributedDataParallel saves every key as "module.<key>": -> (state dict without it, stripped?)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}, True
    return sd, False


def split_checkpoint(obj, path: str) -> dict:
    """{"params": state dict, "ema": state dict or None, "step": int or None, "layout": str}."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict: expected a torchcfm checkpoint "
                         "({'net_model': ..., 'ema_model': ..., 'step': ...}) or a state dict")
    if "net_model" in obj or "ema_model" in obj:
        for k in ("net_model", "ema_model"):
            if k in obj and not isinstance(obj[k], dict):
                raise ValueError(f"{path}: {k!r} is a {type(obj[k]).__name__}, not a state dict")
        net, ema = obj.get("net_model"), obj.get("ema_model")
        step = obj.get("step")
        return dict(params=net if net is not None else ema, ema=ema if net is not None else None,
                    step=int(step) if isinstance(step, (int, np.integer)) else None,
                    layout="torchcfm training checkpoint (" + ", ".join(k for k in ("net_model", "ema_model")
                                                                     if k in obj) + ")")
    if all(isinstance(v, np.ndarray) for v in obj.values()):
        return dict(params=obj, ema=None, step=None, layout="state dict")
    raise ValueError(f"{path} is neither a torchcfm training checkpoint (keys net_model / ema_model) nor a "
                     f"state dict; its top-level keys are {sorted(map(str, obj))[:8]}")


def params_from_state_dict(sd: dict, cfg: adm_unet.ADMConfig, what: str = "weights", dtype=np.float32) -> dict:
    """torchcfm state dict (name -> array) -> our parameters (of dtype; checkpoints hold float32), or
    ValueError naming every missing, unexpected or wrongly shaped key."""
    sd, _ = _strip_module_prefix(dict(sd))
    names = adm_unet.torch_names(cfg)
    expected = {}                                              # torch key -> (our name, our shape)
    for name, shape in ((n, a.shape) for n, a in adm_unet.init_adm_unet(cfg).items()):
        expected[names[name]] = (name, shape)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = []
    for key in sorted(set(expected) & set(sd)):
        a = sd[key]
        shape = expected[key][1]
        # the attention's 1x1 convolutions are Conv1d weights (C', C, 1) in torchcfm, (C', C) here
        if not isinstance(a, np.ndarray) or a.shape not in (shape, shape + (1,)):
            wrong.append(f"{key} {getattr(a, 'shape', type(a).__name__)} (expected {shape})")
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"the {what} in the file do not fit the architecture ({len(expected)} tensors): "
                         + "; ".join(problems) + ". Pass the --arch the checkpoint was trained with")
    params = {}
    for key, (name, shape) in expected.items():
        a = sd[key]
        if a.dtype.kind != "f":
            raise ValueError(f"{key} of the {what} has dtype {a.dtype}, expected floating point")
        params[name] = np.ascontiguousarray(a.reshape(shape), dtype=dtype)
    return params


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_torchcfm(path: str, out: str, arch: str = DEFAULT_ARCH, data: str = "cifar10") -> dict:
    """Write a teacher run folder `out` from a torchcfm checkpoint; returns the source record."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    recipes.family(data)                                    # a known dataset name (ValueError otherwise)
    arch_name, kw = resolve_arch(arch)
    cfg = config_from_wrapper_kwargs(kw)
    if recipes.family(data) == "cifar10" and cfg.sample_shape != (3, 32, 32):
        raise ValueError(f"the architecture {arch_name} models images of shape {cfg.sample_shape}, cifar10's are "
                         "(3, 32, 32): pass the --data the checkpoint was trained on")
    target = os.path.join(out, ckpt.CHECKPOINT_NAME)
    if os.path.exists(target):
        raise ValueError(f"{target} exists already: choose another --out or delete it")
    obj = torch_reader.load_torch_file(path)
    parts = split_checkpoint(obj, path)
    params = params_from_state_dict(parts["params"], cfg, "raw weights (net_model)" if parts["ema"] is not None
                                    else "weights")
    ema = None if parts["ema"] is None else params_from_state_dict(parts["ema"], cfg, "EMA weights (ema_model)")
    source = dict(format="torchcfm", file=os.path.abspath(path), sha256=sha256_of(path),
                  bytes=os.path.getsize(path), layout=parts["layout"], arch=arch_name, arch_kwargs=kw,
                  torchcfm_step=parts["step"],
                  weights=dict(ema="ema_model" if ema is not None else None,
                               params="net_model" if ema is not None else "the only weights in the file"),
                  time_convention="t = 0 noise, t = 1 data in both: velocity used unchanged")
    config = dict(task="teacher", data=data, resolution=cfg.resolution, model=cfg.to_dict(), source=source)
    ckpt.save_checkpoint(target, params, ema=ema, step=parts["step"] or 0, config=config)
    with atomic.write(os.path.join(out, "source.json")) as f:     # whole or not at all (atomic.py)
        json.dump(source, f, indent=2)
        f.write("\n")
    return dict(source, out=os.path.abspath(out), checkpoint=os.path.abspath(target))
