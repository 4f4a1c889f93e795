"""Fine-tuning losses: cross-entropies (timm) and consistency regularization (Jeong & Shin 2020).

All losses cast logits to float32 first (the forward pass may run in bfloat16) and return the
mean over the batch.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _log_probs(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _check_labels(logits: jax.Array, labels: jax.Array) -> None:
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [B, K] and integer labels [B], got {logits.shape} and {labels.shape}"
        )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits [B, K] against integer labels [B]."""
    _check_labels(logits, labels)
    log_probs = _log_probs(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1))


def label_smoothing_cross_entropy(
    logits: jax.Array, labels: jax.Array, smoothing: float
) -> jax.Array:
    """timm LabelSmoothingCrossEntropy: (1-s) * NLL + s * mean_k(-log p_k), averaged over [B]."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    _check_labels(logits, labels)
    log_probs = _log_probs(logits)
    nll = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    smooth = -jnp.mean(log_probs, axis=-1)
    return jnp.mean((1.0 - smoothing) * nll + smoothing * smooth)


def soft_target_cross_entropy(logits: jax.Array, targets_soft: jax.Array) -> jax.Array:
    """timm SoftTargetCrossEntropy: mean over [B] of sum_k -t_k log p_k, logits/targets [B, K]."""
    if logits.shape != targets_soft.shape:
        raise ValueError(
            f"logits and targets_soft must have the same shape [B, K], got {logits.shape} "
            f"and {targets_soft.shape}"
        )
    log_probs = _log_probs(logits)
    return jnp.mean(jnp.sum(-targets_soft.astype(jnp.float32) * log_probs, axis=-1))


def _xlogx(p: jax.Array) -> jax.Array:
    # p log p with value and gradient 0 at p = 0 (xlogy's gradient is NaN there); p = 0 happens
    # when a softmax underflows in float32.
    positive = p > 0
    return jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)


def consistency_loss(
    logits: jax.Array | Sequence[jax.Array], *, lbd: float, eta: float
) -> jax.Array:
    """lbd * mean_i KL(pbar || p_i) + eta * H(pbar), averaged over the batch.

    logits: [m, B, K] (or a list of m arrays [B, K]), the outputs on m noisy copies of the same
    B images; B may be several axes ([m, blocks, b, K]). p_i = softmax(logits_i),
    pbar = mean_i p_i. As the official `util/consistency.py`:
    KL is PyTorch's kl_div(log_softmax(logits_i), pbar) summed over classes, the entropy uses
    log(max(pbar, 1e-20)), and gradients flow through pbar (no stop-gradient).
    """
    if not isinstance(logits, jax.Array):
        logits = jnp.stack(list(logits))
    if logits.ndim < 3 or logits.shape[0] < 2:
        raise ValueError(f"logits must be [m, B, K] with m >= 2, got shape {logits.shape}")
    log_p = _log_probs(logits)
    pbar = jnp.mean(jnp.exp(log_p), axis=0)  # [B, K]
    kl = jnp.sum(_xlogx(pbar)[None] - pbar[None] * log_p, axis=-1)  # [m, B]
    entropy = -jnp.sum(pbar * jnp.log(jnp.maximum(pbar, 1e-20)), axis=-1)  # [B]
    return jnp.mean(lbd * jnp.mean(kl, axis=0) + eta * entropy)


def finetune_loss(
    logits: jax.Array,
    targets: jax.Array,
    *,
    m: int,
    lbd: float,
    eta: float,
    con_reg: bool,
    label_smoothing: float = 0.0,
    blocks: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Classification loss over all m*B rows plus (if con_reg) consistency over the m copies.

    logits: [m*B, K] in the layout [copy0; copy1; ...] (the batch was `repeat`ed m times, as the
    official code), or in `blocks` such blocks, each the m copies of one slice of the images
    (fine-tuning's layout for a batch split over devices). targets: soft [m*B, K] (after
    Mixup/CutMix: SoftTargetCrossEntropy) or integer labels [m*B] (label-smoothing
    cross-entropy if label_smoothing > 0, else plain), in the same layout.
    Returns (loss, {"loss_nat": classification term, "loss_reg": consistency term}).
    """
    if m < 1 or blocks < 1 or logits.shape[0] % (m * blocks):
        raise ValueError(f"m ({m}) times blocks ({blocks}) must divide the batch "
                         f"{logits.shape[0]}")
    if targets.ndim == 2:
        loss_nat = soft_target_cross_entropy(logits, targets)
    elif label_smoothing > 0:
        loss_nat = label_smoothing_cross_entropy(logits, targets, label_smoothing)
    else:
        loss_nat = cross_entropy(logits, targets)
    if con_reg:
        if m < 2:
            raise ValueError(f"con_reg needs m >= 2 noisy copies, got m={m}")
        if blocks == 1:
            copies = logits.reshape(m, -1, logits.shape[-1])
        else:  # [blocks, m, b, K] -> [m, blocks, b, K]: the block axis keeps its devices
            copies = jnp.swapaxes(logits.reshape(blocks, m, -1, logits.shape[-1]), 0, 1)
        loss_reg = consistency_loss(copies, lbd=lbd, eta=eta)
    else:
        loss_reg = jnp.zeros((), jnp.float32)
    return loss_nat + loss_reg, {"loss_nat": loss_nat, "loss_reg": loss_reg}
