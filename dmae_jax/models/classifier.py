"""The ViT classifier of the official DMAE fine-tuning (MAE's `models_vit.VisionTransformer`).

Images in [0, 1] are normalised inside the model (so smoothing noise lives in pixel space),
resized to img_size with PyTorch bicubic (`upsample`: antialiased or not) when their size
differs (the official CIFAR-10 pipeline upsamples 32 -> 224 after adding the noise), embedded,
run through the blocks, then either average-pooled over the patch tokens + `fc_norm`
(global_pool, the default) or the cls token + `norm`, and a linear `head`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmae_jax import architectures, exports
from dmae_jax.exports import match_tree
from dmae_jax.models import vit
from dmae_jax.models.parts import ModelParts


class Classifier(nnx.Module):
    """ViT classifier with global average pooling and drop path (official fine-tuning model)."""

    def __init__(self, *, img_size: int, patch_size: int, width: int, depth: int,
                 num_heads: int, num_classes: int, mlp_ratio: float = 4.0,
                 drop_path_rate: float, global_pool: bool, normalization: str,
                 dtype=jnp.float32, remat: bool = False, in_chans: int = 3,
                 upsample: str = "bicubic", attention_impl: str = "einsum",
                 attention_logits=jnp.float32, matmul_precision: str | None = None,
                 rngs: nnx.Rngs):
        if img_size % patch_size != 0:
            raise ValueError(
                f"img_size {img_size} is not divisible by patch_size {patch_size}"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.mean, self.std = vit.get_normalization(normalization)
        self.dtype = dtype
        self.remat = remat
        if upsample not in architectures.UPSAMPLE:
            raise ValueError(f"upsample must be one of {sorted(architectures.UPSAMPLE)}, "
                             f"got {upsample!r}")
        self.upsample = upsample
        # A `jax.default_matmul_precision` value (None: JAX's default) for every call.
        self.matmul_precision = matmul_precision

        # timm 0.5.4 init (trunc_normal_(std=.02) with absolute cutoffs +-2 is a plain normal
        # at this std); the conv keeps PyTorch's default init, as in timm.
        normal = nnx.initializers.normal(0.02)
        fan_in = in_chans * patch_size * patch_size
        self.patch_embed = vit.PatchEmbed(
            patch_size, in_chans, width,
            kernel_init=nnx.initializers.variance_scaling(
                1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1, 2), out_axis=3),
            bias_init=vit.torch_default_uniform(fan_in), dtype=dtype, rngs=rngs,
        )
        self.cls_token = nnx.Param(normal(rngs.params(), (1, 1, width)))
        # Trainable here (the official fine-tuning trains it); usually overwritten by
        # `init_from_dmae` with the pretraining model's sin-cos embedding.
        self.pos_embed = nnx.Param(normal(rngs.params(), (1, 1 + self.grid_size**2, width)))
        self.blocks = vit.make_blocks(
            depth, width, num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
            kernel_init=normal, dtype=dtype, attention_impl=attention_impl,
            logits_dtype=attention_logits, rngs=rngs)
        # Pooling, its LayerNorm and the head run in float32: they are cheap, and logits
        # feed the smoothing vote.
        if global_pool:
            self.fc_norm = vit.layer_norm(width, jnp.float32, rngs)
        else:
            self.norm = vit.layer_norm(width, jnp.float32, rngs)
        # MAE fine-tuning re-initialises the head weight with trunc_normal_(std=2e-5).
        self.head = nnx.Linear(width, num_classes,
                               kernel_init=nnx.initializers.normal(2e-5), rngs=rngs)

    @vit.with_matmul_precision
    def features(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """[0, 1] images [B, H, W, C] -> pooled, normalised features [B, D] float32."""
        x = vit.resize_to(images.astype(jnp.float32), self.img_size, self.upsample)
        x = vit.normalize(x, self.mean, self.std)
        x = self.patch_embed(x)
        cls = vit.broadcast_param(self.cls_token.value, (x.shape[0], 1, x.shape[2]), x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
        x = x + vit.broadcast_param(self.pos_embed.value, x.shape, x.dtype)
        x = vit.apply_blocks(self.blocks, x, rng, self.remat)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].astype(jnp.float32).mean(axis=1))
        return self.norm(x[:, 0].astype(jnp.float32))

    @vit.with_matmul_precision
    def __call__(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """[0, 1] images [B, H, W, C] -> logits [B, K] float32; drop path only when rng given."""
        return self.head(self.features(images, rng=rng))


_ENCODER_KEYS = ("cls_token", "patch_embed", "blocks")


def init_from_dmae(classifier: Classifier, dmae_params: Mapping[str, Any]) -> None:
    """Copies a DMAE encoder into `classifier` in place (official fine-tuning initialisation).

    `dmae_params` is the pure-dict DMAE parameter tree, `nnx.state(dmae, nnx.Param)
    .to_pure_dict()` (what `dmae_jax.convert` and pretraining export), optionally with
    `"pos_embed"` [1, 1 + g*g, D] added (e.g. `nnx.state(dmae).to_pure_dict()`, which also
    holds the fixed embeddings). Copied: cls_token, patch_embed, blocks (depths must match)
    and pos_embed.
    Without "pos_embed" the classifier gets the fixed sin-cos embedding of its own grid,
    which is exactly the DMAE's when the grids agree; with it, a differing grid is
    interpolated bicubically as MAE's `interpolate_pos_embed`. Decoder, mask token and the
    encoder's final `norm` are ignored; fc_norm and head stay as initialised.
    """
    missing = [k for k in _ENCODER_KEYS if k not in dmae_params]
    if missing:
        raise ValueError(
            f"dmae_params lacks {missing}; pass nnx.state(dmae, nnx.Param).to_pure_dict()"
        )
    state = nnx.state(classifier, nnx.Param)
    target = state.to_pure_dict()
    source = {k: dmae_params[k] for k in _ENCODER_KEYS}
    if len(source["blocks"]) != len(target["blocks"]):
        raise ValueError(
            f"the DMAE has {len(source['blocks'])} blocks but the classifier has "
            f"{len(target['blocks'])}; model.variant/depth must match the pretrained model"
        )
    width = target["cls_token"].shape[-1]
    if "pos_embed" in dmae_params:
        source["pos_embed"] = vit.interpolate_pos_embed(
            jnp.asarray(dmae_params["pos_embed"]), classifier.grid_size)
    else:
        source["pos_embed"] = vit.sincos_2d_posemb(classifier.grid_size, width)[None]

    copied = match_tree({k: target[k] for k in source}, source, where="dmae_params")
    target.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), copied))
    nnx.replace_by_pure_dict(state, target)
    nnx.update(classifier, state)


def create_classifier(model_cfg: Mapping[str, Any] | Any, num_classes: int, *,
                      rngs: nnx.Rngs, platform: str | None = None) -> Classifier:
    """Builds the fine-tuning ViT classifier described by a `model` config, for `platform`
    (cpu, gpu or tpu; default: JAX's default backend), which resolves `model.attention`."""
    cfg = architectures.resolve_model_config(model_cfg)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return Classifier(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], width=cfg["width"],
        depth=cfg["depth"], num_heads=cfg["num_heads"], num_classes=int(num_classes),
        drop_path_rate=cfg["drop_path_rate"], global_pool=cfg["global_pool"],
        normalization=cfg["normalization"], dtype=vit.DTYPES[cfg["dtype"]], remat=cfg["remat"],
        upsample=cfg["upsample"], rngs=rngs, **vit.attention_settings(cfg, platform),
    )


def from_export(directory: str, *, field: str) -> tuple[ModelParts, dict]:
    """The classifier of an export (kind "classifier") with its weights, and the meta.

    `field` names the config field in errors. Built as `create_classifier` builds it, then
    every parameter is replaced by the export's (checked entry by entry).
    """
    params, meta = exports.load_checked(directory, kind="classifier", field=field)
    model = create_classifier(meta["model"], meta["num_classes"], rngs=nnx.Rngs(0))
    return ModelParts.split(model).with_params(params, where=f"{field} = {directory!r}"), meta
