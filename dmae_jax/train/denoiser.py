r"""Diffusion denoisers: DDPM training ("train_denoiser") and calibration ("finetune_denoiser").

train_denoiser: DDPM training of an ADM UNet preset (Ho et al. 2020; L_simple, plus
improved-diffusion's L_vlb when the preset learns the variance) on a data set's training
images mapped to [-1, 1]. Optimizer as improved-diffusion: Adam(W) at a constant lr (theirs:
1e-4, batch 128, no weight decay) after an optional linear warm-up, and an EMA of the weights
(theirs: 0.9999), which is what gets exported. Eval steps write the one-shot denoising MSE at
config.eval_sigmas and a PNG grid (clean / noisy / denoised per sigma).

finetune_denoiser, "diffusion calibration" (Jeong & Shin 2023, Sec. 3): the UNet starts from
a UNet export (config.denoiser) and learns against a frozen classifier f (config.classifier)
so that one-shot denoising at every sigma of the cascade (a) denoises consistently to the
label where the image is recoverable at that sigma and (b) gives diverse, unconfident votes
where it is not, so the cascade abstains there and hands the input to a smaller sigma. The
paper's exact losses are not public; this is our design (reference/multiscale.md §3). For
a batch of b images (x_i, y_i), split into equal chunks with one sigma of config.sigmas
each (t*(sigma) stays static), M = config.num_noise_samples draws per image:

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

  python -m dmae_jax.main --config=configs/denoiser_digits.py --workdir=runs/denoise/ddpm
  python -m dmae_jax.main --config=configs/calibrate_digits.py --workdir=runs/denoise/calib \
      --config.denoiser=runs/denoise/ddpm/export --config.classifier=runs/denoise/clf/export
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dmae_jax import config as C
from dmae_jax import exports, metrics, parallel, visualize
from dmae_jax.train import common

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------------------
# Calibration losses (pure functions of the frozen classifier's probabilities).
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field of `train_denoiser` or `finetune_denoiser` before any work."""
    from dmae_jax.data import datasets

    C.one_of(config, "task", ("train_denoiser", "finetune_denoiser"))
    C.one_of(config, "data.dataset", datasets.DATASETS)
    C.one_of(config, "data.augment", ("rrc_flip", "flip", "none"))
    C.positive(config, "data.image_size")
    C.one_of(config, "model.dtype", tuple(DTYPES))
    C.positive(config, "batch_size")
    C.positive(config, "accum_steps")
    if not config.get("total_steps"):
        C.positive(config, "num_epochs")
    C.positive(config, "optim.lr")
    C.positive(config, "optim.weight_decay", allow_zero=True)
    C.positive(config, "optim.warmup_steps", allow_zero=True)
    C.in_range(config, "optim.b1", 0.0, 1.0)
    C.in_range(config, "optim.b2", 0.0, 1.0)
    C.in_range(config, "ema_decay", 0.0, 1.0)
    C.training_loop(config)
    if config.task == "train_denoiser":
        _validate_train(config)
    else:
        _validate_calibration(config)


def _validate_train(config) -> None:
    from dmae_jax.models.unet import UNET_PRESETS

    C.one_of(config, "model.preset", sorted(UNET_PRESETS))
    unet_config = UNET_PRESETS[config.model.preset]
    if config.data.image_size != unet_config.image_size:
        raise C.ConfigError(
            f"config.data.image_size must be the UNet preset's resolution "
            f"({unet_config.image_size} for {config.model.preset!r}): a DDPM trains at its "
            f"own size, got {config.data.image_size}")
    _check_sigmas(config, "eval_sigmas", unet_config)
    C.positive(config, "num_grid_images")
    C.positive(config, "eval_batch_size")


