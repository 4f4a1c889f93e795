"""Specification of the fine-tuning losses (losses.py) and Mixup/CutMix (mixup.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmae_jax.train import losses, mixup

# ------------------------------------------------------------------------------------------------
# Consistency regularization against the official PyTorch code
# ------------------------------------------------------------------------------------------------


def _torch_consistency(logits: list, lbd: float, eta: float):
    """Transcription of DMAE util/consistency.consistency_loss(loss='default')."""
    m = len(logits)
    softmax = [F.softmax(logit, dim=1) for logit in logits]
    avg_softmax = sum(softmax) / m
    loss_kl = (
        sum(
            F.kl_div(F.log_softmax(logit, dim=1), avg_softmax, reduction="none").sum(1)
            for logit in logits
        )
        / m
    )
    loss_ent = (-avg_softmax * torch.log(avg_softmax.clamp(min=1e-20))).sum(1)
    return (lbd * loss_kl + eta * loss_ent).mean()


@pytest.mark.parametrize("m", [2, 3])
def test_consistency_loss_and_gradient_match_the_official_torch_code(m):
    rng = np.random.default_rng(m)
    logits = (3 * rng.standard_normal((m, 6, 5))).astype(np.float32)
    lbd, eta = 2.0, 0.5
    torch_logits = [torch.tensor(x, requires_grad=True) for x in logits]
    expected = _torch_consistency(torch_logits, lbd, eta)
    expected.backward()
    expected_grad = np.stack([t.grad.numpy() for t in torch_logits])

    value, grad = jax.value_and_grad(lambda x: losses.consistency_loss(x, lbd=lbd, eta=eta))(
        jnp.asarray(logits)
    )
    np.testing.assert_allclose(value, expected.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
    # A list of m arrays [B, K] is the same as the stacked [m, B, K].
    as_list = losses.consistency_loss([jnp.asarray(x) for x in logits], lbd=lbd, eta=eta)
    np.testing.assert_allclose(as_list, value, rtol=1e-6)


def test_consistency_gradient_flows_through_the_mean_prediction():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)), jnp.float32)
    with_grad = jax.grad(lambda x: losses.consistency_loss(x, lbd=1.0, eta=0.0))(logits)

    def detached(x):  # the same loss with pbar treated as a constant
        log_p = jax.nn.log_softmax(x)
        pbar = jax.lax.stop_gradient(jnp.mean(jnp.exp(log_p), axis=0))
        return jnp.mean(jnp.mean(jnp.sum(pbar * (jnp.log(pbar) - log_p), -1), 0))

    assert not np.allclose(with_grad, jax.grad(detached)(logits), atol=1e-4)


def test_consistency_is_zero_for_identical_confident_copies_and_finite_when_softmax_underflows():
    copy = jnp.array([[0.0, -300.0, -300.0]])  # softmax underflows to exactly [1, 0, 0]
    logits = jnp.stack([copy, copy])
    value, grad = jax.value_and_grad(lambda x: losses.consistency_loss(x, lbd=2.0, eta=0.5))(logits)
    assert float(value) == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.isfinite(grad))
    split = jnp.stack([copy, copy[:, ::-1]])
    assert np.all(
        np.isfinite(jax.grad(lambda x: losses.consistency_loss(x, lbd=2.0, eta=0.5))(split))
    )


def test_consistency_rejects_a_single_copy():
    with pytest.raises(ValueError, match="m >= 2"):
        losses.consistency_loss(jnp.zeros((1, 4, 3)), lbd=2.0, eta=0.5)


# ------------------------------------------------------------------------------------------------
# Cross-entropies
# ------------------------------------------------------------------------------------------------


def _logits_and_labels(batch=8, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = (2 * rng.standard_normal((batch, classes))).astype(np.float32)
    labels = rng.integers(0, classes, batch)
    return logits, labels


def test_cross_entropies_match_torch():
    logits, labels = _logits_and_labels()
    t_logits, t_labels = torch.tensor(logits), torch.tensor(labels)
    np.testing.assert_allclose(
        losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
        F.cross_entropy(t_logits, t_labels).item(),
        rtol=1e-6,
    )
    # timm LabelSmoothingCrossEntropy equals torch's label_smoothing (off value s/K).
    np.testing.assert_allclose(
        losses.label_smoothing_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1),
        F.cross_entropy(t_logits, t_labels, label_smoothing=0.1).item(),
        rtol=1e-6,
    )


def test_soft_target_cross_entropy_on_smoothed_one_hot_equals_label_smoothing():
    logits, labels = _logits_and_labels()
    targets = mixup.smooth_one_hot(jnp.asarray(labels), 5, 0.1)
    np.testing.assert_allclose(
        losses.soft_target_cross_entropy(jnp.asarray(logits), targets),
        losses.label_smoothing_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1),
        rtol=1e-6,
    )


def test_losses_are_float32_for_bfloat16_logits():
    logits, labels = _logits_and_labels()
    value = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert value.dtype == jnp.float32
    stacked = jnp.asarray(logits, jnp.bfloat16).reshape(2, 4, 5)
    assert losses.consistency_loss(stacked, lbd=2.0, eta=0.5).dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# The fine-tuning objective
# ------------------------------------------------------------------------------------------------


def test_finetune_loss_is_criterion_over_all_rows_plus_consistency_over_copy_blocks():
    m, batch, classes = 2, 4, 5
    logits, labels = _logits_and_labels(m * batch, classes, seed=3)
    labels = np.tile(labels[:batch], m)  # targets.repeat(m) as the official code
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    loss, metrics = losses.finetune_loss(
        logits, labels, m=m, lbd=2.0, eta=0.5, con_reg=True, label_smoothing=0.1
    )
    nat = losses.label_smoothing_cross_entropy(logits, labels, 0.1)
    # [copy0; copy1]: rows 0..B-1 are copy 0, rows B..2B-1 copy 1 (not interleaved).
    reg = losses.consistency_loss([logits[:batch], logits[batch:]], lbd=2.0, eta=0.5)
    np.testing.assert_allclose(metrics["loss_nat"], nat, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_reg"], reg, rtol=1e-6)
    np.testing.assert_allclose(loss, nat + reg, rtol=1e-6)
    interleaved = losses.consistency_loss([logits[0::2], logits[1::2]], lbd=2.0, eta=0.5)
    assert not np.isclose(float(metrics["loss_reg"]), float(interleaved))


def test_finetune_loss_uses_soft_targets_and_drops_consistency_without_con_reg():
    logits, labels = _logits_and_labels(8, 5, seed=4)
    soft = mixup.mixup_target(jnp.asarray(labels), 5, jnp.float32(0.7), 0.1)
    loss, metrics = losses.finetune_loss(
        jnp.asarray(logits), soft, m=2, lbd=2.0, eta=0.5, con_reg=False
    )
    np.testing.assert_allclose(loss, losses.soft_target_cross_entropy(jnp.asarray(logits), soft))
    assert float(metrics["loss_reg"]) == 0.0
    with pytest.raises(ValueError, match="divide"):
        losses.finetune_loss(jnp.asarray(logits), soft, m=3, lbd=2.0, eta=0.5, con_reg=True)


# ------------------------------------------------------------------------------------------------
# Mixup / CutMix
# ------------------------------------------------------------------------------------------------

BATCH, SIDE, CLASSES = 6, 16, 4


def _constant_images():
    """Image i is filled with the value i, so every output pixel says where it came from."""
    values = jnp.arange(BATCH, dtype=jnp.float32)
    return jnp.broadcast_to(values[:, None, None, None], (BATCH, SIDE, SIDE, 3))


LABELS = jnp.array([0, 1, 2, 3, 0, 1])


_jit_mix = jax.jit(
    mixup.mix,
    static_argnames=(
        "num_classes",
        "mixup_alpha",
        "cutmix_alpha",
        "prob",
        "switch_prob",
        "mode",
        "correct_lam",
        "label_smoothing",
    ),
)


def _mix(rng, **kwargs):
    kwargs.setdefault("num_classes", CLASSES)
    return _jit_mix(_constant_images(), LABELS, rng, **kwargs)


def test_targets_are_distributions_with_timm_smoothing_values():
    for seed in range(5):
        _, targets, _, _ = _mix(jax.random.key(seed))
        np.testing.assert_allclose(jnp.sum(targets, -1), 1.0, rtol=1e-6)
    _, targets, lam, _ = _mix(jax.random.key(0), mixup_alpha=0.0, cutmix_alpha=0.0)
    off = 0.1 / CLASSES
    np.testing.assert_allclose(targets, np.where(np.eye(CLASSES)[LABELS] > 0, 1 - 0.1 + off, off))
    np.testing.assert_array_equal(lam, 1.0)


def test_mixup_blends_each_row_with_the_flipped_batch():
    images = _constant_images()
    out, targets, lam, use_cutmix = _mix(jax.random.key(1), cutmix_alpha=0.0)
    assert not bool(use_cutmix.any())
    expected = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images[::-1]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(targets, mixup.mixup_target(LABELS, CLASSES, lam, 0.1), rtol=1e-6)


def test_cutmix_lam_is_the_fraction_of_pixels_kept_from_the_row_itself():
    images = _constant_images()
    for seed in range(20):
        out, _, lam, use_cutmix = _mix(jax.random.key(seed), mixup_alpha=0.0, mode="elem")
        assert bool(use_cutmix.all())
        own = (out[..., 0] == images[..., 0]).mean(axis=(1, 2))
        partner = (out[..., 0] == images[::-1, ..., 0]).mean(axis=(1, 2))
        np.testing.assert_allclose(own, lam, atol=1e-6)
        np.testing.assert_allclose(own + partner, 1.0)


def _timm_box(cy, cx, lam, side):
    """timm rand_bbox for a given centre (numpy, float64)."""
    cut = int(side * np.sqrt(1 - lam))
    return (
        np.clip(cy - cut // 2, 0, side),
        np.clip(cy + cut // 2, 0, side),
        np.clip(cx - cut // 2, 0, side),
        np.clip(cx + cut // 2, 0, side),
    )


def test_rand_bbox_follows_timm_sampling_and_clipping():
    lam = 0.3
    boxes = jax.vmap(
        lambda k: jnp.stack(mixup.rand_bbox(k, jnp.float32(lam), height=SIDE, width=SIDE))
    )(jax.random.split(jax.random.key(0), 5000))
    timm_boxes = {_timm_box(cy, cx, lam, SIDE) for cy in range(SIDE) for cx in range(SIDE)}
    drawn = {tuple(int(v) for v in box) for box in np.asarray(boxes)}
    assert drawn <= timm_boxes
    assert len(drawn) == len(timm_boxes)  # every centre is reachable (uniform over the grid)


def test_pair_and_elem_modes_share_parameters_as_timm():
    _, _, lam, use_cutmix = _mix(jax.random.key(3), mode="pair")
    np.testing.assert_array_equal(lam, lam[::-1])
    np.testing.assert_array_equal(use_cutmix, use_cutmix[::-1])
    _, _, lam, _ = _mix(jax.random.key(3), mode="elem", cutmix_alpha=0.0)
    assert len(set(np.asarray(lam).tolist())) == BATCH
    _, _, lam, _ = _mix(jax.random.key(3), mode="batch")
    assert len(set(np.asarray(lam).tolist())) == 1


def test_repeated_noisy_batch_gives_both_copies_the_same_targets():
    x = jax.random.uniform(jax.random.key(0), (BATCH // 2, SIDE, SIDE, 3))
    labels = jnp.array([0, 1, 2])
    e1, e2 = jax.random.normal(jax.random.key(1), (2, BATCH // 2, SIDE, SIDE, 3)) * 0.25
    noisy = jnp.concatenate([x + e1, x + e2])
    out, targets, lam, _ = _jit_mix(
        noisy, jnp.tile(labels, 2), jax.random.key(2), num_classes=CLASSES, cutmix_alpha=0.0
    )
    np.testing.assert_allclose(targets[:3], targets[3:])
    # Copy 0 minus copy 1 is noise only: the same clean mixture in both copies.
    lam = float(lam[0])
    expected = lam * (e1 - e2) + (1 - lam) * (e2[::-1] - e1[::-1])
    np.testing.assert_allclose(out[:3] - out[3:], expected, atol=1e-5)


def test_lam_statistics_over_many_draws():
    draws = 4000
    keys = jax.random.split(jax.random.key(0), draws)
    images, labels = _constant_images()[:2, :4, :4], LABELS[:2]

    def params(key, **kwargs):
        _, _, lam, use_cutmix = mixup.mix(images, labels, key, num_classes=CLASSES, **kwargs)
        return lam[0], use_cutmix[0]

    lam, _ = jax.vmap(lambda k: params(k, cutmix_alpha=0.0))(keys)
    beta_var = 0.8 * 0.8 / ((1.6**2) * 2.6)  # Beta(0.8, 0.8)
    assert float(lam.mean()) == pytest.approx(0.5, abs=5 * math.sqrt(beta_var / draws))
    assert float(lam.var()) == pytest.approx(beta_var, rel=0.1)
    _, use_cutmix = jax.vmap(lambda k: params(k))(keys)
    assert float(use_cutmix.mean()) == pytest.approx(0.5, abs=0.04)
    lam, _ = jax.vmap(lambda k: params(k, prob=0.3, cutmix_alpha=0.0))(keys)
    assert float((lam == 1.0).mean()) == pytest.approx(0.7, abs=0.04)


def test_mixup_is_deterministic_per_rng_and_jittable():
    fn = jax.jit(
        lambda images, labels, rng: mixup.mixup_fn(images, labels, rng, num_classes=CLASSES)
    )
    a = fn(_constant_images(), LABELS, jax.random.key(7))
    b = fn(_constant_images(), LABELS, jax.random.key(7))
    c = fn(_constant_images(), LABELS, jax.random.key(8))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])


def test_mixup_rejects_an_odd_batch():
    with pytest.raises(ValueError, match="even batch size, got 5"):
        mixup.mixup_fn(_constant_images()[:5], LABELS[:5], jax.random.key(0), num_classes=CLASSES)
