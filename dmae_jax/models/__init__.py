"""Flax NNX models: ViT encoder, DMAE encoder-decoder, classifier.

`create_dmae` / `create_classifier` build them from the `model` section of a config, which
has the fields: variant, img_size, patch_size, decoder_width, decoder_depth, decoder_heads,
norm_pix_loss, normalization, drop_path_rate, global_pool, dtype ("float32" | "bfloat16"),
remat, and optionally width / depth / num_heads overriding the variant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmae_jax.models.classifier import Classifier, init_from_dmae
from dmae_jax.models.dmae import DMAE, DMAEOutput
from dmae_jax.models.vit import NORMALIZATIONS, VARIANTS, get_variant

__all__ = [
    "DMAE", "DMAEOutput", "Classifier", "init_from_dmae", "create_dmae", "create_classifier",
    "resolve_model_config", "count_params", "set_params", "DTYPES", "VARIANTS",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_DEFAULTS = {
    "decoder_width": 512,
    "decoder_depth": 8,
    "decoder_heads": 16,
    "norm_pix_loss": True,
    "normalization": "imagenet",
    "drop_path_rate": 0.0,
    "global_pool": True,
    "dtype": "float32",
    "remat": False,
    "width": None,
    "depth": None,
    "num_heads": None,
}


def _field(model_cfg: Mapping[str, Any] | Any, name: str) -> Any:
    """model_cfg[name] for a Mapping or ConfigDict, the default when absent or None."""
    value = model_cfg.get(name, None)
    if value is None:
        if name not in _DEFAULTS:
            raise ValueError(f"model.{name} is required")
        return _DEFAULTS[name]
    return value


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
    return int(value)


def resolve_model_config(model_cfg: Mapping[str, Any] | Any) -> dict:
    """Validated, complete model config: a plain dict with every field (variant resolved)."""
    cfg = {name: _field(model_cfg, name) for name in ("variant", "img_size", "patch_size",
                                                      *_DEFAULTS)}
    arch = get_variant(cfg["variant"])
    for name in ("width", "depth", "num_heads"):
        cfg[name] = _positive_int(cfg[name] if cfg[name] is not None else arch[name], name)
    for name in ("img_size", "patch_size", "decoder_width", "decoder_depth", "decoder_heads"):
        cfg[name] = _positive_int(cfg[name], name)
    if cfg["img_size"] % cfg["patch_size"] != 0:
        raise ValueError(
            f"model.img_size must be divisible by model.patch_size ({cfg['patch_size']}), "
            f"got {cfg['img_size']}"
        )
    for width, heads in (("width", "num_heads"), ("decoder_width", "decoder_heads")):
        if cfg[width] % cfg[heads] != 0 or cfg[width] % 4 != 0:
            raise ValueError(
                f"model.{width} must be divisible by 4 (sin-cos embedding) and by "
                f"model.{heads} ({cfg[heads]}), got {cfg[width]}"
            )
    if cfg["normalization"] not in NORMALIZATIONS:
        raise ValueError(
            f"model.normalization must be one of {sorted(NORMALIZATIONS)}, "
            f"got {cfg['normalization']!r}"
        )
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg['dtype']!r}")
    rate = cfg["drop_path_rate"]
    if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"model.drop_path_rate must be in [0, 1), got {rate!r}")
    cfg["drop_path_rate"] = float(rate)
    for name in ("norm_pix_loss", "global_pool", "remat"):
        cfg[name] = bool(cfg[name])
    return cfg


def create_dmae(model_cfg: Mapping[str, Any] | Any, *, rngs: nnx.Rngs) -> DMAE:
    """Builds the DMAE pretraining model described by a `model` config."""
    cfg = resolve_model_config(model_cfg)
    return DMAE(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], width=cfg["width"],
        depth=cfg["depth"], num_heads=cfg["num_heads"], decoder_width=cfg["decoder_width"],
        decoder_depth=cfg["decoder_depth"], decoder_heads=cfg["decoder_heads"],
        norm_pix_loss=cfg["norm_pix_loss"], normalization=cfg["normalization"],
        dtype=DTYPES[cfg["dtype"]], remat=cfg["remat"], rngs=rngs,
    )


def create_classifier(model_cfg: Mapping[str, Any] | Any, num_classes: int, *,
                      rngs: nnx.Rngs) -> Classifier:
    """Builds the fine-tuning ViT classifier described by a `model` config."""
    cfg = resolve_model_config(model_cfg)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return Classifier(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], width=cfg["width"],
        depth=cfg["depth"], num_heads=cfg["num_heads"], num_classes=int(num_classes),
        drop_path_rate=cfg["drop_path_rate"], global_pool=cfg["global_pool"],
        normalization=cfg["normalization"], dtype=DTYPES[cfg["dtype"]], remat=cfg["remat"],
        rngs=rngs,
    )


def count_params(module: nnx.Module, filter_=...) -> int:
    """Number of scalars in the module's variables matching `filter_` (default: all)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, filter_))))


def set_params(module: nnx.Module, params: Mapping[str, Any]) -> None:
    """Loads a pure-dict parameter tree (as `nnx.state(m, nnx.Param).to_pure_dict()`) in place.

    Every Param must be present with its exact shape; extra entries are an error.
    """
    state = nnx.state(module, nnx.Param)
    expected = state.to_pure_dict()
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_given = dict(jax.tree_util.tree_flatten_with_path(dict(params))[0])

    def name(path) -> str:
        return "/".join(str(getattr(k, "key", k)) for k in path)

    missing = sorted(name(p) for p in flat_expected.keys() - flat_given.keys())
    extra = sorted(name(p) for p in flat_given.keys() - flat_expected.keys())
    if missing or extra:
        raise ValueError(f"parameter tree mismatch: missing {missing[:8]}, unexpected {extra[:8]}")
    for path, old in flat_expected.items():
        if tuple(np.shape(flat_given[path])) != tuple(old.shape):
            raise ValueError(
                f"parameter {name(path)} has shape {tuple(np.shape(flat_given[path]))}, "
                f"the model expects {tuple(old.shape)}"
            )
    nnx.replace_by_pure_dict(
        state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(params)))
    nnx.update(module, state)