def _validate_calibration(config) -> None:
    from dmae_jax.data import datasets
    from dmae_jax.models.unet import UNetConfig

    _, meta = exports.load_checked(config.denoiser, kind="unet", field="config.denoiser")
    unet_config = UNetConfig.from_dict(meta["config"])
    _, clf_meta = exports.load_checked(config.classifier, kind="classifier",
                                       field="config.classifier")
    expected = datasets.num_classes(config.data.dataset)
    if clf_meta.get("num_classes") != expected:
        raise C.ConfigError(
            f"config.classifier = {config.classifier!r} has {clf_meta.get('num_classes')} "
            f"classes, config.data.dataset {config.data.dataset!r} has {expected}")
    sigmas = _check_sigmas(config, "sigmas", unet_config)
    C.positive(config, "num_noise_samples")
    for field in ("lambda_brier", "lambda_ac", "lambda_mse"):
        C.positive(config, field, allow_zero=True)
    if config.lambda_brier == 0 and config.lambda_ac == 0:
        raise C.ConfigError(
            "config.lambda_brier and config.lambda_ac are both 0: nothing would calibrate "
            "the denoiser (use task train_denoiser for plain DDPM training)")
    if config.batch_size % (len(sigmas) * config.accum_steps):
        raise C.ConfigError(
            f"config.batch_size must be a multiple of len(config.sigmas) = {len(sigmas)} "
            f"times config.accum_steps = {config.accum_steps} (one equal chunk per sigma in "
            f"every micro-batch), got {config.batch_size}")
    _check_padding(config.data.image_size, unet_config)
    C.in_range(config, "p0", 1e-12, 1.0)
    C.positive(config, "eval_batch_size")
    C.positive(config, "eval_noise_draws")
    C.positive(config, "eval_skip")


def _check_sigmas(config, field: str, unet_config) -> tuple[float, ...]:
    from dmae_jax.diffusion.loading import unet_schedule
    from dmae_jax.diffusion.schedule import timestep_for_sigma

    sigmas = C.sigmas(config, field)
    schedule = unet_schedule(unet_config)
    for s in sigmas:
        try:
            timestep_for_sigma(schedule, s)
        except ValueError as e:
            raise C.ConfigError(f"config.{field}: {e}") from None
    return sigmas


def _check_padding(image_size: int, unet_config) -> None:
    from dmae_jax.diffusion.loading import pad_to_for

    pad_to = pad_to_for(image_size, unet_config.image_size)
    if pad_to is not None and ((pad_to - image_size) % 2 or (pad_to - image_size) // 2
                               >= image_size):
        raise C.ConfigError(
            f"config.data.image_size = {image_size} cannot be reflection-padded to the UNet's "
            f"{pad_to}: the sizes must differ by an even number less than twice the image size")


# ---------------------------------------------------------------------------------------
# Pieces both tasks share.
# ---------------------------------------------------------------------------------------


class EmaState(NamedTuple):
    """Optimizer state plus an exponential moving average of the parameters."""

    inner: optax.OptState
    ema: optax.Params


def with_ema(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
    """`tx` that also keeps ema <- decay * ema + (1 - decay) * params after each update.

    The average lives in the optimizer state, so checkpoints and resumption carry it.
    """

    def init(params):
        return EmaState(tx.init(params), jax.tree.map(jnp.asarray, params))

    def update(updates, state, params=None):
        updates, inner = tx.update(updates, state.inner, params)
        new_params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, new_params)
        return updates, EmaState(inner, ema)

    return optax.GradientTransformation(init, update)


def _optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW at a constant lr after a linear warm-up (improved-diffusion: 1e-4, wd 0)."""
    lr = config.optim.lr
    warmup = min(int(config.optim.warmup_steps), total_steps // 2)
    if warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    else:
        schedule = optax.constant_schedule(lr)
    tx = optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2,
                     weight_decay=config.optim.weight_decay)
    return tx, schedule


def _loop(config, total_steps: int) -> common.LoopConfig:
    return common.LoopConfig(
        total_steps=total_steps, log_every=config.log_every_steps,
        ckpt_every=config.ckpt_every_steps, keep_ckpts=config.keep_ckpts,
        global_batch_size=config.batch_size, eval_every=config.eval_every_steps)


def _unet_meta(config, unet_config, preset: str | None, **extra) -> dict:
    # The fields `dmae_jax.diffusion.convert` writes, so both kinds of export load alike.
    return {"kind": "unet", "model": config.model.to_dict(), "preset": preset,
            "config": unet_config.to_dict(), **extra}


# ---------------------------------------------------------------------------------------
# Tasks.
# ---------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs config.task; writes `workdir/export` (kind "unet")."""
    if config.task == "train_denoiser":
        train(config, workdir)
    else:
        calibrate(config, workdir)


