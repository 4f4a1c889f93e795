"""Optimizers, learning-rate schedules and parameter groups, as the official DMAE/MAE code.

Parameter rules work on names, so they apply unchanged to an `nnx.State` of `nnx.Param`s, to
its `.to_pure_dict()`, and to the masked sub-trees optax builds internally. A name is the
parameter's path joined with "/", e.g. "blocks/3/attn/qkv/kernel" (see `param_name`).

Pretraining (timm 0.5.4 `add_weight_decay`): AdamW(0.9, 0.95); no weight decay for parameters
with ndim <= 1 or named ".../bias"; decay on everything else, including `cls_token`
and `mask_token`.

Fine-tuning (MAE `util/lr_decay.param_groups_lrd`): AdamW(0.9, 0.999) with layer-wise lr decay.
With `num_layers` = number of transformer blocks (depth), layer id 0 is `cls_token`,
`pos_embed`, `patch_embed/*`; `blocks/<i>/*` is i + 1; everything else (fc_norm, head) is
num_layers + 1, and the lr scale is layer_decay ** (num_layers + 1 - layer_id). (The official
code calls depth + 1 `num_layers`; the scales are the same.) No weight decay for ndim <= 1
parameters and for `cls_token`, `pos_embed`, `dist_token` (timm's `no_weight_decay()`).

PyTorch's AdamW multiplies the decay by the group's lr (p -= lr * scale * (adam + wd * p)), so
the per-layer scale is applied after the decay is added, as here.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
FrozenFn = Callable[[str], bool]

# timm VisionTransformer.no_weight_decay(): excluded from weight decay when fine-tuning.
FINETUNE_NO_WEIGHT_DECAY = ("cls_token", "pos_embed", "dist_token")
# Top-level names that belong to layer 0 (the embedding) for layer-wise lr decay.
_EMBEDDING_NAMES = ("cls_token", "pos_embed", "dist_token", "patch_embed")


def param_name(path: Sequence[Any]) -> str:
    """Returns the "/"-joined name of a JAX key path, e.g. "blocks/0/attn/qkv/kernel"."""
    parts = []
    for i, key in enumerate(path):
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            # An nnx.Variable (Param) leaf adds a trailing `.value` attribute: not a name part.
            if i == len(path) - 1 and key.name in ("value", "raw_value"):
                continue
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def named_leaves(params: PyTree) -> list[tuple[str, jax.Array]]:
    """Returns [(name, array)] for every leaf of a parameter tree (State or nested dict)."""
    return [(param_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)]


def _map_named(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
    """Maps fn(name, leaf) over a tree, keeping its structure."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(param_name(p), x), tree)


# ------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ------------------------------------------------------------------------------------------------


def lr_schedule(
    *,
    base_lr: float,
    global_batch_size: int,
    total_steps: int,
    warmup_steps: int,
    min_lr: float = 0.0,
) -> optax.Schedule:
    """Per-step linear warm-up from 0 then half-cycle cosine to min_lr (MAE `lr_sched`).

    The peak lr is base_lr * global_batch_size / 256 (min_lr is not scaled). The official code
    evaluates its per-epoch formula at the fractional epoch `step / steps_per_epoch` once per
    optimizer step; with warmup_steps = warmup_epochs * steps_per_epoch and total_steps =
    epochs * steps_per_epoch this schedule is the same function of the optimizer step. The
    first update (step 0) has lr 0, as in the official code. After total_steps it stays at
    min_lr.
    """
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps must be > warmup_steps ({warmup_steps}), got {total_steps}")
    if min_lr < 0:
        raise ValueError(f"min_lr must be >= 0, got {min_lr}")
    peak_lr = base_lr * global_batch_size / 256
    if min_lr > peak_lr:
        raise ValueError(f"min_lr must be <= the peak lr {peak_lr}, got {min_lr}")

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = peak_lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warmup, cosine)

    return schedule


# ------------------------------------------------------------------------------------------------
# Parameter-group rules (on names and ndim)
# ------------------------------------------------------------------------------------------------


def pretrain_decays(name: str, ndim: int) -> bool:
    """Whether a parameter gets weight decay in pretraining (timm `add_weight_decay`)."""
    return not (ndim <= 1 or name.split("/")[-1] == "bias")


