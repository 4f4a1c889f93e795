"""Specification of the optimizers, schedules and parameter groups (dmae_jax/train/optim.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from dmae_jax.train import optim

DEPTH = 3
DIM = 8


# ------------------------------------------------------------------------------------------------
# Hand-built trees with timm's module names
# ------------------------------------------------------------------------------------------------


class _Attention(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)


class _Mlp(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)


class _Block(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = _Attention(dim, rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = _Mlp(dim, rngs)


class _PatchEmbed(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.proj = nnx.Conv(3, dim, (2, 2), strides=(2, 2), rngs=rngs)


def _normal(rngs: nnx.Rngs, shape) -> nnx.Param:
    return nnx.Param(0.02 * jax.random.normal(rngs.params(), shape))


class _Classifier(nnx.Module):
    """timm/MAE VisionTransformer names, global pool: fc_norm + head, no final norm."""

    def __init__(self, rngs: nnx.Rngs):
        self.cls_token = _normal(rngs, (1, 1, DIM))
        self.pos_embed = _normal(rngs, (1, 5, DIM))
        self.patch_embed = _PatchEmbed(DIM, rngs)
        self.blocks = nnx.List([_Block(DIM, rngs) for _ in range(DEPTH)])
        self.fc_norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.head = nnx.Linear(DIM, 10, rngs=rngs)


class _Pretrain(nnx.Module):
    """DMAE names; the fixed sin-cos position embeddings are not Params."""

    def __init__(self, rngs: nnx.Rngs):
        self.cls_token = _normal(rngs, (1, 1, DIM))
        self.patch_embed = _PatchEmbed(DIM, rngs)
        self.blocks = nnx.List([_Block(DIM, rngs) for _ in range(DEPTH)])
        self.norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.mask_token = _normal(rngs, (1, 1, 4))
        self.decoder_embed = nnx.Linear(DIM, 4, rngs=rngs)
        self.decoder_blocks = nnx.List([_Block(4, rngs) for _ in range(2)])
        self.decoder_norm = nnx.LayerNorm(4, rngs=rngs)
        self.decoder_pred = nnx.Linear(4, 12, rngs=rngs)


def _trees(module_cls):
    """The same parameters as an nnx.State and as its pure dict."""
    state = nnx.state(module_cls(nnx.Rngs(0)), nnx.Param)
    return [state, state.to_pure_dict()]


def _named_values(tree) -> dict:
    return {name: np.asarray(x) for name, x in optim.named_leaves(tree)}


def _random_grads(tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree
    )


def _run(tx, params, steps: int):
    """steps jitted updates with the gradients _random_grads(params, step)."""

    @jax.jit
    def step_fn(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for step in range(steps):
        params, state = step_fn(params, state, _random_grads(params, step))
    return params, state


# ------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------


def _official_lr(epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: float):
    """Direct transcription of MAE/DMAE util/lr_sched.adjust_learning_rate."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs))
    )


@pytest.mark.parametrize("accum_iter", [1, 4])
def test_schedule_equals_official_fractional_epoch_formula(accum_iter):
    steps_per_epoch, epochs, warmup_epochs = 7, 10, 2
    base_lr, batch, min_lr = 5e-4, 1024, 1e-6
    schedule = optim.lr_schedule(
        base_lr=base_lr,
        global_batch_size=batch,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=warmup_epochs * steps_per_epoch,
        min_lr=min_lr,
    )
    # The official loop: len(data_loader) micro-batches per epoch, lr set every accum_iter
    # micro-batches at epoch + data_iter_step / len(data_loader).
    loader_len = steps_per_epoch * accum_iter
    official = [
        _official_lr(
            data_iter_step / loader_len + epoch,
            lr=base_lr * batch / 256,
            min_lr=min_lr,
            warmup_epochs=warmup_epochs,
            epochs=epochs,
        )
        for epoch in range(epochs)
        for data_iter_step in range(loader_len)
        if data_iter_step % accum_iter == 0
    ]
    ours = [float(schedule(step)) for step in range(epochs * steps_per_epoch)]
    np.testing.assert_allclose(ours, official, rtol=1e-5, atol=1e-12)


