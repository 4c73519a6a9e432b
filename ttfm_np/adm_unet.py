"""The ADM U-Net (Dhariwal & Nichol 2021, "guided-diffusion"), as torchcfm's `UNetModelWrapper`
builds it for its CIFAR-10 flow-matching models; the second image network next to the
DDPM++ U-Net (unet.py). README "Distill a torchcfm checkpoint".

    x (N, Cin, R, R), s (N,) [, t (N,)]  ->  u (N, Cin, R, R)

Time embedding e = E(s) (teacher) or E(s) + W_d E(t - s) (two-timed student), embedding.py
with the sinusoidal features of time_scale * t: torchcfm feeds t in [0, 1] unscaled
(time_scale = 1), cos before sin, max period 10000. Every layer sees silu(e).

Layers, numbered like torchcfm's module lists (ch0 = model_channels * channel_mult[0];
a level's resolution is R / 2^level):

    enc.0.conv              3x3 conv, Cin -> ch0                           input_blocks.0.0
    per level, num_res_blocks times:
      enc.k.res [+ enc.k.attn]   ADM ResBlock (adm_resblock.py) [+ attention, adm_attention.py,
                                 at the resolutions in attn_resolutions]   input_blocks.k.0 [.1]
    after every level but the last:
      enc.k.down            3x3 conv, stride 2 (adm_resample.py)           input_blocks.k.0.op
    mid.res0, mid.attn, mid.res1                                           middle_block.0 / .1 / .2
    levels in reverse, num_res_blocks + 1 times:
      dec.k.res [+ dec.k.attn] [+ dec.k.up]   on concat([h, skip.pop()]) along channels; the
                            level's last block of every level but level 0 upsamples
                            (nearest x2 + 3x3 conv)                        output_blocks.k.0 [.1] [.1|.2]
    out.norm, out.conv      GroupNorm -> SiLU -> 3x3 conv, ch0 -> Cin      out.0 / out.2

Every encoder output (the stem conv, each block, each downsample) is pushed on the skip
stack; every decoder block pops one. Heads per attention layer: C // num_head_channels,
or num_heads when num_head_channels is -1 (ADM's rule). `torch_names(cfg)` maps each of
our parameter names to torchcfm's state-dict key (import_teacher.py uses it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .activations import silu_backward, silu_forward
from .adm_attention import adm_attention_backward, adm_attention_forward, init_adm_attention
from .adm_resample import downsample_backward, downsample_forward, upsample_backward, upsample_forward
from .adm_resblock import adm_resblock_backward, adm_resblock_forward, init_adm_resblock
from .conv import conv2d_backward, conv2d_forward
from .embedding import init_time_embedding, time_embedding_backward, time_embedding_forward
from .groupnorm import groupnorm_backward, groupnorm_forward
from .params import conv_weight
from .tape import backprop, recorder
from .unet import TupleFieldsConfig


@dataclass
class ADMConfig(TupleFieldsConfig):
    in_channels: int = 3                 # image channels
    resolution: int = 32                 # input height = width
    model_channels: int = 128            # base channel count (torchcfm: num_channels)
    channel_mult: tuple = (1, 2, 2, 2)   # channels per level = model_channels * mult
    num_res_blocks: int = 2              # ResBlocks per encoder level (decoder has one more)
    attn_resolutions: tuple = (16,)      # resolutions that get attention (the middle always has it)
    num_heads: int = 4                   # heads when num_head_channels is -1
    num_head_channels: int = 64          # channels per head (-1: use num_heads)
    norm_groups: int = 32                # GroupNorm groups everywhere (ADM: 32)
    dropout: float = 0.1                 # dropout inside ResBlocks (training only)
    two_time: bool = False               # student (s, t) or teacher (t only)
    time_scale: float = 1.0              # sinusoidal features of time_scale * t (torchcfm: 1)
    kind: str = field(default="adm", repr=False)

    @property
    def sample_shape(self) -> tuple:
        return (self.in_channels, self.resolution, self.resolution)

    @property
    def emb_dim(self) -> int:
        return 4 * self.model_channels

    def heads(self, channels: int) -> int:
        return self.num_heads if self.num_head_channels == -1 else channels // self.num_head_channels



# torchcfm's CIFAR-10 models (examples/images/cifar10/train_cifar10.py): UNetModelWrapper(dim=(3, 32, 32),
# num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4, num_head_channels=64,
# attention_resolutions="16", dropout=0.1)
TORCHCFM_CIFAR10 = ADMConfig()


def _check(cfg: ADMConfig):
    levels = len(cfg.channel_mult)
    if cfg.resolution % (2 ** (levels - 1)):
        raise ValueError(f"resolution {cfg.resolution} is not divisible by 2^{levels - 1} ({levels} levels)")
    if cfg.model_channels % 2:
        raise ValueError(f"model_channels must be even (sin/cos pairs of the time features), got {cfg.model_channels}")
    for mult in cfg.channel_mult:
        ch = cfg.model_channels * mult
        if ch % cfg.norm_groups:
            raise ValueError(f"{ch} channels cannot be split into {cfg.norm_groups} GroupNorm groups; "
                             "choose model_channels * mult divisible by norm_groups")
        if cfg.num_head_channels != -1 and ch % cfg.num_head_channels:
            raise ValueError(f"{ch} channels cannot be split into heads of {cfg.num_head_channels}")


def layout(cfg: ADMConfig):
    """(enc, mid, dec, ch_out): lists of dicts with name, torch (torchcfm's module prefix), kind
    ("conv" / "block" / "down"), cin, cout, attention (bool), heads, up (bool, decoder)."""
    _check(cfg)
    levels = len(cfg.channel_mult)
    ch = cfg.model_channels * cfg.channel_mult[0]
    enc = [dict(name="enc.0.conv", torch="input_blocks.0.0", kind="conv", cin=cfg.in_channels, cout=ch)]
    skip_channels = [ch]
    for level, mult in enumerate(cfg.channel_mult):
        r = cfg.resolution >> level
        for _ in range(cfg.num_res_blocks):
            k, cout = len(enc), cfg.model_channels * mult
            enc.append(dict(name=f"enc.{k}", torch=f"input_blocks.{k}", kind="block", cin=ch, cout=cout,
                            attention=r in cfg.attn_resolutions, heads=cfg.heads(cout)))
            ch = cout
            skip_channels.append(ch)
        if level != levels - 1:
            k = len(enc)
            enc.append(dict(name=f"enc.{k}.down", torch=f"input_blocks.{k}.0.op", kind="down", cin=ch, cout=ch))
            skip_channels.append(ch)
    mid = dict(channels=ch, heads=cfg.heads(ch))
    dec = []
    for level in reversed(range(levels)):
        r = cfg.resolution >> level
        for i in range(cfg.num_res_blocks + 1):
            k, cout = len(dec), cfg.model_channels * cfg.channel_mult[level]
            attention = r in cfg.attn_resolutions
            dec.append(dict(name=f"dec.{k}", torch=f"output_blocks.{k}", kind="block", cin=ch + skip_channels.pop(),
                            cout=cout, attention=attention, heads=cfg.heads(cout),
                            up=level > 0 and i == cfg.num_res_blocks,
                            up_torch=f"output_blocks.{k}.{2 if attention else 1}.conv"))
            ch = cout
    assert not skip_channels
    return enc, mid, dec, ch


def init_adm_unet(cfg: ADMConfig, seed: int = 0):
    """Parameters (NumPy float32), zero-initialised output layers as in ADM; move with params.to_device."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    E = cfg.emb_dim
    p = init_time_embedding(rng, "emb", cfg.model_channels, E, cfg.two_time)
    enc, mid, dec, ch = layout(cfg)
    for e in enc:
        n = e["name"]
        if e["kind"] == "block":
            p.update(init_adm_resblock(rng, f"{n}.res", e["cin"], e["cout"], E))
            if e["attention"]:
                p.update(init_adm_attention(rng, f"{n}.attn", e["cout"]))
        else:                                   # stem conv or downsample: a 3x3 conv
            p[f"{n}.weight"] = conv_weight(rng, e["cout"], e["cin"], 3)
            p[f"{n}.bias"] = np.zeros(e["cout"], f32)
    c = mid["channels"]
    p.update(init_adm_resblock(rng, "mid.res0", c, c, E))
    p.update(init_adm_attention(rng, "mid.attn", c))
    p.update(init_adm_resblock(rng, "mid.res1", c, c, E))
    for e in dec:
        n = e["name"]
        p.update(init_adm_resblock(rng, f"{n}.res", e["cin"], e["cout"], E))
        if e["attention"]:
            p.update(init_adm_attention(rng, f"{n}.attn", e["cout"]))
        if e["up"]:
            p[f"{n}.up.weight"] = conv_weight(rng, e["cout"], e["cout"], 3)
            p[f"{n}.up.bias"] = np.zeros(e["cout"], f32)
    p["out.norm.gamma"] = np.ones(ch, f32)
    p["out.norm.beta"] = np.zeros(ch, f32)
    p["out.conv.weight"] = np.zeros((cfg.in_channels, ch, 3, 3), f32)
    p["out.conv.bias"] = np.zeros(cfg.in_channels, f32)
    return p


def _check_inputs(cfg: "ADMConfig", x, t, x_dot=None):
    """The forward's and the tangent pass's argument checks: x (and x_dot) (N, C, R, R); t iff two-time."""
    if x.shape[1:] != cfg.sample_shape or (x_dot is not None and x_dot.shape != x.shape):
        tangent = "" if x_dot is None else f" (tangent {tuple(x_dot.shape)})"
        raise ValueError(f"ADM U-Net built for inputs (N, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution})"
                         f"{'' if x_dot is None else ' and tangents of the same shape'}, got {tuple(x.shape)}{tangent}")
    if (t is not None) != cfg.two_time:
        raise ValueError("a two-time model needs both s and t; a one-time model takes only t"
                         if cfg.two_time else "this is a one-time (teacher) U-Net: call it with one time")


def adm_unet_forward(params, cfg: ADMConfig, x, s, t=None, dropout_seed=None, need_grad: bool = True):
    """u(x, s[, t]). x (N, C, R, R); s, t (N,) -> (u (N, C, R, R), cache or None when need_grad is False).

    dropout_seed: int (the same int, the same masks), or None for evaluation mode.
    """
    _check_inputs(cfg, x, t)
    enc, mid, dec, _ = layout(cfg)
    xp = backend.array_module(x)
    caches = {}
    run = recorder(caches, need_grad)
    G = cfg.norm_groups
    res = dict(groups=G, dropout=cfg.dropout, dropout_seed=dropout_seed, need_grad=need_grad)

    def block(n, h, e):
        """h = [up]([attn](res(h, emb_act))) for one encoder / middle / decoder position."""
        h = run(f"{n}.res", adm_resblock_forward(params, f"{n}.res", h, emb_act, **res))
        if e.get("attention"):
            h = run(f"{n}.attn", adm_attention_forward(params, f"{n}.attn", h, heads=e["heads"], groups=G,
                                                       need_grad=need_grad))
        if e.get("up"):
            h = run(f"{n}.up", upsample_forward(h, params[f"{n}.up.weight"], params[f"{n}.up.bias"]))
        return h

    emb = run("emb", time_embedding_forward(params, "emb", s, t, cfg.model_channels, cfg.time_scale))
    emb_act = run("emb_act", silu_forward(emb))                   # (N, E)
    h = x
    skips = []                                                    # encoder outputs, a stack
    for e in enc:
        n = e["name"]
        if e["kind"] == "conv":
            h = run(n, conv2d_forward(h, params[f"{n}.weight"], params[f"{n}.bias"], 1, 1))
        elif e["kind"] == "down":
            h = run(n, downsample_forward(h, params[f"{n}.weight"], params[f"{n}.bias"]))
        else:
            h = block(n, h, e)
        skips.append(h)
    h = run("mid.res0", adm_resblock_forward(params, "mid.res0", h, emb_act, **res))
    h = run("mid.attn", adm_attention_forward(params, "mid.attn", h, heads=mid["heads"], groups=G,
                                              need_grad=need_grad))
    h = run("mid.res1", adm_resblock_forward(params, "mid.res1", h, emb_act, **res))
    splits = {}                                                   # decoder block -> channels of h before its concat
    for e in dec:
        splits[e["name"]] = h.shape[1]
        h = xp.concatenate([h, skips.pop()], axis=1)              # (N, C_h + C_skip, r, r)
        h = block(e["name"], h, e)
    assert not skips, "every encoder output must be consumed by a decoder block"
    h = run("out.norm", groupnorm_forward(h, params["out.norm.gamma"], params["out.norm.beta"], G, silu=True))
    out = run("out.conv", conv2d_forward(h, params["out.conv.weight"], params["out.conv.bias"], 1, 1))
    if not need_grad:
        return out, None
    return out, dict(layers=caches, splits=splits, cfg=cfg)


def adm_unet_backward(dout, cache):
    """dout (N, C, R, R) -> dx (N, C, R, R), grads (dict like params, full names)."""
    caches, splits, cfg = cache["layers"], cache["splits"], cache["cfg"]
    enc, mid, dec, _ = layout(cfg)
    grads = {}
    back = backprop(caches, grads)
    d_emb_act = 0                              # every ResBlock reads emb_act: its gradients add up

    def res_back(name, dh):
        nonlocal d_emb_act
        dh, de = back(name, dh, adm_resblock_backward, full_names=True)
        d_emb_act = d_emb_act + de
        return dh

    def block_back(n, dh, e):
        """Reverse of h = [up]([attn](res(h, emb_act)))."""
        if e.get("up"):
            dh = back(f"{n}.up", dh, upsample_backward)
        if e.get("attention"):
            dh = back(f"{n}.attn", dh, adm_attention_backward, full_names=True)
        return res_back(f"{n}.res", dh)

    # out = conv(silu(norm(h)))
    dh = back("out.norm", back("out.conv", dout, conv2d_backward), groupnorm_backward)
    d_skips = []                               # gradients of the encoder outputs, in pop order
    for e in reversed(dec):
        dh = block_back(e["name"], dh, e)
        # h = concatenate([h, skip], axis=1): split the gradient at the recorded point
        split = splits[e["name"]]
        d_skips.append(dh[:, split:])
        dh = dh[:, :split]
    # the middle: h = res1(attn(res0(h)))
    dh = res_back("mid.res1", dh)
    dh = back("mid.attn", dh, adm_attention_backward, full_names=True)
    dh = res_back("mid.res0", dh)
    for e in reversed(enc):
        n = e["name"]
        dh = dh + d_skips.pop()                # every encoder output was also a skip
        if e["kind"] == "conv":
            dh = back(n, dh, conv2d_backward)
        elif e["kind"] == "down":
            dh = back(n, dh, downsample_backward)
        else:
            dh = block_back(n, dh, e)
    assert not d_skips, "every skip gradient must be consumed"
    # emb_act = silu(emb); emb = E(s) [+ W_d E(t - s)]   (no gradient w.r.t. the times)
    back("emb", back("emb_act", d_emb_act, silu_backward), time_embedding_backward, full_names=True)
    return dh, grads


# ----------------------------------------------------------------------------- torchcfm's names

_RESBLOCK_TORCH = {"norm0.gamma": "in_layers.0.weight", "norm0.beta": "in_layers.0.bias",
                   "conv0.weight": "in_layers.2.weight", "conv0.bias": "in_layers.2.bias",
                   "affine.weight": "emb_layers.1.weight", "affine.bias": "emb_layers.1.bias",
                   "norm1.gamma": "out_layers.0.weight", "norm1.beta": "out_layers.0.bias",
                   "conv1.weight": "out_layers.3.weight", "conv1.bias": "out_layers.3.bias",
                   "skip.weight": "skip_connection.weight", "skip.bias": "skip_connection.bias"}
_ATTENTION_TORCH = {"norm.gamma": "norm.weight", "norm.beta": "norm.bias", "qkv.weight": "qkv.weight",
                    "qkv.bias": "qkv.bias", "proj.weight": "proj_out.weight", "proj.bias": "proj_out.bias"}
_OTHER_TORCH = {"emb.fc0": "time_embed.0", "emb.fc1": "time_embed.2", "out.norm": "out.0", "out.conv": "out.2"}


def torch_names(cfg: ADMConfig) -> dict:
    """{our parameter name: torchcfm state-dict key} for a one-time (teacher) network.

    torchcfm stores the attention's 1x1 convolutions as Conv1d weights (C', C, 1); ours are
    (C', C): the importer drops the last axis. Norms are weight/bias there, gamma/beta here.
    """
    enc, mid, dec, _ = layout(cfg)
    prefixes = {}                                           # our layer prefix -> (torch prefix, sublayer table)
    for e in enc:
        if e["kind"] == "block":
            prefixes[f"{e['name']}.res"] = (f"{e['torch']}.0", _RESBLOCK_TORCH)
            if e["attention"]:
                prefixes[f"{e['name']}.attn"] = (f"{e['torch']}.1", _ATTENTION_TORCH)
        else:
            prefixes[e["name"]] = (e["torch"], None)
    for i, part in enumerate(("res0", "attn", "res1")):
        prefixes[f"mid.{part}"] = (f"middle_block.{i}", _ATTENTION_TORCH if part == "attn" else _RESBLOCK_TORCH)
    for e in dec:
        prefixes[f"{e['name']}.res"] = (f"{e['torch']}.0", _RESBLOCK_TORCH)
        if e["attention"]:
            prefixes[f"{e['name']}.attn"] = (f"{e['torch']}.1", _ATTENTION_TORCH)
        if e["up"]:
            prefixes[f"{e['name']}.up"] = (e["up_torch"], None)
    out = {}
    for name in init_adm_unet(dataclasses.replace(cfg, two_time=False)):
        if name.rsplit(".", 1)[0] in _OTHER_TORCH:
            layer, key = name.rsplit(".", 1)
            out[name] = f"{_OTHER_TORCH[layer]}.{ {'gamma': 'weight', 'beta': 'bias'}.get(key, key) }"
            continue
        for prefix, (torch_prefix, table) in prefixes.items():
            if name.startswith(prefix + "."):
                local = name[len(prefix) + 1:]
                out[name] = f"{torch_prefix}.{local if table is None else table[local]}"
                break
        else:
            raise AssertionError(f"no torchcfm name for {name}")
    return out


# ----------------------------------------------------------------------------- cost

def forward_flops(cfg: ADMConfig, batch: int) -> int:
    """GEMM FLOPs of one forward pass at `batch` (2 M N K per matrix product: the convolutions,
    linears and the attention's four products; norms and activations are not counted).

        conv k x k, Cin -> Cout, output r x r:   2 B r^2 Cout Cin k^2
        linear In -> Out:                        2 B In Out
        attention, C channels on L = r^2 pixels: qkv 2 B L 3C C, proj 2 B L C C,
                                                 q^T k and P v: 2 B L^2 C each (all heads together)
    A two-time student adds one more evaluation of the time MLP and the W_d product.
    """
    enc, mid, dec, ch = layout(cfg)
    B, E, R = batch, cfg.emb_dim, cfg.resolution
    conv = lambda r, cin, cout, k=3: 2 * B * r * r * cout * cin * k * k
    attention = lambda r, C: 2 * B * r * r * 4 * C * C + 2 * 2 * B * (r * r) ** 2 * C

    def resblock(r, cin, cout):
        return conv(r, cin, cout) + 2 * B * E * cout + conv(r, cout, cout) + (conv(r, cin, cout, 1) if cin != cout else 0)

    time_mlp = 2 * B * (cfg.model_channels * E + E * E)
    total = time_mlp * (2 if cfg.two_time else 1) + (2 * B * E * E if cfg.two_time else 0)
    r = R
    for e in enc:
        if e["kind"] == "conv":
            total += conv(r, e["cin"], e["cout"])
        elif e["kind"] == "down":
            r //= 2
            total += conv(r, e["cin"], e["cout"])              # stride 2: output pixels at r / 2
        else:
            total += resblock(r, e["cin"], e["cout"]) + (attention(r, e["cout"]) if e["attention"] else 0)
    C = mid["channels"]
    total += 2 * resblock(r, C, C) + attention(r, C)
    for e in dec:
        total += resblock(r, e["cin"], e["cout"]) + (attention(r, e["cout"]) if e["attention"] else 0)
        if e["up"]:
            r *= 2
            total += conv(r, e["cout"], e["cout"])
    return total + conv(R, ch, cfg.in_channels)


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------
# u_dot = du/dx x_dot + du/ds s_dot [+ du/dt t_dot], parameters fixed: adm_unet_forward line by
# line with every layer replaced by its jvp. The time embedding's tangent is
#     e_dot = E'(s) s_dot [+ W_d E'(t - s) (t_dot - s_dot)],   emb_act_dot = silu'(e) e_dot,
# a concatenation's tangent is the concatenation of the tangents, and dropout uses the same
# masks as the primal (one dropout_seed). The backward runs adm_unet_backward's steps on
# (cotangent of u, cotangent of u_dot) pairs.

def adm_unet_jvp(params, cfg: ADMConfig, x, s, t, x_dot, s_dot, t_dot=None, dropout_seed=None,
                 need_grad: bool = True):
    """(u, u_dot, cache): u(x, s[, t]) and its tangent along (x_dot (N, C, R, R), s_dot (N,)[, t_dot (N,)]);
    cache None when need_grad is False."""
    from .activations import silu_jvp
    from .adm_attention import adm_attention_jvp
    from .adm_resample import downsample_jvp, upsample_jvp
    from .adm_resblock import adm_resblock_jvp
    from .conv import conv2d_jvp
    from .embedding import time_embedding_jvp
    from .groupnorm import groupnorm_jvp
    from .tape import jvp_recorder
    _check_inputs(cfg, x, t, x_dot)
    enc, mid, dec, _ = layout(cfg)
    xp = backend.array_module(x)
    caches = {}
    run = jvp_recorder(caches, need_grad)
    G = cfg.norm_groups
    res = dict(groups=G, dropout=cfg.dropout, dropout_seed=dropout_seed, need_grad=need_grad)

    def block(n, h, hd, e):
        """(h, h_dot) through [up]([attn](res(h, emb_act)))."""
        h, hd = run(f"{n}.res", adm_resblock_jvp(params, f"{n}.res", h, ea, hd, ead, **res))
        if e.get("attention"):
            h, hd = run(f"{n}.attn", adm_attention_jvp(params, f"{n}.attn", h, hd, heads=e["heads"], groups=G,
                                                       need_grad=need_grad))
        if e.get("up"):
            h, hd = run(f"{n}.up", upsample_jvp(h, params[f"{n}.up.weight"], params[f"{n}.up.bias"], hd))
        return h, hd

    # emb = E(s) [+ W_d E(t - s)],  emb_act = silu(emb)                   (N, E) each, with tangents
    emb, emb_d = run("emb", time_embedding_jvp(params, "emb", s, s_dot, t, t_dot, cfg.model_channels,
                                               cfg.time_scale))
    ea, ead = run("emb_act", silu_jvp(emb, emb_d))
    h, hd = x, x_dot
    skips = []                                                    # (encoder output, its tangent), a stack
    for e in enc:
        n = e["name"]
        if e["kind"] == "conv":
            h, hd = run(n, conv2d_jvp(h, params[f"{n}.weight"], params[f"{n}.bias"], hd, 1, 1))
        elif e["kind"] == "down":
            h, hd = run(n, downsample_jvp(h, params[f"{n}.weight"], params[f"{n}.bias"], hd))
        else:
            h, hd = block(n, h, hd, e)
        skips.append((h, hd))
    h, hd = run("mid.res0", adm_resblock_jvp(params, "mid.res0", h, ea, hd, ead, **res))
    h, hd = run("mid.attn", adm_attention_jvp(params, "mid.attn", h, hd, heads=mid["heads"], groups=G,
                                              need_grad=need_grad))
    h, hd = run("mid.res1", adm_resblock_jvp(params, "mid.res1", h, ea, hd, ead, **res))
    splits = {}
    for e in dec:
        splits[e["name"]] = h.shape[1]
        skip, skip_d = skips.pop()
        # h = concatenate([h, skip], axis=1),  h_dot = concatenate([h_dot, skip_dot], axis=1)
        h, hd = xp.concatenate([h, skip], axis=1), xp.concatenate([hd, skip_d], axis=1)
        h, hd = block(e["name"], h, hd, e)
    assert not skips, "every encoder output must be consumed by a decoder block"
    h, hd = run("out.norm", groupnorm_jvp(h, params["out.norm.gamma"], params["out.norm.beta"], G, hd, silu=True))
    out, out_d = run("out.conv", conv2d_jvp(h, params["out.conv.weight"], params["out.conv.bias"], hd, 1, 1))
    if not need_grad:
        return out, out_d, None
    return out, out_d, dict(layers=caches, splits=splits, cfg=cfg)


def adm_unet_jvp_backward(dout, dout_dot, cache):
    """dout, dout_dot (N, C, R, R) -> (dx, dx_dot, grads): the gradients of a loss L(u, u_dot) with
    dL/du = dout, dL/du_dot = dout_dot w.r.t. x, x_dot and every parameter (full names)."""
    from .activations import silu_jvp_backward
    from .adm_attention import adm_attention_jvp_backward
    from .adm_resample import downsample_jvp_backward, upsample_jvp_backward
    from .adm_resblock import adm_resblock_jvp_backward
    from .conv import conv2d_jvp_backward
    from .embedding import time_embedding_jvp_backward
    from .groupnorm import groupnorm_jvp_backward
    from .tape import jvp_backprop
    caches, splits, cfg = cache["layers"], cache["splits"], cache["cfg"]
    enc, mid, dec, _ = layout(cfg)
    grads = {}
    back = jvp_backprop(caches, grads)
    de, ded = 0, 0                             # every ResBlock reads (emb_act, emb_act_dot): gradients add up

    def res_back(name, dh, dhd):
        nonlocal de, ded
        (dh, de_k), (dhd, ded_k) = back(name, dh, dhd, adm_resblock_jvp_backward, full_names=True)
        de, ded = de + de_k, ded + ded_k
        return dh, dhd

    def block_back(n, dh, dhd, e):
        """Reverse of (h, h_dot) through [up]([attn](res(h, emb_act)))."""
        if e.get("up"):
            dh, dhd = back(f"{n}.up", dh, dhd, upsample_jvp_backward)
        if e.get("attention"):
            dh, dhd = back(f"{n}.attn", dh, dhd, adm_attention_jvp_backward, full_names=True)
        return res_back(f"{n}.res", dh, dhd)

    # out = conv(silu(norm(h)))
    dh, dhd = back("out.norm", *back("out.conv", dout, dout_dot, conv2d_jvp_backward), groupnorm_jvp_backward)
    d_skips = []                               # (gradient, tangent's gradient) of the encoder outputs, pop order
    for e in reversed(dec):
        dh, dhd = block_back(e["name"], dh, dhd, e)
        # h = concatenate([h, skip], axis=1) (and the same for h_dot): split at the recorded point
        split = splits[e["name"]]
        d_skips.append((dh[:, split:], dhd[:, split:]))
        dh, dhd = dh[:, :split], dhd[:, :split]
    # the middle: h = res1(attn(res0(h)))
    dh, dhd = res_back("mid.res1", dh, dhd)
    dh, dhd = back("mid.attn", dh, dhd, adm_attention_jvp_backward, full_names=True)
    dh, dhd = res_back("mid.res0", dh, dhd)
    for e in reversed(enc):
        n = e["name"]
        g, gd = d_skips.pop()                  # every encoder output was also a skip
        dh, dhd = dh + g, dhd + gd
        if e["kind"] == "conv":
            dh, dhd = back(n, dh, dhd, conv2d_jvp_backward)
        elif e["kind"] == "down":
            dh, dhd = back(n, dh, dhd, downsample_jvp_backward)
        else:
            dh, dhd = block_back(n, dh, dhd, e)
    assert not d_skips, "every skip gradient must be consumed"
    # emb_act = silu(emb); emb = E(s) [+ W_d E(t - s)]   (no gradient w.r.t. the times)
    back("emb", *back("emb_act", de, ded, silu_jvp_backward), time_embedding_jvp_backward, full_names=True)
    return dh, dhd, grads
