"""A from-scratch PyTorch ADM UNet with the official state_dict key names (test reference).

Written here from the published architecture (Nichol & Dhariwal 2021; Dhariwal & Nichol
2021) to produce state_dicts shaped like `cifar10_uncond_50M_500K.pt` (improved-diffusion)
and `256x256_diffusion_uncond.pt` (guided-diffusion), and outputs our Flax UNet must match.
It works on NCHW tensors, as the originals do.

Key layout: time_embed.{0,2}, input_blocks.i.j, middle_block.j, output_blocks.i.j, out.{0,2};
residual blocks hold in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection;
attention blocks hold norm, qkv and proj_out as 1x1 Conv1d; Downsample holds op,
Upsample holds conv.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _norm(channels: int) -> nn.GroupNorm:
    return _GroupNorm32(32, channels)


class _GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] float timesteps -> [N, dim]: cos(t w_i) then sin(t w_i), w_i = 10000^(-i/half)."""
    half = dim // 2
    w = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    arg = t.float()[:, None] * w[None, :]
    out = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    return F.pad(out, (0, 1)) if dim % 2 else out


class ResBlock(nn.Module):
    def __init__(self, cin, emb, cout, dropout, scale_shift, up=False, down=False):
        super().__init__()
        self.scale_shift, self.up, self.down = scale_shift, up, down
        self.in_layers = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(
            _norm(cout), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, emb):
        norm, act, conv = self.in_layers
        h = conv(self._resample(act(norm(x))))
        x = self._resample(x)
        e = self.emb_layers(emb)[:, :, None, None]
        norm, act, drop, conv = self.out_layers
        if self.scale_shift:
            gamma, beta = e.chunk(2, dim=1)
            h = norm(h) * (1 + gamma) + beta
        else:
            h = norm(h + e)
        return self.skip_connection(x) + conv(drop(act(h)))


class AttentionBlock(nn.Module):
    def __init__(self, channels, heads, legacy):
        super().__init__()
        self.heads, self.legacy = heads, legacy
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        n, c, hh, ww = x.shape
        flat = x.reshape(n, c, hh * ww)
        qkv = self.qkv(self.norm(flat))  # [N, 3C, T]
        d = c // self.heads
        if self.legacy:  # channels grouped as [head][q|k|v][d]
            q, k, v = qkv.reshape(n, self.heads, 3, d, -1).unbind(2)
        else:  # channels grouped as [q|k|v][head][d]
            q, k, v = qkv.reshape(n, 3, self.heads, d, -1).unbind(1)
        attn = torch.softmax(torch.einsum("nhdt,nhds->nhts", q, k) / math.sqrt(d), dim=-1)
        out = torch.einsum("nhts,nhds->nhdt", attn, v).reshape(n, c, -1)
        return (flat + self.proj_out(out)).reshape(n, c, hh, ww)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Block(nn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class TorchUNet(nn.Module):
    """ADM UNet. heads_channels=None -> `heads` heads everywhere (improved-diffusion)."""

    def __init__(
        self,
        *,
        in_channels,
        model_channels,
        num_res_blocks,
        channel_mult,
        attention_ds,
        heads=1,
        heads_channels=None,
        dropout=0.0,
        scale_shift=True,
        updown=False,
        learn_sigma=False,
        legacy_attention=True,
    ):
        super().__init__()
        mc, emb = model_channels, 4 * model_channels
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))

        def res(cin, cout, **kw):
            return ResBlock(cin, emb, cout, dropout, scale_shift, **kw)

        def attn(c):
            n_heads = c // heads_channels if heads_channels else heads
            return AttentionBlock(c, n_heads, legacy_attention)

        c = int(channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([_Block([nn.Conv2d(in_channels, c, 3, padding=1)])])
        stack, ds = [c], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = [res(c, int(mult * mc))]
                c = int(mult * mc)
                if ds in attention_ds:
                    block.append(attn(c))
                self.input_blocks.append(_Block(block))
                stack.append(c)
            if level < len(channel_mult) - 1:
                down = res(c, c, down=True) if updown else Downsample(c)
                self.input_blocks.append(_Block([down]))
                stack.append(c)
                ds *= 2
        self.middle_block = _Block([res(c, c), attn(c), res(c, c)])
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            mult = channel_mult[level]
            for i in range(num_res_blocks + 1):
                block = [res(c + stack.pop(), int(mult * mc))]
                c = int(mult * mc)
                if ds in attention_ds:
                    block.append(attn(c))
                if level > 0 and i == num_res_blocks:
                    block.append(res(c, c, up=True) if updown else Upsample(c))
                    ds //= 2
                self.output_blocks.append(_Block(block))
        out_ch = in_channels * (2 if learn_sigma else 1)
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, out_ch, 3, padding=1))

    def forward(self, x, t):
        """x [N, C, H, W], t [N] float -> [N, C_out, H, W]."""
        emb = self.time_embed(sinusoidal(t, self.model_channels))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
