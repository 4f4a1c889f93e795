"""ViT building blocks shared by the DMAE pretraining model and the classifier.

The computation is the one of timm 0.5.4 as used by the official DMAE code: pre-norm blocks
with a fused qkv projection (with bias), exact (erf) GELU, LayerNorm eps 1e-6, per-sample
drop path, a patch-embedding convolution and the MAE 2-D sin-cos position embedding.

Written for XLA:CPU speed (measured on the digits configs): dense layers
run as 2-D [B*N, D] matmuls, LayerNorm and attention are spelled out with plain jnp ops. With
3-D `dot_general`s and Flax's LayerNorm, XLA:CPU transposed the weight-gradient operands in
copy fusions that recomputed the whole chain of residual-stream cotangents of the later
blocks (a backward pass ~7-9x the forward instead of ~3-4x). Parameter names and shapes are
unchanged (`Dense`/`LayerNorm` subclass Flax's modules; the patch embedding keeps its conv
kernel [p, p, C, D]).
Attribute names mirror timm's so that parameter paths read like the PyTorch state_dict keys
(`blocks/3/attn/qkv/kernel` is `blocks.3.attn.qkv.weight`).

All randomness is explicit: modules never hold an `nnx.Rngs` at call time; calls take
`rng: jax.Array | None` (None = deterministic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmae_jax import defaults
from dmae_jax.data.resize import resize_bicubic_torch
from dmae_jax.errors import ConfigError

VARIANTS: dict[str, dict] = {
    "mu": {"width": 128, "depth": 4, "num_heads": 4},
    "tiny": {"width": 192, "depth": 12, "num_heads": 3},
    "small": {"width": 384, "depth": 12, "num_heads": 6},
    "base": {"width": 768, "depth": 12, "num_heads": 12},
    "large": {"width": 1024, "depth": 24, "num_heads": 16},
    "huge": {"width": 1280, "depth": 32, "num_heads": 16},
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
}

# How inputs whose size differs from img_size are resized inside the model (CIFAR-10 32 -> 224
# after the noise): the value is the `antialias` flag of PyTorch's bicubic F.interpolate.
# "bicubic": A = -0.75, no antialiasing, what torchvision < 0.17 `Resize` on tensors and the
# papers' code computed; "bicubic_antialias": torchvision >= 0.17 `Resize` (antialias=True),
# a normalised A = -0.5 kernel (a different map even when upsampling).
UPSAMPLE = {"bicubic": False, "bicubic_antialias": True}

LAYER_NORM_EPS = 1e-6


def get_variant(name: str) -> dict:
    """Returns {width, depth, num_heads} of a named ViT variant."""
    if name not in VARIANTS:
        raise ConfigError(
            f"model.variant must be one of {sorted(VARIANTS)}, got {name!r}"
        )
    return dict(VARIANTS[name])


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The fields that say which architecture a model is; every other field of a `model` config
# has its default in `dmae_jax.defaults.model`.
REQUIRED_FIELDS = ("variant", "img_size", "patch_size")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
    return int(value)


def resolve_model_config(model_cfg: Mapping[str, Any] | Any) -> dict:
    """Validated, complete model config: a plain dict with every field (variant resolved).

    `model_cfg` (a Mapping or ConfigDict) needs variant, img_size and patch_size; absent or
    None fields take `dmae_jax.defaults.model`'s values, and width / depth / num_heads the
    variant's.
    """
    for name in REQUIRED_FIELDS:
        if model_cfg.get(name, None) is None:
            raise ConfigError(f"model.{name} is required")
    cfg = dict(defaults.model(model_cfg.get("variant")).to_dict(),
               width=None, depth=None, num_heads=None)
    for name in cfg:
        value = model_cfg.get(name, None)
        if value is not None:
            cfg[name] = value
    arch = get_variant(cfg["variant"])
    for name in ("width", "depth", "num_heads"):
        cfg[name] = _positive_int(cfg[name] if cfg[name] is not None else arch[name], name)
    for name in ("img_size", "patch_size", "decoder_width", "decoder_depth", "decoder_heads"):
        cfg[name] = _positive_int(cfg[name], name)
    if cfg["img_size"] % cfg["patch_size"] != 0:
        raise ConfigError(
            f"model.img_size must be divisible by model.patch_size ({cfg['patch_size']}), "
            f"got {cfg['img_size']}"
        )
    for width, heads in (("width", "num_heads"), ("decoder_width", "decoder_heads")):
        if cfg[width] % cfg[heads] != 0 or cfg[width] % 4 != 0:
            raise ConfigError(
                f"model.{width} must be divisible by 4 (sin-cos embedding) and by "
                f"model.{heads} ({cfg[heads]}), got {cfg[width]}"
            )
    if cfg["normalization"] not in NORMALIZATIONS:
        raise ConfigError(
            f"model.normalization must be one of {sorted(NORMALIZATIONS)}, "
            f"got {cfg['normalization']!r}"
        )
    if cfg["dtype"] not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg['dtype']!r}")
    if cfg["upsample"] not in UPSAMPLE:
        raise ConfigError(
            f"model.upsample must be one of {sorted(UPSAMPLE)}, got {cfg['upsample']!r}"
        )
    rate = cfg["drop_path_rate"]
    if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {rate!r}")
    cfg["drop_path_rate"] = float(rate)
    for name in ("norm_pix_loss", "global_pool", "remat"):
        cfg[name] = bool(cfg[name])
    return cfg


def get_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Returns the per-channel (mean, std) of a named input normalisation."""
    if name not in NORMALIZATIONS:
        raise ConfigError(
            f"model.normalization must be one of {sorted(NORMALIZATIONS)}, got {name!r}"
        )
    return NORMALIZATIONS[name]


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Maps [0, 1] pixels [B, H, W, C] to (x - mean) / std in float32."""
    images = images.astype(jnp.float32)
    return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def resize_to(images: jax.Array, img_size: int, upsample: str = "bicubic") -> jax.Array:
    """Resizes [B, H, W, C] to [B, img_size, img_size, C] with PyTorch bicubic (no-op if equal);
    `upsample` is a key of UPSAMPLE (antialiased or not)."""
    if images.shape[1:3] == (img_size, img_size):
        return images
    if upsample not in UPSAMPLE:
        raise ValueError(f"upsample must be one of {sorted(UPSAMPLE)}, got {upsample!r}")
    return resize_bicubic_torch(images, (img_size, img_size), antialias=UPSAMPLE[upsample])


def sincos_1d_posemb(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim] = [sin(pos * omega), cos(pos * omega)], omega_k = 1e4^(-2k/dim)."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_posemb(grid_size: int, dim: int, cls_token: bool = True) -> np.ndarray:
    """Fixed MAE 2-D sin-cos embedding [1 + g*g, dim] (or [g*g, dim]), float32.

    Tokens are row-major (row outer, column inner). As in the official code
    (`np.meshgrid(grid_w, grid_h)`), the first dim/2 channels encode the *column* index and
    the last dim/2 the row index. The cls row is all zeros.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb = np.concatenate(
        [sincos_1d_posemb(dim // 2, cols), sincos_1d_posemb(dim // 2, rows)], axis=1
    )
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb.astype(np.float32)


def interpolate_pos_embed(pos_embed: jax.Array, grid_size: int) -> jax.Array:
    """[1, 1 + g*g, D] -> [1, 1 + G*G, D]: bicubic on the grid, cls row kept (MAE's rule)."""
    num_tokens = pos_embed.shape[1] - 1
    old = int(round(num_tokens**0.5))
    if old * old != num_tokens:
        raise ValueError(f"pos_embed has {num_tokens} patch tokens, not a square grid")
    if old == grid_size:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, old, old, dim).astype(jnp.float32)
    grid = resize_bicubic_torch(grid, (grid_size, grid_size))
    return jnp.concatenate(
        [pos_embed[:, :1].astype(jnp.float32), grid.reshape(1, grid_size * grid_size, dim)],
        axis=1,
    )


class FixedEmbedding(nnx.Variable):
    """A fixed (non-trainable) position embedding: excluded from `nnx.state(model, nnx.Param)`."""


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm (same `scale`/`bias` params) with float32 two-pass statistics."""

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D] in `self.dtype`: (x - mean) / sqrt(var + eps) * scale + bias."""
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


def layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> LayerNorm:
    """LayerNorm(eps 1e-6) with float32 two-pass statistics and output in `dtype`."""
    return LayerNorm(
        dim, epsilon=LAYER_NORM_EPS, dtype=dtype, use_fast_variance=False, rngs=rngs
    )


class Dense(nnx.Linear):
    """nnx.Linear (same `kernel`/`bias` params) computed as one 2-D matmul over flat tokens."""

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., Din] -> [..., Dout] in `self.dtype` (as a [prod(...), Din] @ [Din, Dout])."""
        dtype = self.dtype or x.dtype
        kernel = self.kernel[...].astype(dtype)
        y = x.reshape(-1, x.shape[-1]).astype(dtype) @ kernel
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y.reshape(*x.shape[:-1], kernel.shape[-1])


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), written as PyTorch's 0.5 * x * (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1.0 / np.sqrt(2.0), x.dtype)))


def torch_default_uniform(fan_in: int):
    """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights and bias)."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Stochastic depth: zeroes whole samples of the residual branch [B, ...] with prob `rate`."""
    if rng is None or rate == 0.0:
        return x
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(rng, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * (keep.astype(x.dtype) / jnp.asarray(keep_prob, x.dtype))


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> tokens [B, L, D] (timm `PatchEmbed`, row-major)."""

    def __init__(self, patch_size: int, in_chans: int, width: int, *, kernel_init, bias_init,
                 dtype, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = nnx.Conv(
            in_chans, width, kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size), padding="VALID", kernel_init=kernel_init,
            bias_init=bias_init, dtype=dtype, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, (H/p)*(W/p), D]."""
        # The strided conv as patchify + one matmul with the [p*p*C, D] view of the kernel
        # (its (kh, kw, c) order is the patch's (p, q, c) order): the same sums, and a faster
        # gradient than XLA:CPU's strided convolution.
        b, h, w, c = x.shape
        p = self.patch_size
        dtype = self.proj.dtype or x.dtype
        patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b * (h // p) * (w // p), p * p * c).astype(dtype)
        kernel = self.proj.kernel[...].astype(dtype)
        y = patches @ kernel.reshape(p * p * c, kernel.shape[-1])
        y = y + self.proj.bias[...].astype(dtype)
        return y.reshape(b, (h // p) * (w // p), kernel.shape[-1])


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection [q | k | v] (timm `Attention`)."""

    def __init__(self, dim: int, num_heads: int, *, kernel_init, dtype, rngs: nnx.Rngs):
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = Dense(dim, 3 * dim, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        self.proj = Dense(dim, dim, kernel_init=kernel_init, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, N, D] -> [B, N, D]; logits and softmax in float32."""
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
        # Plain einsum attention: for these short sequences its gradient is cheaper on
        # XLA:CPU than jax.nn.dot_product_attention's.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * np.float32(head_dim**-0.5), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2 (timm `Mlp`, no dropout)."""

    def __init__(self, dim: int, hidden: int, *, kernel_init, dtype, rngs: nnx.Rngs):
        self.fc1 = Dense(dim, hidden, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, dim, kernel_init=kernel_init, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, N, D] -> [B, N, D]."""
        return self.fc2(gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block: x + dp(attn(norm1(x))), then x + dp(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, kernel_init, dtype, rngs: nnx.Rngs):
        self.drop_path_rate = drop_path_rate
        self.norm1 = layer_norm(dim, dtype, rngs)
        self.attn = Attention(dim, num_heads, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, dtype, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), kernel_init=kernel_init, dtype=dtype,
                       rngs=rngs)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """[B, N, D] -> [B, N, D]; drop path is active only when `rng` is given."""
        if rng is None or self.drop_path_rate == 0.0:
            rng_attn = rng_mlp = None
        else:
            rng_attn, rng_mlp = jax.random.split(rng)
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, rng_attn)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, rng_mlp)


def _block_forward(block: Block, x: jax.Array, rng: jax.Array | None) -> jax.Array:
    return block(x, rng)


def apply_blocks(blocks: Sequence[Block], x: jax.Array, rng: jax.Array | None,
                 remat: bool) -> jax.Array:
    """Runs the blocks in order, one independent drop-path key each; optionally rematerialised."""
    rngs = [None] * len(blocks) if rng is None else list(jax.random.split(rng, len(blocks)))
    forward = nnx.remat(_block_forward) if remat else _block_forward
    for block, block_rng in zip(blocks, rngs, strict=True):
        x = forward(block, x, block_rng)
    return x


def make_blocks(depth: int, dim: int, num_heads: int, *, mlp_ratio: float,
                drop_path_rate: float, kernel_init, dtype, rngs: nnx.Rngs) -> nnx.List:
    """`depth` blocks with drop-path rates rising linearly from 0 to `drop_path_rate` (timm)."""
    rates = np.linspace(0.0, drop_path_rate, depth) if depth > 0 else []
    return nnx.List([
        Block(dim, num_heads, mlp_ratio=mlp_ratio, drop_path_rate=float(rate),
              kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        for rate in rates
    ])
