"""The attention core softmax(q k^T / sqrt(d)) v, one function per implementation.

`model.attention` picks the implementation (`ATTENTION`); `vit.Attention` projects q, k and v
in the layout each one wants and calls `core`. Every implementation computes the same
function; they differ in what they store in memory between the two matmuls:

  einsum / xla  the logits and softmax weights [B, H, N, N] (float32, or bfloat16 with
                `model.attention_logits`); XLA fuses the softmax between two matmuls,
  cudnn         nothing: cuDNN's fused flash kernel (GPU, bfloat16/float16 inputs),
  pallas        nothing: jax's Pallas TPU flash kernel, on sequences padded to a multiple
                of its 128-token blocks (the padding is masked out with segment ids).

The fused kernels are custom calls that XLA's cost model gives no time; `flash_hbm_bytes`
and `materialised_hbm_bytes` are what the compile-only report prints for them instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dmae_jax import architectures
from dmae_jax.architectures import ATTENTION
from dmae_jax.errors import ConfigError

# The dtype of each `model.attention_logits` name (`architectures.ATTENTION_LOGITS`).
ATTENTION_LOGITS = {name: getattr(jnp, name) for name in architectures.ATTENTION_LOGITS}
# The Pallas kernel's block (and so sequence padding) size.
FLASH_BLOCK = 128


def resolve(name: str, platform: str, dtype) -> str:
    """The implementation `model.attention` = name selects on `platform` (cpu, gpu or tpu)."""
    if name not in ATTENTION:
        raise ConfigError(f"model.attention must be one of {sorted(ATTENTION)}, got {name!r}")
    if name != "auto":
        return name
    if platform == "tpu":
        return "xla"
    if platform in ("gpu", "cuda"):
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
    return "einsum"


def resolve_logits(name: str, impl: str, dtype) -> str:
    """The logits dtype `model.attention_logits` = name selects for implementation `impl`
    (resolved) of a model computing in `dtype`."""
    if name != "auto":
        return name
    stores = impl in ("einsum", "xla")
    return "bfloat16" if stores and jnp.dtype(dtype) == jnp.bfloat16 else "float32"


def layout(impl: str) -> str:
    """The q/k/v layout `core` takes for `impl`: "bnhk" ([B, N, H, d]) or "bhnk" ([B, H, N, d])."""
    return "bhnk" if impl == "pallas" else "bnhk"


def core(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str,
         logits_dtype=jnp.float32) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v of q, k, v in `layout(impl)`, in that layout and q's dtype."""
    if impl == "pallas":
        return flash(q, k, v)
    if impl in ("einsum", "xla") and jnp.dtype(logits_dtype) != jnp.float32:
        return einsum_attention(q, k, v, logits_dtype=logits_dtype)
    if impl == "einsum":
        return einsum_attention(q, k, v)
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {impl!r}; one of {ATTENTION}")
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     logits_dtype=jnp.float32) -> jax.Array:
    """Plain-einsum attention on [B, N, H, d]; logits and weights stored in `logits_dtype`."""
    scale = q.shape[-1] ** -0.5
    if jnp.dtype(logits_dtype) == jnp.float32:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * np.float32(scale), axis=-1)
    else:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=logits_dtype)
        weights = scaled_softmax(logits, scale)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scaled_softmax(logits: jax.Array, scale: float) -> jax.Array:
    """softmax(scale * logits) over the last axis, computed in float32, stored in logits' dtype.

    Its gradient is computed in float32 from the stored weights alone, so a bfloat16 model
    keeps no float32 [B, H, N, N] array for the backward pass (autodiff of an upcast softmax
    would keep the float32 weights).
    """
    return jax.nn.softmax(logits.astype(jnp.float32) * np.float32(scale),
                          axis=-1).astype(logits.dtype)


def _scaled_softmax_fwd(logits, scale):
    weights = scaled_softmax(logits, scale)
    return weights, weights


