"""DDPM++-style U-Net (Song et al. 2021; layout of NVlabs/edm's SongUNet); docs/method.md section 6.2.

    x (N, Cin, R, R), s (N,) [, t (N,)]  ->  u (N, Cin, R, R)

Time embedding e = E(s) (teacher) or E(s) + W_d E(t - s) (two-timed student),
see embedding.py; every block receives silu(e).

Encoder, per level l (resolution r = R / 2^l, channels model_channels * mult[l]):
    level 0: {r}x{r}_conv   3x3 stem conv, Cin -> model_channels
    l > 0:   {r}x{r}_down   3x3 conv, stride 2 (keeps channels)
    then num_res_blocks x {r}x{r}_block{i}  (ResBlock, attention if r in attn_resolutions)
    every encoder output is pushed on the skip stack.
Decoder, levels in reverse:
    lowest:  {r}x{r}_in0 (ResBlock + attention), {r}x{r}_in1 (ResBlock)
    else:    {r}x{r}_up     nearest x2 + 3x3 conv
    then num_res_blocks + 1 x {r}x{r}_block{i}, each on concat([h, skip.pop()]) along channels.
Output: GroupNorm -> SiLU -> 3x3 conv (zero-initialised).

The layout (names, channel counts, attention, which block eats which skip) is
computed once by `layout(cfg)` and drives init, forward and backward alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .activations import silu_backward, silu_forward
from .conv import conv2d_backward, conv2d_forward
from .embedding import init_time_embedding, time_embedding_backward, time_embedding_forward
from .groupnorm import groupnorm_backward, groupnorm_forward
from .params import conv_weight
from .tape import backprop, recorder
from .resample import upsample_nearest2x_backward, upsample_nearest2x_forward
from .resblock import init_resblock, norm_groups, resblock_backward, resblock_forward


class TupleFieldsConfig:
    """to_dict / from_dict for a U-Net config dataclass: its tuple fields are stored as JSON lists."""
    TUPLE_FIELDS = ("channel_mult", "attn_resolutions")

    def to_dict(self):
        d = dataclasses.asdict(self)
        for name in self.TUPLE_FIELDS:
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        for name in cls.TUPLE_FIELDS:
            d[name] = tuple(d[name])
        return cls(**d)


@dataclass
class UNetConfig(TupleFieldsConfig):
    in_channels: int = 3                 # image channels (1 for fashion-mnist, 3 for cifar10)
    resolution: int = 32                 # input height = width
    model_channels: int = 128            # base channel count
    channel_mult: tuple = (2, 2, 2)      # channels per level = model_channels * mult
    num_res_blocks: int = 4              # ResBlocks per encoder level (decoder has one more)
    attn_resolutions: tuple = (16,)      # resolutions that get self-attention
    dropout: float = 0.1                 # dropout inside ResBlocks (training only)
    head_channels: int = 64              # channels per attention head
    two_time: bool = False               # student (s, t) or teacher (t only)
    time_scale: float = 1000.0           # sinusoidal features of time_scale * t
    kind: str = field(default="unet", repr=False)

    @property
    def sample_shape(self) -> tuple:
        """Shape of one data sample: (C, R, R)."""
        return (self.in_channels, self.resolution, self.resolution)

    @property
    def emb_dim(self) -> int:
        return 4 * self.model_channels



# Presets: the architecture; in_channels / resolution come from the dataset.
PRESETS = {
    # tests: a few thousand parameters, every kind of layer present at 16x16
    "tiny": dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                 dropout=0.0, head_channels=8),
    # CPU benchmarks and fashion-mnist teachers (6.5M parameters at 3x32x32)
    "small": dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
                  dropout=0.0, head_channels=64),
    # the paper's CIFAR-10 scale (DDPM++)
    "cifar10": dict(model_channels=128, channel_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
                    dropout=0.1, head_channels=64),
    # CelebA-HQ / FFHQ at 64x64 (EDM's 64x64 DDPM++ layout)
    "celebahq64": dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=4,
                       attn_resolutions=(16,), dropout=0.1, head_channels=64),
}


def preset_config(name: str, in_channels: int = 3, resolution: int = 32, **overrides) -> UNetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; choose one of {', '.join(PRESETS)}")
    kw = dict(PRESETS[name])
    kw.update(overrides)
    return UNetConfig(in_channels=in_channels, resolution=resolution, **kw)


def layout(cfg: UNetConfig):
    """The list of layers: dicts with name, kind, cin, cout, attention, res."""
    levels = len(cfg.channel_mult)
    if cfg.resolution % (2 ** (levels - 1)):
        raise ValueError(f"resolution {cfg.resolution} is not divisible by 2^{levels - 1} "
                         f"({levels} levels); pick a resolution or channel_mult that fit")
    enc, dec = [], []
    cout = cfg.in_channels
    for level, mult in enumerate(cfg.channel_mult):
        r = cfg.resolution >> level
        if level == 0:
            enc.append(dict(name=f"enc.{r}x{r}_conv", kind="conv", cin=cout, cout=cfg.model_channels, res=r))
            cout = cfg.model_channels
        else:
            enc.append(dict(name=f"enc.{r}x{r}_down", kind="down", cin=cout, cout=cout, res=r))
        for i in range(cfg.num_res_blocks):
            cin, cout = cout, cfg.model_channels * mult
            enc.append(dict(name=f"enc.{r}x{r}_block{i}", kind="block", cin=cin, cout=cout, res=r,
                            attention=r in cfg.attn_resolutions, skip=False))
    skip_channels = [e["cout"] for e in enc]
    for level in reversed(range(levels)):
        r = cfg.resolution >> level
        if level == levels - 1:
            dec.append(dict(name=f"dec.{r}x{r}_in0", kind="block", cin=cout, cout=cout, res=r,
                            attention=True, skip=False))
            dec.append(dict(name=f"dec.{r}x{r}_in1", kind="block", cin=cout, cout=cout, res=r,
                            attention=False, skip=False))
        else:
            dec.append(dict(name=f"dec.{r}x{r}_up", kind="up", cin=cout, cout=cout, res=r))
        for i in range(cfg.num_res_blocks + 1):
            cin, cout = cout + skip_channels.pop(), cfg.model_channels * cfg.channel_mult[level]
            dec.append(dict(name=f"dec.{r}x{r}_block{i}", kind="block", cin=cin, cout=cout, res=r,
                            attention=(i == cfg.num_res_blocks and r in cfg.attn_resolutions), skip=True))
    return enc, dec, cout


def init_unet(cfg: UNetConfig, seed: int = 0):
    """Parameters (NumPy float32) initialised as in DDPM++; move with params.to_device."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    p = init_time_embedding(rng, "emb", cfg.model_channels, cfg.emb_dim, cfg.two_time)
    enc, dec, cout = layout(cfg)
    for e in enc + dec:
        if e["kind"] == "block":
            p.update(init_resblock(rng, e["name"], e["cin"], e["cout"], cfg.emb_dim, e["attention"]))
        else:  # conv / down / up: a 3x3 conv
            p[f"{e['name']}.weight"] = conv_weight(rng, e["cout"], e["cin"], 3)
            p[f"{e['name']}.bias"] = np.zeros(e["cout"], f32)
    p["out.norm.gamma"] = np.ones(cout, f32)
    p["out.norm.beta"] = np.zeros(cout, f32)
    p["out.conv.weight"] = np.zeros((cfg.in_channels, cout, 3, 3), f32)   # zero-initialised output
    p["out.conv.bias"] = np.zeros(cfg.in_channels, f32)
    return p