def train(config: ml_collections.ConfigDict, workdir: str) -> None:
    """DDPM training of `config.model.preset`; exports the EMA weights (or the raw ones)."""
    from dmae_jax.diffusion import losses
    from dmae_jax.diffusion.loading import unet_schedule
    from dmae_jax.models import ModelParts
    from dmae_jax.models.unet import UNET_PRESETS, UNet

    # ------------------------------------------------------------------ Mesh.
    mesh = parallel.make_mesh(config.mesh.fsdp)
    parallel.check_batch_size(config.batch_size, "config.batch_size", config.accum_steps)

    # ------------------------------------------------------------------ Data.
    data = common.train_data(config)
    data_iter, total_steps = data.iterator, data.total_steps

    # ------------------------------------------------------------------ Model.
    unet_config = UNET_PRESETS[config.model.preset]
    schedule = unet_schedule(unet_config)
    model = UNet(unet_config, dtype=DTYPES[config.model.dtype], rngs=nnx.Rngs(config.seed))
    parts = ModelParts.split(model)
    common.log_parameter_overview(parts.params, f"UNet {config.model.preset}")

    # ------------------------------------------------------------------ Optimizer.
    tx, schedule_lr = _optimizer(config, total_steps)
    if config.ema_decay:
        tx = with_ema(tx, config.ema_decay)

    # ------------------------------------------------------------------ Step.
    def loss_fn(params, batch, rng):
        model = parts.bind(params)
        terms = losses.ddpm_loss_terms(
            lambda x, t, rng: model(x, t, rng=rng), schedule, 2.0 * batch["image"] - 1.0,
            rng, rescale_timesteps=unet_config.rescale_timesteps)
        return terms["loss"], {"mse": terms["mse"], "vb": terms["vb"]}

    def step_builder(shardings):
        return common.make_train_step(
            loss_fn, tx, mesh=mesh, state_sharding=shardings,
            accum_steps=config.accum_steps, lr_fn=schedule_lr)

    def exported(state):
        return state["opt_state"].ema if config.ema_decay else state["params"]

    writer = metrics.create_writer(workdir)
    eval_fn = _denoising_writer(config, workdir, parts, unet_config, schedule, writer,
                                exported)

    # ------------------------------------------------------------------ Loop.
    state = common.run_training(
        workdir=workdir, loop=_loop(config, total_steps), mesh=mesh,
        step_builder=step_builder, init_params=parts.params,
        make_state=lambda p: common.init_state(p, tx, jax.random.key(config.seed)),
        data_iter=data_iter, fingerprint=_fingerprint(config), writer=writer, eval_fn=eval_fn)
    exports.save_final(workdir, exported(state), _unet_meta(
        config, unet_config, config.model.preset, ema_decay=config.ema_decay,
        dataset=config.data.dataset))