def test_schedule_shape_warmup_from_zero_peak_then_min_lr():
    schedule = optim.lr_schedule(
        base_lr=1.5e-4, global_batch_size=4096, total_steps=100, warmup_steps=10, min_lr=0.0
    )
    peak = 1.5e-4 * 4096 / 256
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(peak, rel=1e-6)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
    assert float(schedule(150)) == pytest.approx(0.0, abs=1e-9)  # stays at min_lr
    lrs = np.array([float(schedule(s)) for s in range(101)])
    assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) <= 1e-9)
    assert float(jax.jit(schedule)(jnp.int32(55))) == pytest.approx(float(schedule(55)))


def test_schedule_rejects_bad_arguments():
    kwargs = dict(base_lr=1e-3, global_batch_size=256, total_steps=10, warmup_steps=2)
    with pytest.raises(ValueError, match="total_steps"):
        optim.lr_schedule(**{**kwargs, "total_steps": 2})
    with pytest.raises(ValueError, match="base_lr"):
        optim.lr_schedule(**{**kwargs, "base_lr": 0.0})


# ------------------------------------------------------------------------------------------------
# Parameter names and groups
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", _trees(_Classifier), ids=["State", "dict"])
def test_param_names_are_slash_joined_timm_paths(tree):
    names = set(_named_values(tree))
    assert {
        "cls_token",
        "pos_embed",
        "patch_embed/proj/kernel",
        "blocks/0/attn/qkv/kernel",
        "blocks/2/mlp/fc2/bias",
        "blocks/1/norm1/scale",
        "fc_norm/scale",
        "head/kernel",
    } <= names


@pytest.mark.parametrize("tree", _trees(_Pretrain), ids=["State", "dict"])
def test_pretrain_weight_decay_excludes_norms_and_biases_only(tree):
    decays = {n: optim.pretrain_decays(n, x.ndim) for n, x in _named_values(tree).items()}
    for name in (
        "cls_token",
        "mask_token",
        "patch_embed/proj/kernel",
        "blocks/0/attn/qkv/kernel",
        "decoder_embed/kernel",
        "decoder_blocks/1/mlp/fc1/kernel",
        "decoder_pred/kernel",
    ):
        assert decays[name], name
    for name, decay in decays.items():
        if name.endswith("/bias") or name.endswith("/scale"):
            assert not decay, name


@pytest.mark.parametrize("tree", _trees(_Classifier), ids=["State", "dict"])
def test_finetune_groups_follow_mae_param_groups_lrd(tree):
    ld, n = 0.75, DEPTH
    values = _named_values(tree)
    expected_scale = {
        "cls_token": ld ** (n + 1),
        "pos_embed": ld ** (n + 1),
        "patch_embed/proj/kernel": ld ** (n + 1),
        "patch_embed/proj/bias": ld ** (n + 1),
        "blocks/0/norm1/scale": ld**n,
        "blocks/0/attn/qkv/kernel": ld**n,
        "blocks/2/mlp/fc2/kernel": ld**1,
        "fc_norm/scale": 1.0,
        "head/kernel": 1.0,
        "head/bias": 1.0,
    }
    for name, scale in expected_scale.items():
        assert optim.layer_lr_scale(name, layer_decay=ld, num_layers=n) == pytest.approx(scale)
    no_decay = {name for name, x in values.items() if not optim.finetune_decays(name, x.ndim)}
    assert {
        "cls_token",
        "pos_embed",
        "fc_norm/scale",
        "head/bias",
        "blocks/1/attn/qkv/bias",
    } <= no_decay
    assert not {"patch_embed/proj/kernel", "blocks/1/attn/qkv/kernel", "head/kernel"} & no_decay
    assert no_decay == {name for name, x in values.items() if x.ndim <= 1} | {
        "cls_token",
        "pos_embed",
    }


def test_layer_id_rejects_num_layers_smaller_than_depth():
    with pytest.raises(ValueError, match="num_layers"):
        optim.layer_id("blocks/12/mlp/fc1/kernel", 12)
    assert optim.layer_id("decoder_blocks/3/mlp/fc1/kernel", 2) == 3  # not an encoder block


# ------------------------------------------------------------------------------------------------
# Optimizers against torch.optim.AdamW with the official parameter groups
# ------------------------------------------------------------------------------------------------


def _official_layer_id(name: str, num_layers: int) -> int:
    """Transcription of MAE util/lr_decay.get_layer_id_for_vit (num_layers = depth + 1)."""
    if name in ["cls_token", "pos_embed"]:
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def _torch_run(values: dict, groups_of, schedule, steps: int, betas) -> dict:
    """torch AdamW with per-parameter groups; lr set every step as util/lr_sched does."""
    tensors = {
        name: torch.tensor(v, dtype=torch.float64, requires_grad=True) for name, v in values.items()
    }
    param_groups = []
    for name, t in tensors.items():
        lr_scale, wd = groups_of(name, t)
        param_groups.append({"params": [t], "lr_scale": lr_scale, "weight_decay": wd})
    opt = torch.optim.AdamW(param_groups, lr=0.0, betas=betas)
    return tensors, opt