def unet_forward(params, cfg: UNetConfig, x, s, t=None, dropout_seed=None, need_grad: bool = True):
    """u(x, s[, t]). x (N, C, R, R); s, t (N,) -> (u (N, C, R, R), cache).

    dropout_seed: int (the same int gives the same dropout masks), or None for
    evaluation mode. need_grad=False returns (u, None) and keeps no layer's
    cache (a forward-only pass holds the activations and the skip stack, no more).
    """
    if x.shape[1:] != (cfg.in_channels, cfg.resolution, cfg.resolution):
        raise ValueError(f"U-Net built for inputs (N, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}), "
                         f"got {tuple(x.shape)}")
    if (t is not None) != cfg.two_time:
        raise ValueError("a two-time model needs both s and t; a one-time model takes only t"
                         if cfg.two_time else "this is a one-time (teacher) U-Net: call it with one time")
    enc, dec, _ = layout(cfg)
    caches = {}                                  # layer name -> cache (stays empty when need_grad is False)
    run = recorder(caches, need_grad)

    block = dict(head_channels=cfg.head_channels, dropout=cfg.dropout, dropout_seed=dropout_seed,
                 need_grad=need_grad)
    emb = run("emb", time_embedding_forward(params, "emb", s, t, cfg.model_channels, cfg.time_scale))
    emb_act = run("emb_act", silu_forward(emb))
    h = x
    skips = []                                   # (encoder layer name, its output), a stack
    for e in enc:
        n = e["name"]
        if e["kind"] == "block":
            h = run(n, resblock_forward(params, n, h, emb_act, attention=e["attention"], **block))
        else:
            stride = 2 if e["kind"] == "down" else 1
            h = run(n, conv2d_forward(h, params[f"{n}.weight"], params[f"{n}.bias"], stride, 1))
        skips.append((n, h))
    xp = backend.array_module(x)
    concats = {}                                 # decoder block -> (channels of h before the concat, skip's layer)
    for e in dec:
        n = e["name"]
        if e["kind"] == "up":
            h = run(f"{n}.upsample", upsample_nearest2x_forward(h))
            h = run(n, conv2d_forward(h, params[f"{n}.weight"], params[f"{n}.bias"], 1, 1))
            continue
        if e["skip"]:
            skip_name, skip = skips.pop()
            concats[n] = (h.shape[1], skip_name)               # the concat's split point, recorded
            h = xp.concatenate([h, skip], axis=1)              # (N, split + C_skip, r, r)
        h = run(n, resblock_forward(params, n, h, emb_act, attention=e["attention"], **block))
    assert not skips, "every encoder output must be consumed by a decoder block"
    h = run("out.norm", groupnorm_forward(h, params["out.norm.gamma"], params["out.norm.beta"],
                                          norm_groups(h.shape[1]), silu=True))
    out = run("out.conv", conv2d_forward(h, params["out.conv.weight"], params["out.conv.bias"], 1, 1))
    if not need_grad:
        return out, None
    return out, dict(layers=caches, concats=concats, cfg=cfg)


