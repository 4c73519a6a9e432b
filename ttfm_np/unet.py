"""DDPM++-style U-Net (Song et al. 2021; layout of NVlabs/edm's SongUNet).

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
import json
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .activations import silu_backward, silu_forward
from .conv import conv2d_backward, conv2d_forward
from .embedding import init_time_embedding, time_embedding_backward, time_embedding_forward
from .groupnorm import groupnorm_backward, groupnorm_forward
from .params import accumulate, conv_weight
from .resample import upsample_nearest2x_backward, upsample_nearest2x_forward
from .resblock import init_resblock, norm_groups, resblock_backward, resblock_forward


@dataclass
class UNetConfig:
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
    def emb_dim(self) -> int:
        return 4 * self.model_channels

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["channel_mult"] = tuple(d["channel_mult"])
        d["attn_resolutions"] = tuple(d["attn_resolutions"])
        return cls(**d)


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
            p.update(init_resblock(rng, e["name"], e["cin"], e["cout"], cfg.emb_dim, e["attention"],
                                   cfg.head_channels))
        else:  # conv / down / up: a 3x3 conv
            p[f"{e['name']}.weight"] = conv_weight(rng, e["cout"], e["cin"], 3)
            p[f"{e['name']}.bias"] = np.zeros(e["cout"], f32)
    p["out.norm.gamma"] = np.ones(cout, f32)
    p["out.norm.beta"] = np.zeros(cout, f32)
    p["out.conv.weight"] = np.zeros((cfg.in_channels, cout, 3, 3), f32)   # zero-initialised output
    p["out.conv.bias"] = np.zeros(cfg.in_channels, f32)
    return p


def unet_forward(params, cfg: UNetConfig, x, s, t=None, rng=None):
    """u(x, s[, t]). x (N, C, R, R); s, t (N,). rng: dropout Generator (None = eval mode)."""
    if x.shape[1:] != (cfg.in_channels, cfg.resolution, cfg.resolution):
        raise ValueError(f"U-Net built for inputs (N, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}), "
                         f"got {tuple(x.shape)}")
    if (t is not None) != cfg.two_time:
        raise ValueError("a two-time model needs both s and t; a one-time model takes only t"
                         if cfg.two_time else "this is a one-time (teacher) U-Net: call it with one time")
    enc, dec, _ = layout(cfg)
    emb, c_emb = time_embedding_forward(params, "emb", s, t, cfg.model_channels, cfg.time_scale)
    emb_act, c_emb_act = silu_forward(emb)
    h = x
    skips, enc_caches, dec_caches = [], [], []
    for e in enc:
        n = e["name"]
        if e["kind"] == "block":
            h, c = resblock_forward(params, n, h, emb_act, attention=e["attention"],
                                    head_channels=cfg.head_channels, dropout=cfg.dropout, rng=rng)
        else:
            stride = 2 if e["kind"] == "down" else 1
            h, c = conv2d_forward(h, params[f"{n}.weight"], params[f"{n}.bias"], stride, 1)
        enc_caches.append(c)
        skips.append(h)
    xp = backend.array_module(x)
    for e in dec:
        n = e["name"]
        if e["kind"] == "up":
            h, c_up = upsample_nearest2x_forward(h)
            h, c_conv = conv2d_forward(h, params[f"{n}.weight"], params[f"{n}.bias"], 1, 1)
            dec_caches.append((c_up, c_conv))
            continue
        split, skip_index = None, None
        if e["skip"]:
            skip_index = len(skips) - 1
            split = h.shape[1]                            # channels of h before the concat
            h = xp.concatenate([h, skips.pop()], axis=1)  # (N, split + C_skip, r, r)
        h, c = resblock_forward(params, n, h, emb_act, attention=e["attention"],
                                head_channels=cfg.head_channels, dropout=cfg.dropout, rng=rng)
        dec_caches.append((c, split, skip_index))
    h, c_norm = groupnorm_forward(h, params["out.norm.gamma"], params["out.norm.beta"],
                                  norm_groups(h.shape[1]), silu=True)
    out, c_out = conv2d_forward(h, params["out.conv.weight"], params["out.conv.bias"], 1, 1)
    return out, (c_emb, c_emb_act, enc_caches, dec_caches, c_norm, c_out)


def unet_backward(dout, cache, params, cfg: UNetConfig):
    """dout (N, C, R, R) -> dx (N, C, R, R), grads (dict like params)."""
    c_emb, c_emb_act, enc_caches, dec_caches, c_norm, c_out = cache
    enc, dec, _ = layout(cfg)
    grads = {}
    # out = conv(silu(norm(h)))
    dh, dW, db = conv2d_backward(dout, c_out)
    accumulate(grads, "out.conv.weight", dW)
    accumulate(grads, "out.conv.bias", db)
    dh, dg, db = groupnorm_backward(dh, c_norm)
    accumulate(grads, "out.norm.gamma", dg)
    accumulate(grads, "out.norm.beta", db)
    d_emb_act = 0
    d_skips = {}                                         # skip index -> gradient
    for e, c in zip(reversed(dec), reversed(dec_caches)):
        n = e["name"]
        if e["kind"] == "up":
            c_up, c_conv = c
            dh, dW, db = conv2d_backward(dh, c_conv)
            accumulate(grads, f"{n}.weight", dW)
            accumulate(grads, f"{n}.bias", db)
            dh = upsample_nearest2x_backward(dh, c_up)
            continue
        c_block, split, skip_index = c
        dh, de = resblock_backward(dh, c_block, params, n, grads)
        d_emb_act = d_emb_act + de
        if split is not None:
            # h = concatenate([h, skip], axis=1): split the gradient at the recorded point
            d_skips[skip_index] = dh[:, split:]
            dh = dh[:, :split]
    for i in reversed(range(len(enc))):
        e, c = enc[i], enc_caches[i]
        n = e["name"]
        dh = dh + d_skips.pop(i)                          # every encoder output was also a skip
        if e["kind"] == "block":
            dh, de = resblock_backward(dh, c, params, n, grads)
            d_emb_act = d_emb_act + de
        else:
            dh, dW, db = conv2d_backward(dh, c)
            accumulate(grads, f"{n}.weight", dW)
            accumulate(grads, f"{n}.bias", db)
    assert not d_skips, "every skip gradient must be consumed"
    # emb_act = silu(emb); emb = E(s) [+ W_d E(t - s)]
    d_emb = silu_backward(d_emb_act, c_emb_act)
    time_embedding_backward(d_emb, c_emb, "emb", grads)
    return dh, grads


def config_json(cfg: UNetConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)