def finetune_decays(name: str, ndim: int) -> bool:
    """Whether a parameter gets weight decay in fine-tuning (MAE `param_groups_lrd`)."""
    return not (ndim <= 1 or name in FINETUNE_NO_WEIGHT_DECAY)


def layer_id(name: str, num_layers: int) -> int:
    """Layer id for layer-wise lr decay: 0 embedding, i+1 for blocks/i, num_layers+1 the rest."""
    parts = name.split("/")
    if parts[0] in _EMBEDDING_NAMES:
        return 0
    if parts[0] == "blocks":
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"parameter {name!r}: expected 'blocks/<index>/...'")
        index = int(parts[1])
        if index >= num_layers:
            raise ValueError(
                f"parameter {name!r} has block index {index}, but num_layers={num_layers}; "
                "num_layers must be the number of transformer blocks (depth)"
            )
        return index + 1
    return num_layers + 1


def layer_lr_scale(name: str, *, layer_decay: float, num_layers: int) -> float:
    """lr multiplier layer_decay ** (num_layers + 1 - layer_id(name))."""
    return float(layer_decay ** (num_layers + 1 - layer_id(name, num_layers)))


def linear_probe_frozen(name: str) -> bool:
    """`frozen` rule for linear probing: everything except the `head/...` parameters."""
    return name.split("/")[0] != "head"


def _check_params(params: PyTree) -> list[tuple[str, jax.Array]]:
    leaves = named_leaves(params)
    if not leaves:
        raise ValueError("params must contain at least one parameter, got an empty tree")
    return leaves


def _check_adamw_args(weight_decay: float, b1: float, b2: float) -> None:
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    for field, value in (("b1", b1), ("b2", b2)):
        if not 0 <= value < 1:
            raise ValueError(f"{field} must be in [0, 1), got {value}")


# ------------------------------------------------------------------------------------------------
# Optimizers
# ------------------------------------------------------------------------------------------------


def _scale_per_param(scale_of: Callable[[str], float]) -> optax.GradientTransformation:
    """Multiplies each update by scale_of(name): the per-group lr_scale of PyTorch."""

    def update_fn(updates, state, params=None):
        del params
        return _map_named(lambda name, u: u * scale_of(name), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _with_frozen(tx: optax.GradientTransformation, frozen: FrozenFn | None):
    """Zero updates and no optimizer state for parameters with frozen(name) true."""
    if frozen is None:
        return tx

    def labels(tree: PyTree) -> PyTree:
        return _map_named(lambda name, _: "frozen" if frozen(name) else "trainable", tree)

    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def _adam(b1: float, b2: float) -> optax.GradientTransformation:
    # eps added to sqrt(v_hat), as torch.optim.AdamW.
    return optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8)


def pretrain_optimizer(
    params: PyTree,
    *,
    schedule: optax.Schedule,
    weight_decay: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.95,
) -> optax.GradientTransformation:
    """AdamW with timm's weight-decay groups (none for ndim<=1 and biases), as MAE pretraining.

    Gradient accumulation happens in the train step (`common.make_train_step`), so every
    call of `update` is one optimizer step.
    """
    _check_params(params)
    _check_adamw_args(weight_decay, b1, b2)
    tx = optax.chain(
        _adam(b1, b2),
        optax.add_decayed_weights(
            weight_decay, mask=lambda t: _map_named(lambda n, x: pretrain_decays(n, x.ndim), t)
        ),
        optax.scale_by_learning_rate(schedule),
    )
    return tx


def finetune_optimizer(
    params: PyTree,
    *,
    schedule: optax.Schedule,
    weight_decay: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.999,
    layer_decay: float = 0.75,
    num_layers: int,
    frozen: FrozenFn | None = None,
) -> optax.GradientTransformation:
    """AdamW with MAE's layer-wise lr decay and fine-tuning weight-decay groups.

    num_layers is the number of transformer blocks (12 for ViT-B, 24 for ViT-L). frozen(name)
    true marks parameters that never move (e.g. `linear_probe_frozen`); they get zero updates
    and no Adam moments.
    """
    leaves = _check_params(params)
    _check_adamw_args(weight_decay, b1, b2)
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    for name, _ in leaves:
        layer_id(name, num_layers)  # Fails early on a num_layers that does not fit the tree.
    if frozen is not None and all(frozen(name) for name, _ in leaves):
        raise ValueError("frozen marks every parameter as frozen; nothing would be trained")

    tx = optax.chain(
        _adam(b1, b2),
        optax.add_decayed_weights(
            weight_decay, mask=lambda t: _map_named(lambda n, x: finetune_decays(n, x.ndim), t)
        ),
        _scale_per_param(
            lambda name: layer_lr_scale(name, layer_decay=layer_decay, num_layers=num_layers)
        ),
        optax.scale_by_learning_rate(schedule),
    )
    return _with_frozen(tx, frozen)