def _scaled_softmax_bwd(scale, weights, dweights):
    w = weights.astype(jnp.float32)
    dw = dweights.astype(jnp.float32)
    dlogits = np.float32(scale) * w * (dw - jnp.sum(dw * w, axis=-1, keepdims=True))
    return (dlogits.astype(weights.dtype),)


scaled_softmax.defvjp(_scaled_softmax_fwd, _scaled_softmax_bwd)


def flash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """jax's Pallas TPU flash attention on [B, H, N, d] (any N: padded to 128-token blocks).

    Padded keys get segment id 0 and real tokens 1, so no real query attends to padding;
    the padded queries' rows are cut off. Off a TPU it runs only inside
    `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (the tests' CPU check).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    b, _, n, d = q.shape
    padded = -(-n // FLASH_BLOCK) * FLASH_BLOCK

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded - n), (0, 0)))

    segments = jnp.broadcast_to((jnp.arange(padded) < n).astype(jnp.int32), (b, padded))
    out = pallas_flash.flash_attention(
        pad(q), pad(k), pad(v), segment_ids=pallas_flash.SegmentIds(segments, segments),
        sm_scale=d**-0.5)
    return out[:, :, :n]


# ---------------------------------------------------------------------------------------------
# HBM traffic of one attention core's forward and backward pass (the compile-only report).
# ---------------------------------------------------------------------------------------------


def flash_hbm_bytes(batch: int, heads: int, tokens: int, head_dim: int, itemsize: int, *,
                    forward: int = 1, backward: int = 1) -> float:
    """Bytes the Pallas flash kernel moves to and from HBM in one layer's `forward` forward
    and `backward` backward passes (remat runs the forward twice).

    Counted from jax's kernel (128-token blocks, one block of batch and head per program):
    the forward reads q once and k, v once per query block and writes o (and, when training,
    the float32 softmax statistics l, m, kept 128 lanes wide); the backward's dk/dv kernel
    reads k, v once and q, do, l, m, di once per key block, its dq kernel the reverse, and
    each writes its gradients. Sequences count padded to the block.
    """
    n = -(-tokens // FLASH_BLOCK) * FLASH_BLOCK
    blocks = n // FLASH_BLOCK
    act = batch * heads * n * head_dim * itemsize  # one of q, k, v, o, do, dq, dk, dv
    stat = batch * heads * n * FLASH_BLOCK * 4  # one of l, m, di
    fwd = act + blocks * 2 * act + act + (2 * stat if backward else 0)
    dkv = 2 * act + blocks * (2 * act + 3 * stat) + 2 * act
    dq = (2 * act + 3 * stat) + blocks * 2 * act + act
    return float(forward * fwd + backward * (dkv + dq))


def materialised_hbm_bytes(batch: int, heads: int, tokens: int, logits_itemsize: int, *,
                           forward: int = 1, backward: int = 1) -> float:
    """Bytes the einsum/xla paths move for one layer's [B, H, N, N] arrays in `forward`
    forward and `backward` backward passes.

    At the least: the forward writes the logits, reads them for the softmax, writes the
    weights and reads them for the second matmul; the backward reads the weights twice
    (the v gradient and the softmax's), writes and reads the weights' gradient and writes
    the logits' gradient and reads it twice (the q and k gradients). Fusion can remove some
    of these, layout copies add others: XLA's own count is in its cost model's total.
    """
    square = batch * heads * tokens * tokens * logits_itemsize
    return float(square * (4 * forward + 7 * backward))


def step_hbm_bytes(layers, impl: str, itemsize: int, *, forward: int = 1,
                   backward: int = 1) -> float:
    """Sum over attention layers [(batch, heads, tokens, head_dim, depth)] of `impl`'s bytes
    (`itemsize`: q, k, v's for pallas, the logits' otherwise)."""
    total = 0.0
    for batch, heads, tokens, head_dim, depth in layers:
        if impl == "pallas":
            total += depth * flash_hbm_bytes(batch, heads, tokens, head_dim, itemsize,
                                             forward=forward, backward=backward)
        else:
            total += depth * materialised_hbm_bytes(batch, heads, tokens, itemsize,
                                                    forward=forward, backward=backward)
    return total
