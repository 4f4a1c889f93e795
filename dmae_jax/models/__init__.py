"""Flax NNX models: ViT encoder, DMAE encoder-decoder, classifier, diffusion UNet.

Each model file holds the model, how it is built from a config (`create_dmae`,
`create_classifier`, `UNet(architectures.UNET_PRESETS[name])`) and how it is built from a
parameter export (`dmae.from_export`, `classifier.from_export`, `unet.from_export`). A `model`
config block has the fields of `dmae_jax.defaults.model` (variant, img_size, patch_size,
decoder_width, decoder_depth, decoder_heads, norm_pix_loss, normalization, drop_path_rate,
global_pool, dtype, remat), optionally width / depth / num_heads overriding the variant. The
rules such a block obeys, and the UNet's configs and presets, are plain Python in
`dmae_jax.architectures` (validation checks them before JAX is imported).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from dmae_jax.architectures import VARIANTS, resolve_model_config
from dmae_jax.models.classifier import Classifier, create_classifier, init_from_dmae
from dmae_jax.models.dmae import DMAE, DMAEOutput, create_dmae
from dmae_jax.models.parts import ModelParts
from dmae_jax.models.vit import DTYPES

__all__ = [
    "DMAE", "DMAEOutput", "Classifier", "ModelParts", "init_from_dmae", "create_dmae",
    "create_classifier", "resolve_model_config", "count_params", "DTYPES", "VARIANTS",
]


def count_params(module: nnx.Module, filter_=...) -> int:
    """Number of scalars in the module's variables matching `filter_` (default: all)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, filter_))))
