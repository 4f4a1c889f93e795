"""Linear probing as MAE's `main_linprobe.py` (which DMAE uses unchanged).

The classifier is built with `global_pool=False`: the cls token after the pretrained final
`norm` (kept, not re-initialised) is the feature. The head becomes
`BatchNorm1d(D, affine=False, eps=1e-6)` followed by the Linear head, whose weight is
re-initialised with std 0.01 (bias 0); everything but the head is frozen (LARS on the head).

BatchNorm, as PyTorch runs it: in training each batch is normalised by its own mean and
biased variance (per GPU in the official run: 512 images, here `group_size` images);
evaluation uses running statistics. The encoder is frozen and has no dropout, so the feature
distribution does not change during training and the running statistics converge to its
mean and (unbiased) variance; here they are estimated once, before training, over a few
training batches (augmented and noised as in training) instead of PyTorch's exponential
average over the last batches (the only deviation: a different estimate of the same
population statistics). For the export, BatchNorm is folded into the Linear layer, so the
exported classifier is a plain `Classifier(global_pool=False)` that certification loads
like any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmae_jax import parallel
from dmae_jax.models import classifier as classifier_lib

BN_EPS = 1e-6  # MAE: BatchNorm1d(..., affine=False, eps=1e-6)
HEAD_INIT_STD = 0.01  # MAE: trunc_normal_(head.weight, std=0.01) (cut-offs +-2 never bind)


class BatchNormHead(nnx.Module):
    """Affine-free BatchNorm then the linear head; __call__ uses the stored statistics."""

    def __init__(self, linear: nnx.Linear, width: int):
        self.linear = linear
        self.mean = nnx.BatchStat(jnp.zeros((width,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((width,), jnp.float32))

    def __call__(self, features: jax.Array) -> jax.Array:
        """Evaluation: features [B, D] normalised by the stored statistics -> logits [B, K]."""
        return self.linear((features - self.mean.value) / jnp.sqrt(self.var.value + BN_EPS))

    def train_logits(self, features: jax.Array, group_size: int = 0) -> jax.Array:
        """Training: each group of `group_size` rows (0: all) normalised by its own mean and
        biased variance, as BatchNorm1d in train mode on each GPU's batch."""
        n = features.shape[0]
        group = group_size or n
        if n % group:
            raise ValueError(f"group_size must divide the batch ({n}), got {group_size}")
        x = features.reshape(n // group, group, -1)
        mean = x.mean(axis=1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=1, keepdims=True)
        return self.linear(((x - mean) / jnp.sqrt(var + BN_EPS)).reshape(n, -1))


def make_probe(classifier: nnx.Module, dmae_params: Mapping[str, Any], rng: jax.Array) -> None:
    """In place: encoder and final `norm` from the DMAE, head N(0, 0.01) / 0, BN head added."""
    if classifier.global_pool:
        raise ValueError("linear probing uses the cls token: model.global_pool must be False")
    if "norm" not in dmae_params:
        raise ValueError("dmae_params lacks the encoder's final 'norm' that linear probing keeps")
    classifier_lib.init_from_dmae(classifier, dmae_params)
    for name in ("scale", "bias"):
        value = jnp.asarray(dmae_params["norm"][name], jnp.float32)
        target = getattr(classifier.norm, name)
        if target.value.shape != value.shape:
            raise ValueError(f"dmae_params[norm/{name}] has shape {value.shape}, the "
                             f"classifier expects {target.value.shape}")
        target.value = value
    head = classifier.head
    head.kernel.value = HEAD_INIT_STD * jax.random.normal(rng, head.kernel.value.shape)
    head.bias.value = jnp.zeros_like(head.bias.value)
    classifier.head = BatchNormHead(head, head.kernel.value.shape[0])


def set_statistics(classifier: nnx.Module, mean: np.ndarray, var: np.ndarray) -> None:
    """Stores the BatchNorm statistics used by evaluation and by `fold`."""
    classifier.head.mean.value = jnp.asarray(mean, jnp.float32)
    classifier.head.var.value = jnp.asarray(var, jnp.float32)


def fold(params: Mapping[str, Any], mean: np.ndarray, var: np.ndarray) -> dict:
    """Probe parameters (head = {linear: {kernel, bias}}) -> plain classifier parameters with
    BatchNorm folded in: kernel / sqrt(var + eps), bias - (mean / sqrt(var + eps)) @ kernel."""
    params = dict(params)
    linear = params.pop("head")["linear"]
    inv = 1.0 / np.sqrt(np.asarray(var, np.float64) + BN_EPS)
    kernel = np.asarray(linear["kernel"], np.float64) * inv[:, None]
    bias = np.asarray(linear["bias"], np.float64) - (np.asarray(mean, np.float64) @ kernel)
    params["head"] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
    return params


def estimate_statistics(parts, batches: Iterable[dict], *, num_batches: int, sigma: float,
                        rng: jax.Array, mesh) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and unbiased variance [D] over `num_batches` training batches, noised at
    `sigma` as in training (global arrays: the same statistics on every process).

    `parts` is the probe's ModelParts; `batches` yields local batches as the train iterator.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")

    def moments(params, images, key):
        noisy = images + sigma * jax.random.normal(key, images.shape)
        feats = parts.bind(params).features(noisy).astype(jnp.float32)
        mean = feats.mean(0)
        return mean, jnp.square(feats - mean).sum(0)

    jitted = jax.jit(moments, in_shardings=(None, parallel.batch_sharding(mesh), None),
                     out_shardings=parallel.replicated(mesh))
    count, mean, m2 = 0, 0.0, 0.0
    for i, batch in zip(range(num_batches), batches, strict=False):
        images = parallel.global_batch({"image": batch["image"]}, mesh)["image"]
        b_mean, b_m2 = (np.asarray(v, np.float64) for v in
                        jitted(parts.params, images, jax.random.fold_in(rng, i)))
        n = images.shape[0]
        delta = b_mean - mean  # Chan et al.'s pairwise combination
        mean = mean + delta * n / (count + n)
        m2 = m2 + b_m2 + np.square(delta) * count * n / (count + n)
        count += n
    if count < 2:
        raise ValueError("the training data gave fewer than 2 images for the statistics")
    return np.asarray(mean, np.float32), np.asarray(m2 / (count - 1), np.float32)


def train_logits(model: nnx.Module, images: jax.Array, group_size: int = 0) -> jax.Array:
    """Training-mode probe logits: frozen features, BatchNorm on batch (group) statistics."""
    return model.head.train_logits(model.features(images), group_size)
