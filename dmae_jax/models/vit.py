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

Accelerators get their own attention (`model.attention`, see `ATTENTION`): q, k and v
projected separately (no slices of a fused [B, N, 3, H, d] tensor) and the core computed by
`jax.nn.dot_product_attention` (XLA, or cuDNN's fused kernel on GPU) or a Pallas flash kernel
on TPU. With a bfloat16 compute dtype the weight gradients are computed and summed in float32
(`project`), so the data-parallel all-reduce adds float32 partial sums, as the papers' DDP
did; the activations' gradients stay in the compute dtype.
Attribute names mirror timm's so that parameter paths read like the PyTorch state_dict keys
(`blocks/3/attn/qkv/kernel` is `blocks.3.attn.qkv.weight`).

All randomness is explicit: modules never hold an `nnx.Rngs` at call time; calls take
`rng: jax.Array | None` (None = deterministic).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmae_jax import architectures, parallel
from dmae_jax.architectures import ATTENTION, MATMUL_PRECISIONS, NORMALIZATIONS, UPSAMPLE
from dmae_jax.data.resize import resize_bicubic_torch
from dmae_jax.errors import ConfigError
from dmae_jax.models import attention

LAYER_NORM_EPS = 1e-6
# The compute dtypes of `model.dtype` (`architectures.DTYPES` names them).
DTYPES = {name: getattr(jnp, name) for name in architectures.DTYPES}


def resolve_matmul_precision(name: str, dtype) -> str | None:
    """The `jax.default_matmul_precision` value of `model.matmul_precision` = name
    (None: JAX's default, one bfloat16 pass on TPU)."""
    if name not in MATMUL_PRECISIONS:
        raise ConfigError(
            f"model.matmul_precision must be one of {sorted(MATMUL_PRECISIONS)}, got {name!r}")
    if name == "auto":
        return "highest" if jnp.dtype(dtype) == jnp.float32 else None
    return name


def attention_settings(cfg: Mapping[str, Any], platform: str | None) -> dict:
    """The attention and precision arguments of a model built from a resolved config on
    `platform` (None: JAX's default backend)."""
    dtype = DTYPES[cfg["dtype"]]
    impl = attention.resolve(cfg["attention"], platform or jax.default_backend(), dtype)
    logits = attention.resolve_logits(cfg["attention_logits"], impl, dtype)
    return dict(
        attention_impl=impl,
        attention_logits=attention.ATTENTION_LOGITS[logits],
        matmul_precision=resolve_matmul_precision(cfg["matmul_precision"], dtype),
    )


def with_matmul_precision(method):
    """Runs a model method under the model's `matmul_precision` (a `jax.default_matmul_precision`
    value, None for JAX's default): every matmul it traces takes it, its gradient's too."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with jax.default_matmul_precision(self.matmul_precision):
            return method(self, *args, **kwargs)

    return wrapper


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


def broadcast_param(value: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """A float32 parameter (a cls or mask token, a position embedding) repeated to `shape`
    in `dtype`.

    Broadcast before the cast, so that its gradient is summed over the batch in float32 and
    data parallelism all-reduces float32 sums (cast first, the sum would be bfloat16).
    """
    return jnp.broadcast_to(value, shape).astype(dtype)


def project(x: jax.Array, kernel: jax.Array, bias: jax.Array, spec: str, dtype) -> jax.Array:
    """einsum(spec, x, kernel) + bias in `dtype`, the kernel and bias float32 parameters.

    With a lower-precision `dtype` the kernel's and bias's gradients are computed, and summed
    over the batch, in float32 (bfloat16 products, float32 accumulation and output): the
    gradient all-reduce of data parallelism then adds float32 partial sums, as the papers'
    DDP did under fp16 autocast. Autodiff of the plain cast-and-multiply would produce the
    weight gradient as a bfloat16 product and all-reduce it in bfloat16 before converting.
    `spec` names each index once per operand ("mi,io->mo", "bnd,dhk->bnhk"); `bias`
    broadcasts against the output.
    """
    x = x.astype(dtype)
    if jnp.dtype(dtype) == kernel.dtype:
        return jnp.einsum(spec, x, kernel) + bias.astype(dtype)
    precision = jax.config.jax_default_matmul_precision
    return _mixed_project(x, kernel, bias, spec, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _mixed_project(x, kernel, bias, spec, precision):
    return (jnp.einsum(spec, x, kernel.astype(x.dtype), precision=precision)
            + bias.astype(x.dtype))


def _mixed_project_fwd(x, kernel, bias, spec, precision):
    kernel_c = kernel.astype(x.dtype)
    y = jnp.einsum(spec, x, kernel_c, precision=precision) + bias.astype(x.dtype)
    return y, (x, kernel_c, bias)


def _mixed_project_bwd(spec, precision, residuals, dy):
    x, kernel_c, bias = residuals
    operands, out = spec.split("->")
    x_idx, k_idx = operands.split(",")
    dx = jnp.einsum(f"{out},{k_idx}->{x_idx}", dy, kernel_c, precision=precision)
    dkernel = jnp.einsum(f"{x_idx},{out}->{k_idx}", x, dy, precision=precision,
                         preferred_element_type=jnp.float32)
    lead = dy.ndim - bias.ndim
    dbias = jnp.sum(dy, axis=tuple(range(lead)), dtype=jnp.float32)
    broadcast = tuple(i for i, n in enumerate(bias.shape) if n == 1 and dbias.shape[i] != 1)
    dbias = jnp.sum(dbias, axis=broadcast, keepdims=True)
    return dx, dkernel.astype(bias.dtype), dbias.astype(bias.dtype)


_mixed_project.defvjp(_mixed_project_fwd, _mixed_project_bwd)


class Dense(nnx.Linear):
    """nnx.Linear (same `kernel`/`bias` params) computed as one 2-D matmul over flat tokens."""

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., Din] -> [..., Dout] in `self.dtype` (as a [prod(...), Din] @ [Din, Dout])."""
        dtype = self.dtype or x.dtype
        kernel, bias = parallel.gather_weight(self.kernel[...]), parallel.gather_weight(
            self.bias[...])
        if jnp.dtype(dtype) != kernel.dtype:
            y = project(x.reshape(-1, x.shape[-1]), kernel, bias, "mi,io->mo", dtype)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        kernel = kernel.astype(dtype)
        y = x.reshape(-1, x.shape[-1]).astype(dtype) @ kernel
        y = y + bias.astype(dtype)
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
        width = self.proj.kernel.shape[-1]
        kernel = parallel.gather_weight(self.proj.kernel[...])
        bias = parallel.gather_weight(self.proj.bias[...])
        if jnp.dtype(dtype) != kernel.dtype:
            y = project(patches, kernel.reshape(p * p * c, width), bias, "mi,io->mo", dtype)
            return y.reshape(b, (h // p) * (w // p), width)
        kernel = kernel.astype(dtype)
        y = patches @ kernel.reshape(p * p * c, kernel.shape[-1])
        y = y + bias.astype(dtype)
        return y.reshape(b, (h // p) * (w // p), kernel.shape[-1])


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection [q | k | v] (timm `Attention`).

    `impl` is a resolved `model.attention` ("einsum", "xla", "cudnn" or "pallas") and
    `logits_dtype` the dtype the einsum and xla paths store logits and weights in.
    """

    def __init__(self, dim: int, num_heads: int, *, kernel_init, dtype, impl: str = "einsum",
                 logits_dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        if impl not in ATTENTION or impl == "auto":
            raise ValueError(f"impl must be one of {ATTENTION[1:]}, got {impl!r}")
        self.num_heads = num_heads
        self.impl = impl
        self.logits_dtype = logits_dtype
        self.qkv = Dense(dim, 3 * dim, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        self.proj = Dense(dim, dim, kernel_init=kernel_init, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, N, D] -> [B, N, D]."""
        b, n, d = x.shape
        heads = self.num_heads
        head_dim = d // heads
        if self.impl == "einsum":
            # Plain einsum attention on slices of the fused projection: for these short
            # sequences its gradient is cheaper on XLA:CPU than jax.nn.dot_product_attention's.
            qkv = self.qkv(x).reshape(b, n, 3, heads, head_dim)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
            out = attention.einsum_attention(q, k, v, logits_dtype=self.logits_dtype)
            return self.proj(out.reshape(b, n, d))
        # Accelerators: q, k and v each from its own slice of the fused kernel, in the layout
        # the core takes; slicing the [B, N, 3, H, d] projection costs TPUs layout copies.
        dtype = self.qkv.dtype or x.dtype
        layout = attention.layout(self.impl)
        kernel = parallel.gather_weight(self.qkv.kernel[...]).reshape(d, 3, heads, head_dim)
        # Bias [3, H, d], broadcast over the tokens of [B, H, N, d] in the head-major layout.
        bias = parallel.gather_weight(self.qkv.bias[...]).reshape(
            3, heads, *(1,) * (layout == "bhnk"), head_dim)
        q, k, v = (project(x, kernel[:, i], bias[i], f"bnd,dhk->{layout}", dtype)
                   for i in range(3))
        out = attention.core(q, k, v, impl=self.impl, logits_dtype=self.logits_dtype)
        return project(out, parallel.gather_weight(self.proj.kernel[...]).reshape(
            heads, head_dim, d), parallel.gather_weight(self.proj.bias[...]),
            f"{layout},hkd->bnd", dtype)


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
                 drop_path_rate: float = 0.0, kernel_init, dtype, attention_impl: str = "einsum",
                 logits_dtype=jnp.float32, rngs: nnx.Rngs):
        self.drop_path_rate = drop_path_rate
        self.norm1 = layer_norm(dim, dtype, rngs)
        self.attn = Attention(dim, num_heads, kernel_init=kernel_init, dtype=dtype,
                              impl=attention_impl, logits_dtype=logits_dtype, rngs=rngs)
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
                drop_path_rate: float, kernel_init, dtype, attention_impl: str = "einsum",
                logits_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.List:
    """`depth` blocks with drop-path rates rising linearly from 0 to `drop_path_rate` (timm)."""
    rates = np.linspace(0.0, drop_path_rate, depth) if depth > 0 else []
    return nnx.List([
        Block(dim, num_heads, mlp_ratio=mlp_ratio, drop_path_rate=float(rate),
              kernel_init=kernel_init, dtype=dtype, attention_impl=attention_impl,
              logits_dtype=logits_dtype, rngs=rngs)
        for rate in rates
    ])