def linear_probe_optimizer(
    params: PyTree,
    *,
    schedule: optax.Schedule,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    frozen: FrozenFn | None = linear_probe_frozen,
) -> optax.GradientTransformation:
    """LARS as MAE's `util/lars.py` (linear probing): no decay or trust ratio for ndim <= 1.

    Per parameter: d = g + wd * p and d *= trust_coefficient * |p| / |d| (if both norms > 0)
    for ndim > 1; mu = momentum * mu + d; p -= lr * mu.
    """
    _check_params(params)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    def matrices(tree: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda x: x.ndim > 1, tree)

    tx = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=matrices),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), matrices),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(schedule),
    )
    return _with_frozen(tx, frozen)


# ------------------------------------------------------------------------------------------------
# Overview
# ------------------------------------------------------------------------------------------------


def describe_param_groups(
    params: PyTree,
    *,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    frozen: FrozenFn | None = None,
) -> str:
    """A table of parameter groups (group, lr scale, weight decay, #tensors, #params).

    Without layer_decay the pretraining rule is described; with layer_decay and num_layers the
    fine-tuning rule (group names follow MAE: "layer_<id>_decay" / "layer_<id>_no_decay").
    """
    if (layer_decay is None) != (num_layers is None):
        raise ValueError(
            "layer_decay and num_layers must be given together (fine-tuning) or both omitted "
            f"(pretraining), got layer_decay={layer_decay}, num_layers={num_layers}"
        )
    groups: dict[str, list] = {}
    for name, x in _check_params(params):
        size = int(x.size)
        if frozen is not None and frozen(name):
            key, scale, wd = "frozen", 0.0, 0.0
        elif layer_decay is None:
            decays = pretrain_decays(name, x.ndim)
            key, scale, wd = ("decay" if decays else "no_decay"), 1.0, weight_decay * decays
        else:
            decays = finetune_decays(name, x.ndim)
            lid = layer_id(name, num_layers)
            key = f"layer_{lid}_{'decay' if decays else 'no_decay'}"
            scale = layer_lr_scale(name, layer_decay=layer_decay, num_layers=num_layers)
            wd = weight_decay * decays
        group = groups.setdefault(key, [scale, wd, 0, 0])
        group[2] += 1
        group[3] += size

    def order(key: str) -> tuple:
        if key.startswith("layer_"):
            return (0, int(key.split("_")[1]), key)
        return (1 if key != "frozen" else 2, 0, key)

    header = f"{'group':<22}{'lr scale':>10}{'wd':>8}{'tensors':>9}{'params':>14}"
    lines = [header, "-" * len(header)]
    for key in sorted(groups, key=order):
        scale, wd, tensors, size = groups[key]
        lines.append(f"{key:<22}{scale:>10.4g}{wd:>8.3g}{tensors:>9d}{size:>14,d}")
    trainable = sum(g[3] for k, g in groups.items() if k != "frozen")
    frozen_size = groups.get("frozen", [0, 0, 0, 0])[3]
    lines.append("-" * len(header))
    lines.append(f"trainable params: {trainable:,d}   frozen params: {frozen_size:,d}")
    return "\n".join(lines)


def denoiser_optimizer(
    *, lr: float, warmup_steps: int, total_steps: int, b1: float = 0.9, b2: float = 0.999,
    weight_decay: float = 0.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW, its lr schedule): constant lr after a linear warm-up, as improved-diffusion.

    improved-diffusion trains at 1e-4 without weight decay; a warm-up longer than half the
    run (a smoke run) is cut to half of it.
    """
    warmup = min(int(warmup_steps), total_steps // 2)
    if warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    else:
        schedule = optax.constant_schedule(lr)
    return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay), schedule
