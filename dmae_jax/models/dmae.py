"""The DMAE pretraining model: noisy, masked ViT encoder and a light decoder to clean pixels.

Computes what the official `models_dmae.DenoisingMaskedAutoencoderViT` computes
(timm 0.5.4 blocks):

    x_noisy = x + sigma * eps                     (in [0, 1] pixel space, never clipped)
    resize both to img_size (PyTorch bicubic,     (only when the input size differs)
        antialiased or not: `upsample`)
    normalise both with mean/std
    encoder: patch embed + fixed sin-cos pos embed, keep int(L * (1 - mask_ratio)) random
             patches (argsort of uniform noise), prepend cls, blocks, norm
    decoder: linear to decoder width, mask tokens, unshuffle, fixed pos embed, blocks, norm,
             linear to p*p*C pixels per patch, cls dropped
    loss:    MSE against the *clean* patches (per-patch normalised with unbiased variance and
             eps 1e-6 when norm_pix_loss), averaged over ALL patches and values.

Images are NHWC; patch vectors are ordered (p, q, c) like the official `patchify`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dmae_jax import architectures, exports
from dmae_jax.architectures import num_kept
from dmae_jax.models import vit
from dmae_jax.models.parts import ModelParts

NORM_PIX_EPS = 1e-6


class DMAEOutput(NamedTuple):
    """DMAE forward result."""

    loss: jax.Array  # [] float32
    pred: jax.Array  # [B, L, p*p*C] float32 (per-patch normalised units if norm_pix_loss)
    mask: jax.Array  # [B, L] float32, 1 = removed from the encoder input, 0 = kept


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], rows outer, (p, q, c) inside each patch."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """[B, g*g, p*p*C] -> [B, g*p, g*p, C] (inverse of `patchify` for square images)."""
    b, num_patches, _ = patches.shape
    g = int(round(num_patches**0.5))
    if g * g != num_patches:
        raise ValueError(f"unpatchify needs a square number of patches, got {num_patches}")
    p = patch_size
    x = patches.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, channels)


def normalize_patches(patches: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-patch standardisation [B, L, P]: returns ((t - mean) / sqrt(var + 1e-6), mean, var).

    `var` is unbiased (torch.var's default), as in the official loss.
    """
    patches = patches.astype(jnp.float32)
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + NORM_PIX_EPS), mean, var


def reconstruction_loss(pred: jax.Array, target: jax.Array, norm_pix_loss: bool) -> jax.Array:
    """MSE over all patches and values of pred [B, L, P] against clean target patches [B, L, P]."""
    if norm_pix_loss:
        target = normalize_patches(target)[0]
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def sample_ids_shuffle(rng: jax.Array, batch_size: int, num_patches: int) -> jax.Array:
    """Per-sample random patch order [B, L] int32: argsort of uniform noise (MAE)."""
    noise = jax.random.uniform(rng, (batch_size, num_patches))
    return jnp.argsort(noise, axis=1).astype(jnp.int32)