def unet_backward(dout, cache):
    """dout (N, C, R, R) -> dx (N, C, R, R), grads (dict like params, full names)."""
    caches, concats = cache["layers"], cache["concats"]
    enc, dec, _ = layout(cache["cfg"])
    grads = {}
    back = backprop(caches, grads)               # grads[layer name.key] += the layer's local grads
    # out = conv(silu(norm(h)))
    dh = back("out.norm", back("out.conv", dout, conv2d_backward), groupnorm_backward)
    d_emb_act = 0                                # every block reads emb_act: its gradients add up
    d_skips = {}                                         # encoder layer name -> gradient of its output
    for e in reversed(dec):
        n = e["name"]
        if e["kind"] == "up":
            # h = conv(upsample(h))
            dh = back(f"{n}.upsample", back(n, dh, conv2d_backward), upsample_nearest2x_backward)
            continue
        # h = block(h, emb_act)      (a ResBlock's grads carry full names already)
        dh, de = back(n, dh, resblock_backward, full_names=True)
        d_emb_act = d_emb_act + de
        if e["skip"]:
            # h = concatenate([h, skip], axis=1): split the gradient at the recorded point
            split, skip_name = concats[n]
            d_skips[skip_name] = dh[:, split:]
            dh = dh[:, :split]
    for e in reversed(enc):
        n = e["name"]
        dh = dh + d_skips.pop(n)                         # every encoder output was also a skip
        if e["kind"] == "block":
            dh, de = back(n, dh, resblock_backward, full_names=True)
            d_emb_act = d_emb_act + de
        else:
            dh = back(n, dh, conv2d_backward)
    assert not d_skips, "every skip gradient must be consumed"
    # emb_act = silu(emb); emb = E(s) [+ W_d E(t - s)]   (no gradient w.r.t. the times)
    back("emb", back("emb_act", d_emb_act, silu_backward), time_embedding_backward, full_names=True)
    return dh, grads


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def unet_jvp(params, cfg: UNetConfig, x, s, t, x_dot, s_dot, t_dot=None, dropout_seed=None, need_grad: bool = True):
    """(u, u_dot, cache): u(x, s[, t]) and its tangent along (x_dot, s_dot[, t_dot]); unet_forward
    line by line with every layer replaced by its jvp (a concat's tangent is the concat of tangents)."""
    from .activations import silu_jvp
    from .conv import conv2d_jvp
    from .embedding import time_embedding_jvp
    from .groupnorm import groupnorm_jvp
    from .resample import upsample_nearest2x_jvp
    from .resblock import resblock_jvp
    from .tape import jvp_recorder
    if x.shape[1:] != (cfg.in_channels, cfg.resolution, cfg.resolution) or x_dot.shape != x.shape:
        raise ValueError(f"U-Net built for inputs (N, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}) "
                         f"and tangents of the same shape, got {tuple(x.shape)} and {tuple(x_dot.shape)}")
    if (t is not None) != cfg.two_time:
        raise ValueError("a two-time model needs both s and t; a one-time model takes only t"
                         if cfg.two_time else "this is a one-time (teacher) U-Net: call it with one time")
    enc, dec, _ = layout(cfg)
    caches = {}
    run = jvp_recorder(caches, need_grad)
    block = dict(head_channels=cfg.head_channels, dropout=cfg.dropout, dropout_seed=dropout_seed,
                 need_grad=need_grad)
    emb, emb_d = run("emb", time_embedding_jvp(params, "emb", s, s_dot, t, t_dot, cfg.model_channels,
                                               cfg.time_scale))
    ea, ead = run("emb_act", silu_jvp(emb, emb_d))
    h, hd = x, x_dot
    skips = []
    for e in enc:
        n = e["name"]
        if e["kind"] == "block":
            h, hd = run(n, resblock_jvp(params, n, h, ea, hd, ead, attention=e["attention"], **block))
        else:
            stride = 2 if e["kind"] == "down" else 1
            h, hd = run(n, conv2d_jvp(h, params[f"{n}.weight"], params[f"{n}.bias"], hd, stride, 1))
        skips.append((n, h, hd))
    xp = backend.array_module(x)
    concats = {}
    for e in dec:
        n = e["name"]
        if e["kind"] == "up":
            h, hd = run(f"{n}.upsample", upsample_nearest2x_jvp(h, hd))
            h, hd = run(n, conv2d_jvp(h, params[f"{n}.weight"], params[f"{n}.bias"], hd, 1, 1))
            continue
        if e["skip"]:
            skip_name, skip, skip_d = skips.pop()
            concats[n] = (h.shape[1], skip_name)
            h, hd = xp.concatenate([h, skip], axis=1), xp.concatenate([hd, skip_d], axis=1)
        h, hd = run(n, resblock_jvp(params, n, h, ea, hd, ead, attention=e["attention"], **block))
    h, hd = run("out.norm", groupnorm_jvp(h, params["out.norm.gamma"], params["out.norm.beta"],
                                          norm_groups(h.shape[1]), hd, silu=True))
    out, out_d = run("out.conv", conv2d_jvp(h, params["out.conv.weight"], params["out.conv.bias"], hd, 1, 1))
    if not need_grad:
        return out, out_d, None
    return out, out_d, dict(layers=caches, concats=concats, cfg=cfg)