def _compare_with_torch(tx, tree, groups_of, schedule, steps, betas):
    values = _named_values(tree)
    tensors, opt = _torch_run(values, groups_of, schedule, steps, betas)
    names = list(values)
    for step in range(steps):
        grads = _named_values(_random_grads(tree, step))
        for group in opt.param_groups:
            group["lr"] = float(schedule(step)) * group["lr_scale"]
        for name in names:
            tensors[name].grad = torch.tensor(grads[name], dtype=torch.float64)
        opt.step()
    ours, _ = _run(tx, tree, steps)
    ours = _named_values(ours)
    for name in names:
        np.testing.assert_allclose(
            ours[name], tensors[name].detach().numpy(), rtol=2e-5, atol=1e-6, err_msg=name
        )
        assert not np.allclose(ours[name], values[name]), f"{name} did not move"


SCHEDULE = optim.lr_schedule(base_lr=0.05, global_batch_size=256, total_steps=10, warmup_steps=2)


@pytest.mark.parametrize("tree", _trees(_Classifier), ids=["State", "dict"])
def test_finetune_optimizer_matches_torch_adamw_with_param_groups_lrd(tree):
    ld, wd = 0.65, 0.05

    def groups_of(name, t):
        dotted = name.replace("/", ".")
        no_decay = t.ndim == 1 or dotted in ("cls_token", "pos_embed", "dist_token")
        lid = _official_layer_id(dotted, DEPTH + 1)
        return ld ** (DEPTH + 1 - lid), 0.0 if no_decay else wd

    tx = optim.finetune_optimizer(
        tree, schedule=SCHEDULE, weight_decay=wd, layer_decay=ld, num_layers=DEPTH
    )
    _compare_with_torch(tx, tree, groups_of, SCHEDULE, steps=4, betas=(0.9, 0.999))


@pytest.mark.parametrize("tree", _trees(_Pretrain), ids=["State", "dict"])
def test_pretrain_optimizer_matches_torch_adamw_with_timm_add_weight_decay(tree):
    def groups_of(name, t):
        dotted = name.replace("/", ".")
        no_decay = len(t.shape) == 1 or dotted.endswith(".bias")
        return 1.0, 0.0 if no_decay else 0.05

    tx = optim.pretrain_optimizer(tree, schedule=SCHEDULE)
    _compare_with_torch(tx, tree, groups_of, SCHEDULE, steps=4, betas=(0.9, 0.95))


@pytest.mark.parametrize("tree", _trees(_Classifier), ids=["State", "dict"])
def test_frozen_params_do_not_move_and_have_no_optimizer_state(tree):
    tx = optim.finetune_optimizer(
        tree, schedule=SCHEDULE, num_layers=DEPTH, frozen=optim.linear_probe_frozen
    )
    new, state = _run(tx, tree, steps=4)
    before, after = _named_values(tree), _named_values(new)
    for name in before:
        if name.startswith("head/"):
            assert not np.allclose(after[name], before[name]), name
        else:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    head_size = sum(x.size for n, x in before.items() if n.startswith("head/"))
    state_size = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)
    # Adam mu and nu, for the head only.
    assert state_size == 2 * head_size


def test_frozen_everything_is_rejected():
    tree = _trees(_Classifier)[1]
    with pytest.raises(ValueError, match="frozen"):
        optim.finetune_optimizer(
            tree, schedule=SCHEDULE, num_layers=DEPTH, frozen=lambda name: True
        )