def random_masking(
    x: jax.Array, ids_shuffle: jax.Array, len_keep: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keeps the first `len_keep` tokens of each sample's order.

    x [B, L, D], ids_shuffle [B, L] -> (x_kept [B, len_keep, D], mask [B, L] (1 = removed),
    ids_restore [B, L] with take_along_axis(shuffled, ids_restore) == original order).
    """
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
    mask = (ids_restore >= len_keep).astype(jnp.float32)
    return x_kept, mask, ids_restore


class DMAE(nnx.Module):
    """Denoising masked autoencoder (official DMAE pretraining model, timm key names)."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int = 3,
                 width: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 decoder_width: int, decoder_depth: int, decoder_heads: int,
                 norm_pix_loss: bool, normalization: str, dtype=jnp.float32,
                 remat: bool = False, upsample: str = "bicubic", attention_impl: str = "einsum",
                 attention_logits=jnp.float32, matmul_precision: str | None = None,
                 rngs: nnx.Rngs):
        if img_size % patch_size != 0:
            raise ValueError(
                f"img_size {img_size} is not divisible by patch_size {patch_size}"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.norm_pix_loss = norm_pix_loss
        self.mean, self.std = vit.get_normalization(normalization)
        self.dtype = dtype
        self.remat = remat
        if upsample not in architectures.UPSAMPLE:
            raise ValueError(f"upsample must be one of {sorted(architectures.UPSAMPLE)}, "
                             f"got {upsample!r}")
        self.upsample = upsample
        # A `jax.default_matmul_precision` value (None: JAX's default) for every call.
        self.matmul_precision = matmul_precision
        blocks = dict(attention_impl=attention_impl, logits_dtype=attention_logits)

        # Official init: xavier_uniform Linear (zero bias), the patch conv as a Linear on its
        # (D, C*p*p) view, cls and mask tokens N(0, 0.02).
        xavier = nnx.initializers.xavier_uniform()
        patch_fan_in = in_chans * patch_size * patch_size
        self.patch_embed = vit.PatchEmbed(
            patch_size, in_chans, width,
            kernel_init=nnx.initializers.variance_scaling(
                1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3),
            bias_init=vit.torch_default_uniform(patch_fan_in), dtype=dtype, rngs=rngs,
        )
        self.cls_token = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, 1, width)))
        self.pos_embed = vit.FixedEmbedding(
            jnp.asarray(vit.sincos_2d_posemb(self.grid_size, width))[None])
        self.blocks = vit.make_blocks(
            depth, width, num_heads, mlp_ratio=mlp_ratio, drop_path_rate=0.0,
            kernel_init=xavier, dtype=dtype, rngs=rngs, **blocks)
        self.norm = vit.layer_norm(width, dtype, rngs)

        self.decoder_embed = vit.Dense(width, decoder_width, kernel_init=xavier, dtype=dtype,
                                        rngs=rngs)
        self.mask_token = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, 1, decoder_width)))
        self.decoder_pos_embed = vit.FixedEmbedding(
            jnp.asarray(vit.sincos_2d_posemb(self.grid_size, decoder_width))[None])
        self.decoder_blocks = vit.make_blocks(
            decoder_depth, decoder_width, decoder_heads, mlp_ratio=mlp_ratio,
            drop_path_rate=0.0, kernel_init=xavier, dtype=dtype, rngs=rngs, **blocks)
        self.decoder_norm = vit.layer_norm(decoder_width, dtype, rngs)
        self.decoder_pred = vit.Dense(decoder_width, patch_size * patch_size * in_chans,
                                       kernel_init=xavier, dtype=dtype, rngs=rngs)

    def patchify(self, images: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, L, p*p*C]."""
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: jax.Array) -> jax.Array:
        """[B, L, p*p*C] -> [B, H, W, C]."""
        return unpatchify(patches, self.patch_size, self.in_chans)

    @vit.with_matmul_precision
    def preprocess(self, images: jax.Array) -> jax.Array:
        """[0, 1] images [B, H, W, C] -> normalised [B, img_size, img_size, C] float32."""
        x = vit.resize_to(images.astype(jnp.float32), self.img_size, self.upsample)
        return vit.normalize(x, self.mean, self.std)

    def forward_encoder(self, x: jax.Array, ids_shuffle: jax.Array, len_keep: int
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Normalised images [B, H, W, C] -> (latent [B, 1 + len_keep, D], mask, ids_restore)."""
        x = self.patch_embed(x)
        pos_embed = self.pos_embed.value
        # Position embeddings are added before masking, so kept tokens keep their positions.
        x = x + pos_embed[:, 1:].astype(x.dtype)
        x, mask, ids_restore = random_masking(x, ids_shuffle, len_keep)
        cls = vit.broadcast_param(self.cls_token.value + pos_embed[:, :1],
                                  (x.shape[0], 1, x.shape[2]), x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
        x = vit.apply_blocks(self.blocks, x, None, self.remat)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
        """latent [B, 1 + K, D], ids_restore [B, L] -> pred [B, L, p*p*C] float32."""
        x = self.decoder_embed(latent)
        b, num_patches = ids_restore.shape
        mask_tokens = vit.broadcast_param(
            self.mask_token.value, (b, num_patches + 1 - x.shape[1], x.shape[2]), x.dtype)
        tokens = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
        tokens = jnp.take_along_axis(tokens, ids_restore[:, :, None], axis=1)
        x = jnp.concatenate([x[:, :1], tokens], axis=1)
        x = x + self.decoder_pos_embed.value.astype(x.dtype)
        x = vit.apply_blocks(self.decoder_blocks, x, None, self.remat)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:].astype(jnp.float32)

    @vit.with_matmul_precision
    def __call__(self, images: jax.Array, *, sigma, mask_ratio: float,
                 rng: jax.Array | None = None, noise: jax.Array | None = None,
                 ids_shuffle: jax.Array | None = None) -> DMAEOutput:
        """Noisy masked reconstruction of clean images [B, H, W, C] in [0, 1].

        `noise` is an explicit N(0, 1) draw shaped like `images` (drawn from `rng` when None;
        not needed when `sigma` is the Python number 0). `ids_shuffle` [B, L] is an explicit
        patch order (drawn from `rng` when None; the identity when mask_ratio is 0 and there
        is no rng). `mask_ratio` must be a Python float (it fixes the number of kept tokens).
        """
        if isinstance(sigma, (int, float)) and sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        len_keep = num_kept(self.num_patches, mask_ratio)
        rng_noise, rng_mask = (None, None) if rng is None else jax.random.split(rng)
        images = images.astype(jnp.float32)
        batch = images.shape[0]

        if noise is None and not (isinstance(sigma, (int, float)) and sigma == 0):
            if rng_noise is None:
                raise ValueError("DMAE needs rng (or an explicit noise) when sigma != 0")
            noise = jax.random.normal(rng_noise, images.shape, jnp.float32)
        noisy = images if noise is None else images + sigma * noise.astype(jnp.float32)
        # Resize after the noise, as the official code: the noise lives at the input size.
        # Both batches stacked on a new axis: concatenated along the batch axis, which data
        # parallelism splits over devices, they would move between devices.
        clean, noisy = jax.vmap(self.preprocess)(jnp.stack([images, noisy]))

        if ids_shuffle is None:
            if rng_mask is not None:
                ids_shuffle = sample_ids_shuffle(rng_mask, batch, self.num_patches)
            elif len_keep == self.num_patches:
                ids_shuffle = jnp.broadcast_to(
                    jnp.arange(self.num_patches, dtype=jnp.int32), (batch, self.num_patches))
            else:
                raise ValueError("DMAE needs rng (or an explicit ids_shuffle) when mask_ratio > 0")

        latent, mask, ids_restore = self.forward_encoder(noisy, ids_shuffle, len_keep)
        pred = self.forward_decoder(latent, ids_restore)
        loss = reconstruction_loss(pred, self.patchify(clean), self.norm_pix_loss)
        return DMAEOutput(loss=loss, pred=pred, mask=mask)

    @vit.with_matmul_precision
    def reconstruct(self, images_noisy: jax.Array, sigma: float | None = None) -> jax.Array:
        """Best-effort clean image [B, img_size, img_size, C] in [0, 1] from noisy [B, H, W, C].

        Encoder and decoder see all patches (nothing masked); see `pred_to_images` for how
        the prediction becomes pixels and what `sigma` (the input's noise level) is for.
        """
        x = self.preprocess(images_noisy)
        batch = x.shape[0]
        ids = jnp.broadcast_to(
            jnp.arange(self.num_patches, dtype=jnp.int32), (batch, self.num_patches))
        latent, _, ids_restore = self.forward_encoder(x, ids, self.num_patches)
        return self._to_pixels(self.forward_decoder(latent, ids_restore), x, sigma)

    @vit.with_matmul_precision
    def pred_to_images(self, pred: jax.Array, images_noisy: jax.Array,
                       sigma: float | None = None) -> jax.Array:
        """Decoder output [B, L, p*p*C] -> images [B, img_size, img_size, C] in [0, 1].

        A norm_pix_loss model predicts each patch only up to its mean and scale; those are
        estimated from the *noisy* input patch (`images_noisy` [B, H, W, C] in [0, 1], the
        encoder's input; normalised units), as the MAE visualisation does. The patch mean of
        the noisy input is unbiased; with the noise level `sigma` ([0,1] pixel units) given,
        the noise's share is also subtracted from the patch variance (otherwise the
        reconstruction inherits the noise's contrast). Outputs are clipped to [0, 1].
        """
        return self._to_pixels(pred, self.preprocess(images_noisy), sigma)

    def _to_pixels(self, pred: jax.Array, x: jax.Array, sigma: float | None) -> jax.Array:
        if self.norm_pix_loss:
            _, mean, var = normalize_patches(self.patchify(x))
            if sigma is not None:
                # Per-value noise variance in normalised units, averaged over the channels
                # (every channel appears equally often in a patch).
                noise_var = jnp.mean(jnp.square(sigma / jnp.asarray(self.std, jnp.float32)))
                var = jnp.maximum(var - noise_var, 0.0)
            pred = pred * jnp.sqrt(var + NORM_PIX_EPS) + mean
        images = self.unpatchify(pred.astype(jnp.float32))
        images = images * jnp.asarray(self.std, jnp.float32) + jnp.asarray(self.mean, jnp.float32)
        return jnp.clip(images, 0.0, 1.0)