def unet_jvp_backward(dout, dout_dot, cache):
    """-> (dx, dx_dot, grads): unet_backward's steps on (cotangent, tangent's cotangent) pairs."""
    from .activations import silu_jvp_backward
    from .conv import conv2d_jvp_backward
    from .embedding import time_embedding_jvp_backward
    from .groupnorm import groupnorm_jvp_backward
    from .resample import upsample_nearest2x_jvp_backward
    from .resblock import resblock_jvp_backward
    from .tape import jvp_backprop
    caches, concats = cache["layers"], cache["concats"]
    enc, dec, _ = layout(cache["cfg"])
    grads = {}
    back = jvp_backprop(caches, grads)
    dh, dhd = back("out.norm", *back("out.conv", dout, dout_dot, conv2d_jvp_backward), groupnorm_jvp_backward)
    de, ded = 0, 0
    d_skips = {}
    for e in reversed(dec):
        n = e["name"]
        if e["kind"] == "up":
            dh, dhd = back(f"{n}.upsample", *back(n, dh, dhd, conv2d_jvp_backward), upsample_nearest2x_jvp_backward)
            continue
        (dh, de_k), (dhd, ded_k) = back(n, dh, dhd, resblock_jvp_backward, full_names=True)
        de, ded = de + de_k, ded + ded_k
        if e["skip"]:
            split, skip_name = concats[n]
            d_skips[skip_name] = (dh[:, split:], dhd[:, split:])
            dh, dhd = dh[:, :split], dhd[:, :split]
    for e in reversed(enc):
        n = e["name"]
        g, gd = d_skips.pop(n)
        dh, dhd = dh + g, dhd + gd
        if e["kind"] == "block":
            (dh, de_k), (dhd, ded_k) = back(n, dh, dhd, resblock_jvp_backward, full_names=True)
            de, ded = de + de_k, ded + ded_k
        else:
            dh, dhd = back(n, dh, dhd, conv2d_jvp_backward)
    back("emb", *back("emb_act", de, ded, silu_jvp_backward), time_embedding_jvp_backward, full_names=True)
    return dh, dhd, grads