def test_linear_probe_lars_matches_mae_lars_transcription():
    tree = _trees(_Classifier)[1]
    tx = optim.linear_probe_optimizer(tree, schedule=SCHEDULE, weight_decay=0.01)
    new, _ = _run(tx, tree, steps=3)
    values = _named_values(tree)
    mu = {}
    params = {n: v.astype(np.float64) for n, v in values.items() if n.startswith("head/")}
    for step in range(3):
        grads = _named_values(_random_grads(tree, step))
        lr = float(SCHEDULE(step))
        for name, p in params.items():  # MAE util/lars.LARS.step
            dp = grads[name].astype(np.float64)
            if p.ndim > 1:
                dp = dp + 0.01 * p
                pn, un = np.linalg.norm(p), np.linalg.norm(dp)
                dp = dp * (0.001 * pn / un if pn > 0 and un > 0 else 1.0)
            mu[name] = 0.9 * mu.get(name, 0.0) + dp
            params[name] = p - lr * mu[name]
    ours = _named_values(new)
    for name, p in params.items():
        np.testing.assert_allclose(ours[name], p, rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(
        ours["blocks/0/attn/qkv/kernel"], values["blocks/0/attn/qkv/kernel"]
    )


def test_optimizers_run_inside_jit_on_state():
    tree = _trees(_Classifier)[0]
    tx = optim.finetune_optimizer(tree, schedule=SCHEDULE, num_layers=DEPTH)

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = step(tree, tx.init(tree), _random_grads(tree, 0))
    params, _ = step(params, opt_state, _random_grads(tree, 1))
    assert type(params) is type(tree)


# ------------------------------------------------------------------------------------------------
# Overview table
# ------------------------------------------------------------------------------------------------


def test_describe_param_groups_lists_every_group_and_counts_all_params():
    tree = _trees(_Classifier)[0]
    total = sum(x.size for _, x in optim.named_leaves(tree))
    table = optim.describe_param_groups(tree, layer_decay=0.75, num_layers=DEPTH)
    for group in (
        "layer_0_decay",
        "layer_0_no_decay",
        f"layer_{DEPTH + 1}_decay",
        f"layer_{DEPTH + 1}_no_decay",
        "layer_1_decay",
    ):
        assert group in table
    assert f"trainable params: {total:,d}" in table
    probe = optim.describe_param_groups(
        tree, layer_decay=0.75, num_layers=DEPTH, frozen=optim.linear_probe_frozen
    )
    head = 10 * DIM + 10
    assert f"trainable params: {head:,d}   frozen params: {total - head:,d}" in probe
    pretrain = optim.describe_param_groups(_trees(_Pretrain)[0])
    assert "no_decay" in pretrain and "layer_" not in pretrain


# ------------------------------------------------------------------------------------------------
# The real models, when they exist
# ------------------------------------------------------------------------------------------------


TINY = dict(
    variant="tiny",
    img_size=16,
    patch_size=8,
    width=16,
    depth=2,
    num_heads=2,
    decoder_width=8,
    decoder_depth=1,
    decoder_heads=2,
)


def test_pretrain_rules_on_the_real_dmae_model():
    from dmae_jax.models import create_dmae

    params = nnx.state(create_dmae(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    values = _named_values(params)
    assert "pos_embed" not in values and "decoder_pos_embed" not in values  # fixed, not Params
    decayed = {n for n, x in values.items() if optim.pretrain_decays(n, x.ndim)}
    assert decayed == {n for n, x in values.items() if x.ndim > 1}
    assert {"cls_token", "mask_token", "decoder_pred/kernel"} <= decayed
    new, _ = _run(optim.pretrain_optimizer(params, schedule=SCHEDULE), params, steps=2)
    assert type(new) is type(params)


def test_finetune_rules_on_the_real_classifier():
    from dmae_jax.models import create_classifier

    params = nnx.state(create_classifier(TINY, 10, rngs=nnx.Rngs(0)), nnx.Param)
    values = _named_values(params)
    depth = TINY["depth"]
    ids = {n: optim.layer_id(n, depth) for n in values}
    assert {n.split("/")[0] for n, i in ids.items() if i == 0} == {
        "cls_token",
        "pos_embed",
        "patch_embed",
    }
    assert {n.split("/")[0] for n, i in ids.items() if i == depth + 1} == {"fc_norm", "head"}
    assert all(ids[n] == int(n.split("/")[1]) + 1 for n in values if n.startswith("blocks/"))
    no_decay = {n for n, x in values.items() if not optim.finetune_decays(n, x.ndim)}
    assert no_decay == {n for n, x in values.items() if x.ndim == 1} | {"cls_token", "pos_embed"}
    tx = optim.finetune_optimizer(params, schedule=SCHEDULE, num_layers=depth, layer_decay=0.65)
    new, _ = _run(tx, params, steps=2)
    assert type(new) is type(params)
    with pytest.raises(ValueError, match="num_layers"):
        optim.finetune_optimizer(params, schedule=SCHEDULE, num_layers=depth - 1)
