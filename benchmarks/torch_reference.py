"""The same networks in PyTorch, built from ttfm_np configs, for comparisons
only (benchmarks and optional tests). ttfm_np itself never imports torch.

    net = build_torch_model(cfg)            # UNetConfig or MLPConfig
    load_params(net, params)                # our dict name -> array, by name
    u = net(x, s) / net(x, s, t)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ttfm_np.resblock import SKIP_SCALE, attention_heads, norm_groups
from ttfm_np.unet import layout


def sinusoidal(t, dim, scale):
    half = dim // 2
    # on t's device: CPU frequencies times CUDA times would raise (and did, in gpu_check.py)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = (scale * t)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimeEmbedding(nn.Module):
    def __init__(self, feat, dim, two_time, scale):
        super().__init__()
        self.feat, self.scale = feat, scale
        self.fc0, self.fc1 = nn.Linear(feat, dim), nn.Linear(dim, dim)
        self.delta = nn.Linear(dim, dim, bias=False) if two_time else None

    def E(self, t):
        return self.fc1(F.silu(self.fc0(sinusoidal(t, self.feat, self.scale))))

    def forward(self, s, t=None):
        e = self.E(s)
        return e if t is None else e + self.delta(self.E(t - s))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb, attention, head_channels, dropout):
        super().__init__()
        self.norm0, self.conv0 = nn.GroupNorm(norm_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, cout)
        self.norm1, self.conv1 = nn.GroupNorm(norm_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.attention = attention
        if attention:
            self.heads = attention_heads(cout, head_channels)
            self.attn_norm = nn.GroupNorm(norm_groups(cout), cout)
            self.qkv, self.proj = nn.Conv2d(cout, 3 * cout, 1), nn.Conv2d(cout, cout, 1)

    def forward(self, x, emb_act):
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.affine(emb_act)[:, :, None, None]
        h = self.conv1(self.drop(F.silu(self.norm1(h))))
        y = (h + (self.skip(x) if self.skip is not None else x)) * SKIP_SCALE
        if self.attention:
            N, C, H, W = y.shape
            d = C // self.heads
            q, k, v = self.qkv(self.attn_norm(y)).reshape(N, 3, self.heads, d, H * W).unbind(1)
            o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            a = self.proj(o.transpose(-1, -2).reshape(N, C, H, W))
            y = (y + a) * SKIP_SCALE
        return y


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.emb = TimeEmbedding(cfg.model_channels, cfg.emb_dim, cfg.two_time, cfg.time_scale)
        enc, dec, cout = layout(cfg)
        self.enc_layout, self.dec_layout = enc, dec
        self.layers = nn.ModuleDict()
        for e in enc + dec:
            key = e["name"].replace(".", "__")
            if e["kind"] == "block":
                self.layers[key] = ResBlock(e["cin"], e["cout"], cfg.emb_dim, e["attention"], cfg.head_channels,
                                            cfg.dropout)
            else:
                self.layers[key] = nn.Conv2d(e["cin"], e["cout"], 3, stride=2 if e["kind"] == "down" else 1, padding=1)
        self.out_norm = nn.GroupNorm(norm_groups(cout), cout)
        self.out_conv = nn.Conv2d(cout, cfg.in_channels, 3, padding=1)

    def forward(self, x, s, t=None):
        emb_act = F.silu(self.emb(s, t))
        h, skips = x, []
        for e in self.enc_layout:
            layer = self.layers[e["name"].replace(".", "__")]
            h = layer(h, emb_act) if e["kind"] == "block" else layer(h)
            skips.append(h)
        for e in self.dec_layout:
            layer = self.layers[e["name"].replace(".", "__")]
            if e["kind"] == "up":
                h = layer(F.interpolate(h, scale_factor=2, mode="nearest"))
                continue
            if e["skip"]:
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, emb_act)
        return self.out_conv(F.silu(self.out_norm(h)))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.emb = TimeEmbedding(cfg.emb_features, cfg.emb_dim, cfg.two_time, cfg.time_scale)
        self.inp = nn.Linear(cfg.dim, cfg.hidden)
        self.in_emb = nn.Linear(cfg.emb_dim, cfg.hidden, bias=False)
        self.hidden = nn.ModuleList([nn.Linear(cfg.hidden, cfg.hidden) for _ in range(1, cfg.depth)])
        self.out = nn.Linear(cfg.hidden, cfg.dim)

    def forward(self, x, s, t=None):
        h = F.silu(self.inp(x) + self.in_emb(F.silu(self.emb(s, t))))
        for layer in self.hidden:
            h = F.silu(layer(h))
        return self.out(h)


def build_torch_model(cfg):
    return UNet(cfg) if cfg.kind == "unet" else MLP(cfg)


def torch_name(our_name: str, cfg) -> str:
    """Map a ttfm_np parameter name to the torch module's state-dict name."""
    n = our_name
    if cfg.kind == "mlp":
        n = n.replace("in.", "inp.", 1) if n.startswith("in.") else n
        if n.startswith("hidden"):
            k, rest = n[len("hidden"):].split(".", 1)
            n = f"hidden.{int(k) - 1}.{rest}"
        return n
    for prefix in ("enc.", "dec."):
        if n.startswith(prefix):
            block, rest = n[len(prefix):].split(".", 1)
            n = f"layers.{prefix[:-1]}__{block}.{rest}"
    n = n.replace(".attn.qkv.", ".qkv.").replace(".attn.proj.", ".proj.").replace("out.norm.", "out_norm.")
    n = n.replace("out.conv.", "out_conv.")
    return n.replace(".gamma", ".weight").replace(".beta", ".bias")


def load_params(net, params):
    """Copy our parameters into the torch module (1x1 attention weights get their H, W axes)."""
    sd = net.state_dict()
    with torch.no_grad():
        for k, v in params.items():
            name = torch_name(k, net.cfg)
            if name not in sd:
                raise KeyError(f"{k} -> {name} not in the torch model")
            sd[name].copy_(torch.as_tensor(v).reshape(sd[name].shape))
    if len(sd) != len(params):
        raise KeyError(f"torch model has {len(sd)} tensors, ours {len(params)}")
    return net