def calibrate(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Diffusion calibration of a UNet export against a frozen classifier (module docs)."""
    from dmae_jax.diffusion import denoise, losses
    from dmae_jax.diffusion.loading import pad_to_for, unet_schedule
    from dmae_jax.models import classifier as classifier_lib
    from dmae_jax.models import unet as unet_lib

    sigmas = C.sigmas(config, "sigmas")
    m = config.num_noise_samples

    # ------------------------------------------------------------------ Mesh.
    mesh = parallel.make_mesh(config.mesh.fsdp)
    parallel.check_batch_size(config.batch_size, "config.batch_size", config.accum_steps)

    # ------------------------------------------------------------------ Data.
    data = common.train_data(config)
    data_iter, total_steps = data.iterator, data.total_steps

    # ------------------------------------------------------------------ Models.
    unet_parts, unet_config, unet_meta = unet_lib.from_export(
        config.denoiser, field="config.denoiser", dtype=DTYPES[config.model.dtype])
    schedule = unet_schedule(unet_config)
    pad_to = pad_to_for(config.data.image_size, unet_config.image_size)
    clf_parts, _ = classifier_lib.from_export(config.classifier, field="config.classifier")
    params = {"unet": unet_parts.params, "classifier": clf_parts.params}
    common.log_parameter_overview(params["unet"], "UNet (trained)")
    common.log_parameter_overview(params["classifier"], "classifier (frozen)")

    # ------------------------------------------------------------------ Optimizer.
    inner, schedule_lr = _optimizer(config, total_steps)
    if config.ema_decay:
        inner = with_ema(inner, config.ema_decay)
    tx = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()},
                               {"unet": "train", "classifier": "frozen"})

    # ------------------------------------------------------------------ Step.
    def probs_at(params, images, sigma, rng, m=m):
        """Softmax of the frozen classifier on m one-step denoisings of images: [m, b, K]."""
        unet = unet_parts.bind(params["unet"])
        classifier = clf_parts.bind(jax.lax.stop_gradient(params["classifier"]))
        copies = jnp.broadcast_to(images, (m,) + images.shape)
        noisy = copies + sigma * jax.random.normal(rng, copies.shape, jnp.float32)
        denoised = denoise.one_shot_denoise(
            lambda x, t: unet(x, t), schedule, noisy.reshape((-1,) + images.shape[1:]), sigma,
            rescale_timesteps=unet_config.rescale_timesteps, pad_to=pad_to)
        logits = classifier(denoised).astype(jnp.float32)
        return jax.nn.softmax(logits).reshape((m, images.shape[0], -1))

    def loss_fn(params, batch, rng):
        images, labels = batch["image"], batch["label"]
        chunk = images.shape[0] // len(sigmas)
        probs, recoverable = [], {}
        for k, sigma in enumerate(sigmas):
            part = slice(k * chunk, (k + 1) * chunk)
            probs.append(probs_at(params, images[part], sigma, jax.random.fold_in(rng, k)))
        probs = jnp.concatenate(probs, axis=1)
        loss, aux = calibration_loss(probs, labels, lambda_brier=config.lambda_brier,
                                     lambda_ac=config.lambda_ac)
        for k, sigma in enumerate(sigmas):
            recoverable[f"recoverable_{sigma:g}"] = aux["recoverable"][
                k * chunk:(k + 1) * chunk].mean()
        metrics = {"brier": aux["brier"], "ac": aux["ac"], **recoverable}
        if config.lambda_mse:
            unet = unet_parts.bind(params["unet"])
            mse = losses.ddpm_loss(
                lambda x, t, rng: unet(x, t, rng=rng), schedule, 2.0 * images - 1.0,
                jax.random.fold_in(rng, len(sigmas)),
                rescale_timesteps=unet_config.rescale_timesteps)
            loss = loss + config.lambda_mse * mse
            metrics["ddpm"] = mse
        return loss, metrics

    def step_builder(shardings):
        return common.make_train_step(
            loss_fn, tx, mesh=mesh, state_sharding=shardings,
            accum_steps=config.accum_steps, lr_fn=schedule_lr)

    def exported(state):
        if config.ema_decay:
            # multi_transform masks the frozen branch out of the inner state's trees.
            return state["opt_state"].inner_states["train"].inner_state.ema["unet"]
        return state["params"]["unet"]

    writer = metrics.create_writer(workdir)
    eval_fn = _calibration_evaluator(config, mesh, writer, probs_at)

    # ------------------------------------------------------------------ Loop.
    state = common.run_training(
        workdir=workdir, loop=_loop(config, total_steps), mesh=mesh,
        step_builder=step_builder, init_params=params,
        make_state=lambda p: common.init_state(p, tx, jax.random.key(config.seed)),
        data_iter=data_iter, fingerprint=_fingerprint(config), writer=writer, eval_fn=eval_fn)
    exports.save_final(workdir, exported(state), _unet_meta(
        config, unet_config, unet_meta.get("preset"), calibrated_from=config.denoiser,
        classifier=config.classifier, sigmas=list(sigmas), dataset=config.data.dataset))


def _fingerprint(config) -> dict:
    base = {"task": config.task, "model": config.model.to_dict(),
            "batch_size": config.batch_size, "ema_decay": config.ema_decay}
    if config.task == "finetune_denoiser":
        base.update(denoiser=config.denoiser, classifier=config.classifier,
                    sigmas=list(C.sigmas(config, "sigmas")), m=config.num_noise_samples)
    return base


# ---------------------------------------------------------------------------------------
# Evaluation hooks.
# ---------------------------------------------------------------------------------------


def _eval_images(config, n: int) -> np.ndarray:
    """The first n images of the eval split, [n, S, S, 3] in [0, 1]."""
    from dmae_jax.data import datasets, pipeline

    source = datasets.load_source(
        config.data.dataset, config.data.eval_split,
        data_dir=config.data.data_dir, image_size=config.data.image_size)
    batch = next(iter(pipeline.eval_batches(
        source, batch_size=min(n, len(source)), image_size=config.data.image_size)))
    return batch["image"]


def _denoising_writer(config, workdir, parts, unet_config, schedule, writer, exported):
    """Eval hook: one-shot denoising MSE at each eval sigma and a PNG grid of examples."""
    from dmae_jax.diffusion import denoise

    if not config.eval_every_steps:
        return None
    images = _eval_images(config, config.eval_batch_size)
    sigmas = C.sigmas(config, "eval_sigmas")
    rng = jax.random.key(config.seed + 1)

    @jax.jit
    def evaluate(params):
        model = parts.bind(params)
        out = []
        for k, sigma in enumerate(sigmas):
            noisy = images + sigma * jax.random.normal(jax.random.fold_in(rng, k), images.shape)
            denoised = denoise.one_shot_denoise(
                lambda x, t: model(x, t), schedule, noisy, sigma,
                rescale_timesteps=unet_config.rescale_timesteps)
            out.append((noisy, denoised, jnp.square(denoised - images).mean()))
        return out

    def eval_fn(step, state):
        results = jax.device_get(evaluate(exports.to_host(exported(state))))
        metrics = {f"eval_mse_sigma_{s:g}": float(r[2])
                   for s, r in zip(sigmas, results, strict=True)}
        writer.write_scalars(step, metrics)
        if jax.process_index() == 0:
            n = config.num_grid_images
            rows, labels = [images[:n]], ["clean"]
            for sigma, (noisy, denoised, _) in zip(sigmas, results, strict=True):
                rows += [noisy[:n], denoised[:n]]
                labels += [f"noisy (sigma {sigma:g})", f"denoised (sigma {sigma:g})"]
            path = f"{workdir}/denoising/step_{step:06d}.png"
            grid = visualize.image_grid(rows, scale=max(1, 64 // config.data.image_size),
                                        labels=labels)
            visualize.save_png(path, grid)
            writer.write_images(step, {"denoising": grid})
            print(f"step {step} eval: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                  + f" grid {path}", flush=True)

    return eval_fn


def _calibration_evaluator(config, mesh, writer, probs_at):
    """Eval hook: per sigma, majority-vote accuracy and the paper's two error kinds.

    Over every eval_skip-th eval image with eval_noise_draws draws: "acc" (majority vote is
    the label), "overconfident" (wrong with vote share > p0) and "oversmoothed" (top vote
    share <= p0: the cascade would go on to a smaller sigma or abstain).
    """
    from dmae_jax.data import datasets, pipeline

    if not config.eval_every_steps:
        return None
    source = datasets.load_source(
        config.data.dataset, config.data.eval_split,
        data_dir=config.data.data_dir, image_size=config.data.image_size)
    sigmas = C.sigmas(config, "sigmas")
    draws = config.eval_noise_draws

    def counts(params, batch, rng):
        x, y, mask = batch["image"], batch["label"], batch["mask"]
        out = []
        for k, sigma in enumerate(sigmas):
            # One draw at a time (lax.map): memory stays that of one batch at any scale.
            keys = jax.random.split(jax.random.fold_in(rng, k), draws)
            preds = jax.lax.map(lambda key, s=sigma: jnp.argmax(
                probs_at(params, x, s, key, 1)[0], -1), keys)            # [draws, B]
            votes = jax.nn.one_hot(preds, num_classes).sum(0)           # [B, K]
            top, share = jnp.argmax(votes, -1), votes.max(-1) / draws
            out.append(jnp.stack([
                jnp.sum(mask * (top == y)),
                jnp.sum(mask * ((top != y) & (share > config.p0))),
                jnp.sum(mask * (share <= config.p0)),
            ]))
        return jnp.sum(mask), jnp.stack(out)

    num_classes = datasets.num_classes(config.data.dataset)
    jitted = jax.jit(counts, in_shardings=(None, parallel.batch_sharding(mesh), None),
                     out_shardings=parallel.replicated(mesh))

    def eval_fn(step, state):
        total, per_sigma = 0.0, np.zeros((len(sigmas), 3))
        rng = jax.random.key(config.seed + 10_000)
        batches = pipeline.eval_batches(
            source, batch_size=config.eval_batch_size // jax.process_count(),
            image_size=config.data.image_size, process_index=jax.process_index(),
            process_count=jax.process_count(), step=config.eval_skip)
        for i, batch in enumerate(batches):
            batch = parallel.global_batch(
                {k: batch[k] for k in ("image", "label", "mask")}, mesh)
            n, c = jitted(state["params"], batch, jax.random.fold_in(rng, i))
            total += float(n)
            per_sigma += np.asarray(c)
        per_sigma /= max(total, 1.0)
        metrics = {}
        for sigma, (acc, over, smooth) in zip(sigmas, per_sigma, strict=True):
            metrics.update({f"eval_acc_{sigma:g}": acc, f"eval_overconfident_{sigma:g}": over,
                            f"eval_oversmoothed_{sigma:g}": smooth})
        writer.write_scalars(step, metrics)
        if jax.process_index() == 0:
            print(f"step {step} eval: " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()),
                  flush=True)

    return eval_fn