def create_dmae(model_cfg: Mapping[str, Any] | Any, *, rngs: nnx.Rngs,
                platform: str | None = None) -> DMAE:
    """Builds the DMAE pretraining model described by a `model` config, for `platform`
    (cpu, gpu or tpu; default: JAX's default backend), which resolves `model.attention`."""
    cfg = architectures.resolve_model_config(model_cfg)
    return DMAE(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], width=cfg["width"],
        depth=cfg["depth"], num_heads=cfg["num_heads"], decoder_width=cfg["decoder_width"],
        decoder_depth=cfg["decoder_depth"], decoder_heads=cfg["decoder_heads"],
        norm_pix_loss=cfg["norm_pix_loss"], normalization=cfg["normalization"],
        dtype=vit.DTYPES[cfg["dtype"]], remat=cfg["remat"], upsample=cfg["upsample"], rngs=rngs,
        **vit.attention_settings(cfg, platform),
    )


def from_export(directory: str, *, field: str) -> tuple[ModelParts, dict]:
    """The DMAE of an export (kind "dmae") with its weights, and the export's meta.

    Built for real, not abstractly: its fixed position embeddings are not parameters, so
    they are not in the export. `field` names the config field in errors.
    """
    params, meta = exports.load_checked(directory, kind="dmae", field=field)
    parts = ModelParts.split(create_dmae(meta["model"], rngs=nnx.Rngs(0)))
    return parts.with_params(params, where=f"{field} = {directory!r}"), meta
