r"""Denoiser calibration losses: pure functions of a frozen classifier's probabilities.

Denoiser calibration (Jeong & Shin 2023, Sec. 3; the `calibrate_denoiser` task) fine-tunes a
UNet against a frozen classifier f so that one-shot denoising at every sigma of the cascade
(a) denoises consistently to the label where the image is recoverable at that sigma and
(b) gives diverse, unconfident votes where it is not, so the cascade abstains there and
hands the input to a smaller sigma. The paper does not publish its exact losses; these are
our design. For a batch of b images (x_i, y_i), each with one sigma_i of the cascade, and
M draws per image:

    x_hat_ij = D_theta(x_i + delta_ij; t*(sigma_i)),  delta_ij ~ N(0, sigma_i^2 I)  (one step)
    q_ij     = softmax(f(x_hat_ij))                    [K], gradients reach theta only
    c_i      = argmax_c #{j : argmax q_ij = c}         majority vote (no gradient)
    r_i      = 1[c_i = y_i]                            "recoverable at sigma_i"
    Brier_i  = (1/M) sum_j || q_ij - e_{y_i} ||^2
    AC_i     = pbar_i[c_i]^2,  pbar_i = (1/M) sum_j q_ij
    L = lambda_brier (1/b) sum_i r_i Brier_i + lambda_ac (1/b) sum_i (1 - r_i) AC_i
        + lambda_mse L_DDPM(clean batch)

The anti-consistency term AC is the Brier score, against 0, of the wrong majority class's
soft smoothed confidence: it lowers that confidence (the quantity the cascade compares with
p0), its gradient 2 pbar[c] fades as the votes spread, and it names no replacement class, so
the mass goes wherever the classifier finds it (diverse outputs). Both sums are divided by
the whole batch, so each term weighs as often as it occurs. L_DDPM on the clean images keeps
the denoiser a denoiser (it would otherwise drift towards whatever fools f).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def majority_vote(probs: jax.Array) -> jax.Array:
    """probs [M, B, K] of M noise draws -> the most voted class [B] (lowest index on ties)."""
    num_classes = probs.shape[-1]
    votes = jax.nn.one_hot(jnp.argmax(probs, -1), num_classes).sum(0)
    return jnp.argmax(votes, -1)


def brier_score(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """(1/M) sum_j ||q_j - e_y||^2 per image: probs [M, B, K], labels [B] -> [B]."""
    target = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
    return jnp.square(probs - target).sum(-1).mean(0)


def anti_consistency(probs: jax.Array, wrong_class: jax.Array) -> jax.Array:
    """pbar[c]^2 per image, pbar = mean_j q_j: probs [M, B, K], wrong_class [B] -> [B]."""
    pbar = probs.mean(0)
    return jnp.square(jnp.take_along_axis(pbar, wrong_class[:, None], -1)[:, 0])


def calibration_loss(
    probs: jax.Array, labels: jax.Array, *, lambda_brier: float, lambda_ac: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Brier on recoverable images + anti-consistency on the others (module docstring).

    probs [M, B, K]: softmax of the classifier on M denoised noisy copies of each image.
    Returns (loss, {"brier", "ac", "recoverable" [B] bool}); the two terms are batch means
    over all B images (zero where they do not apply).
    """
    majority = jax.lax.stop_gradient(majority_vote(probs))
    recoverable = majority == labels
    brier = jnp.where(recoverable, brier_score(probs, labels), 0.0).mean()
    ac = jnp.where(recoverable, 0.0, anti_consistency(probs, majority)).mean()
    loss = lambda_brier * brier + lambda_ac * ac
    return loss, {"brier": brier, "ac": ac, "recoverable": recoverable}
