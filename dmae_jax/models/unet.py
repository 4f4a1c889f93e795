"""The ADM diffusion UNet (improved-diffusion / guided-diffusion `UNetModel`) in Flax NNX.

One module serves both checkpoints the denoised-smoothing papers use:

* improved-diffusion `cifar10_uncond_50M_500K.pt` (Nichol & Dhariwal 2021), and
* guided-diffusion `256x256_diffusion_uncond.pt` (Dhariwal & Nichol 2021),

plus a tiny preset that trains on CPU. The layer layout (input_blocks / middle_block /
output_blocks, each block a list of layers) mirrors the PyTorch module tree, so converted
weights land at the same indices (see `dmae_jax.diffusion.convert`).

Conventions: images are NHWC in model space ([-1, 1] plus noise); the timestep is the float
the official `GaussianDiffusion` passes to its model (raw t, or t * 1000 / T when the
diffusion rescales timesteps). Normalisation and softmax run in float32 whatever the
compute dtype, as the official fp16 models do; parameters are always float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dmae_jax import exports
from dmae_jax.architectures import NUM_GROUPS, UNetConfig
from dmae_jax.models.parts import ModelParts

GROUPNORM_EPS = 1e-5  # torch.nn.GroupNorm's default.


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B, dim] of float timesteps [B]: cos half first, then sin."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _conv(
    cin: int, cout: int, k: int, *, dtype, rngs: nnx.Rngs, stride: int = 1, zero: bool = False
) -> nnx.Conv:
    pad = (k - 1) // 2
    extra = {"kernel_init": nnx.initializers.zeros} if zero else {}
    return nnx.Conv(
        cin, cout, (k, k), (stride, stride), padding=((pad, pad), (pad, pad)),
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs, **extra,
    )


def _linear(cin: int, cout: int, *, dtype, rngs: nnx.Rngs, zero: bool = False) -> nnx.Linear:
    extra = {"kernel_init": nnx.initializers.zeros} if zero else {}
    return nnx.Linear(cin, cout, dtype=dtype, param_dtype=jnp.float32, rngs=rngs, **extra)


def _upsample_nearest(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool2(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class GroupNorm32(nnx.Module):
    """GroupNorm with 32 groups, always computed in float32, output cast to `dtype`."""

    def __init__(self, channels: int, *, dtype=jnp.float32):
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, ..., C] -> [B, ..., C]; statistics per sample and group over all other axes."""
        c = x.shape[-1]
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], NUM_GROUPS, c // NUM_GROUPS)
        axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
        mean = xg.mean(axis=axes, keepdims=True)
        var = jnp.square(xg - mean).mean(axis=axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + GROUPNORM_EPS)).reshape(x.shape)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def _dropout(h: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return h
    keep = jax.random.bernoulli(rng, 1.0 - rate, h.shape)
    return jnp.where(keep, h / (1.0 - rate), 0.0).astype(h.dtype)


class ResBlock(nnx.Module):
    """ADM residual block conditioned on the timestep embedding, optionally up/downsampling."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        *,
        dropout: float,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dropout = dropout
        self.use_scale_shift_norm = use_scale_shift_norm
        self.up, self.down = up, down
        self.dtype = dtype
        self.in_norm = GroupNorm32(channels, dtype=dtype)
        self.in_conv = _conv(channels, out_channels, 3, dtype=dtype, rngs=rngs)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        # Float32 like the official fp16 models, which convert only convolutions to half.
        self.emb_proj = _linear(emb_channels, emb_out, dtype=jnp.float32, rngs=rngs)
        self.out_norm = GroupNorm32(out_channels, dtype=dtype)
        self.out_conv = _conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs, zero=True)
        # A 1x1 conv only when the width changes (the official use_conv=False skip).
        self.skip = (
            _conv(channels, out_channels, 1, dtype=dtype, rngs=rngs)
            if out_channels != channels
            else None
        )

    def _resample(self, x: jax.Array) -> jax.Array:
        if self.up:
            return _upsample_nearest(x)
        if self.down:
            return _avg_pool2(x)
        return x

    def __call__(self, x: jax.Array, emb: jax.Array, rng: jax.Array | None) -> jax.Array:
        """x [B, H, W, C], emb [B, E] -> [B, H', W', C_out]."""
        h = nnx.silu(self.in_norm(x))
        # Up/down blocks resample after the activation and before the conv (guided-diffusion).
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        emb_out = self.emb_proj(nnx.silu(emb)).astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out)
        h = self.out_conv(_dropout(nnx.silu(h), self.dropout, rng))
        return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nnx.Module):
    """Multi-head self-attention over all spatial positions, residual, zero-initialised out."""

    def __init__(
        self, channels: int, num_heads: int, *, order: str, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.num_heads = num_heads
        self.order = order
        self.norm = GroupNorm32(channels, dtype=dtype)
        self.qkv = _linear(channels, 3 * channels, dtype=dtype, rngs=rngs)
        self.proj_out = _linear(channels, channels, dtype=dtype, rngs=rngs, zero=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        b, hh, ww, c = x.shape
        ch = c // self.num_heads
        qkv = self.qkv(self.norm(x).reshape(b, hh * ww, c))
        # The channel layout of qkv decides checkpoint parity: legacy = [head, (q,k,v), ch],
        # new = [(q,k,v), head, ch].
        if self.order == "legacy":
            qkv = qkv.reshape(b, hh * ww, self.num_heads, 3, ch)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        else:
            qkv = qkv.reshape(b, hh * ww, 3, self.num_heads, ch)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # Scaling q and k by ch^-1/4 each (instead of the logits by ch^-1/2) is what ADM does
        # for fp16 stability; the softmax itself is in float32.
        scale = ch**-0.25
        logits = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        a = jnp.einsum("bhts,bshc->bthc", weights, v).reshape(b, hh * ww, c)
        return x + self.proj_out(a).reshape(b, hh, ww, c)


class Downsample(nnx.Module):
    """Stride-2 3x3 conv (conv_resample=True, the only setting the presets use)."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.op = _conv(channels, channels, 3, stride=2, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H/2, W/2, C]."""
        return self.op(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, 2H, 2W, C]."""
        return self.conv(_upsample_nearest(x))


class UNet(nnx.Module):
    """ADM UNet: eps (and optionally variance) prediction from a noisy image and timestep."""

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        self.dtype = dtype
        mc = config.model_channels
        emb_dim = 4 * mc
        # The timestep MLP and the output head stay float32, as in the official fp16 models
        # (only input/middle/output blocks are converted to half precision).
        self.time_embed_in = _linear(mc, emb_dim, dtype=jnp.float32, rngs=rngs)
        self.time_embed_out = _linear(emb_dim, emb_dim, dtype=jnp.float32, rngs=rngs)

        def heads(ch: int) -> int:
            if config.num_head_channels is not None:
                return ch // config.num_head_channels
            return config.num_heads

        def res(cin: int, cout: int, **kw) -> ResBlock:
            return ResBlock(
                cin, emb_dim, cout, dropout=config.dropout,
                use_scale_shift_norm=config.use_scale_shift_norm, dtype=dtype, rngs=rngs, **kw,
            )

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(
                ch, heads(ch), order=config.attention_order, dtype=dtype, rngs=rngs
            )

        ch = int(config.channel_mult[0] * mc)
        input_blocks = [[_conv(config.in_channels, ch, 3, dtype=dtype, rngs=rngs)]]
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in config.attention_ds:
                    layers.append(attn(ch))
                input_blocks.append(layers)
                skip_chans.append(ch)
            if level != len(config.channel_mult) - 1:
                if config.resblock_updown:
                    input_blocks.append([res(ch, ch, down=True)])
                else:
                    input_blocks.append([Downsample(ch, dtype=dtype, rngs=rngs)])
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = nnx.List([res(ch, ch), attn(ch), res(ch, ch)])

        output_blocks = []
        for level, mult in list(enumerate(config.channel_mult))[::-1]:
            for i in range(config.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mult * mc))]
                ch = int(mult * mc)
                if ds in config.attention_ds:
                    layers.append(attn(ch))
                if level and i == config.num_res_blocks:
                    if config.resblock_updown:
                        layers.append(res(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, dtype=dtype, rngs=rngs))
                    ds //= 2
                output_blocks.append(layers)

        self.input_blocks = nnx.List([nnx.List(b) for b in input_blocks])
        self.output_blocks = nnx.List([nnx.List(b) for b in output_blocks])
        self.out_norm = GroupNorm32(ch, dtype=jnp.float32)
        self.out_conv = _conv(
            ch, config.out_channels, 3, dtype=jnp.float32, rngs=rngs, zero=True
        )

    def __call__(self, x: jax.Array, t: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """x [B, H, W, C] in model space, t [B] float timesteps -> [B, H, W, C_out].

        rng: a PRNG key for dropout (training); None runs deterministically (no dropout).
        """
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"x must be [B, H, W, {cfg.in_channels}], got shape {tuple(x.shape)}"
            )
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"H and W must be multiples of {factor} for {len(cfg.channel_mult)} levels, "
                f"got {x.shape[1]}x{x.shape[2]}"
            )
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        emb = timestep_embedding(t, cfg.model_channels)
        emb = self.time_embed_out(nnx.silu(self.time_embed_in(emb)))

        n_res = 0

        def run(layers: nnx.List, h: jax.Array) -> jax.Array:
            nonlocal n_res
            for layer in layers:
                if isinstance(layer, ResBlock):
                    key = None if rng is None else jax.random.fold_in(rng, n_res)
                    n_res += 1
                    h = layer(h, emb, key)
                else:
                    h = layer(h)
            return h

        h = x.astype(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = run(block, h)
            skips.append(h)
        h = run(self.middle_block, h)
        for block in self.output_blocks:
            h = run(block, jnp.concatenate([h, skips.pop()], axis=-1))
        h = nnx.silu(self.out_norm(h.astype(jnp.float32)))
        return self.out_conv(h)


def export_meta(config: UNetConfig, preset: str | None, **extra: Any) -> dict[str, Any]:
    """The meta.json of a UNet export (the importer's and the trainers'): kind, preset, config."""
    return {"kind": "unet", "preset": preset, "config": config.to_dict(), **extra}


def from_export(directory: str, *, field: str,
                dtype=jnp.float32) -> tuple[ModelParts, UNetConfig, dict]:
    """The UNet of an export (kind "unet": trained or converted) with its weights.

    Returns (parts, its UNetConfig, the export's meta). Built abstractly (nothing is
    initialised): every parameter comes from the export, checked entry by entry. `field`
    names the config field in errors.
    """
    params, meta = exports.load_checked(directory, kind="unet", field=field)
    config = UNetConfig.from_dict(meta["config"])
    parts = ModelParts.split(nnx.eval_shape(lambda: UNet(config, dtype=dtype, rngs=nnx.Rngs(0))))
    return parts.with_params(params, where=f"{field} = {directory!r}"), config, meta
