r"""Denoiser calibration (the `calibrate_denoiser` task): a UNet learns against a fixed classifier.

The UNet starts from a UNet export (config.denoiser: `train_denoiser`'s or a converted
official one) and is fine-tuned with the losses of `dmae_jax.diffusion.calibration` against
the classifier of config.classifier, which stays fixed: its parameters are an argument of
the train step, not part of the trained state. Each batch is split into equal chunks, one
per sigma of config.sigmas (so t*(sigma) stays static), with config.num_noise_samples draws
per image. Optimizer, EMA and loop as `train_denoiser`.

  python -m dmae_jax.main --config=configs/calibrate_denoiser_digits.py \
      --workdir=runs/denoise/calib --config.denoiser=runs/denoise/ddpm/export \
      --config.classifier=runs/denoise/clf/export
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmae_jax import checkpoints, checks, exports, metrics, parallel
from dmae_jax.data import datasets
from dmae_jax.diffusion import calibration, denoise, losses
from dmae_jax.models import DTYPES
from dmae_jax.models import classifier as classifier_lib
from dmae_jax.models import unet as unet_lib
from dmae_jax.train import common, optim


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Calibrates a UNet export against a fixed classifier; writes `workdir/export` ("unet")."""
    sigmas = checks.sigmas(config, "sigmas")
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
    schedule = unet_config.schedule()
    pad_to = unet_config.pad_to(config.data.image_size)
    clf_parts, _ = classifier_lib.from_export(config.classifier, field="config.classifier")
    replicated = parallel.replicated(mesh)
    # The fixed classifier: on the devices once, then an argument of every step.
    classifier_params = common.put_global(
        clf_parts.params, jax.tree.map(lambda _: replicated, clf_parts.params))
    common.log_parameter_overview(unet_parts.params, "UNet (trained)")
    common.log_parameter_overview(clf_parts.params, "classifier (fixed)")

    # ------------------------------------------------------------------ Optimizer.
    tx, lr_schedule = optim.denoiser_optimizer(
        lr=config.optim.lr, warmup_steps=config.optim.warmup_steps, total_steps=total_steps,
        b1=config.optim.b1, b2=config.optim.b2, weight_decay=config.optim.weight_decay)

    # ------------------------------------------------------------------ Step.
    def probs_at(unet_params, classifier_params, images, sigma, rng, m=m):
        """Softmax of the classifier on m one-step denoisings of images: [m, b, K]."""
        unet = unet_parts.bind(unet_params)
        classifier = clf_parts.bind(classifier_params)
        copies = jnp.broadcast_to(images, (m,) + images.shape)
        noisy = copies + sigma * jax.random.normal(rng, copies.shape, jnp.float32)
        denoised = denoise.one_shot_denoise(
            lambda x, t: unet(x, t), schedule, noisy.reshape((-1,) + images.shape[1:]), sigma,
            rescale_timesteps=unet_config.rescale_timesteps, pad_to=pad_to)
        logits = classifier(denoised).astype(jnp.float32)
        return jax.nn.softmax(logits).reshape((m, images.shape[0], -1))

    def loss_fn(params, batch, rng, classifier_params):
        images, labels = batch["image"], batch["label"]
        chunk = images.shape[0] // len(sigmas)
        probs, recoverable = [], {}
        for k, sigma in enumerate(sigmas):
            part = slice(k * chunk, (k + 1) * chunk)
            probs.append(probs_at(params, classifier_params, images[part], sigma,
                                  jax.random.fold_in(rng, k)))
        probs = jnp.concatenate(probs, axis=1)
        loss, aux = calibration.calibration_loss(
            probs, labels, lambda_brier=config.lambda_brier, lambda_ac=config.lambda_ac)
        for k, sigma in enumerate(sigmas):
            recoverable[f"recoverable_{sigma:g}"] = aux["recoverable"][
                k * chunk:(k + 1) * chunk].mean()
        terms = {"brier": aux["brier"], "ac": aux["ac"], **recoverable}
        if config.lambda_mse:
            unet = unet_parts.bind(params)
            mse = losses.ddpm_loss(
                lambda x, t, rng: unet(x, t, rng=rng), schedule, 2.0 * images - 1.0,
                jax.random.fold_in(rng, len(sigmas)),
                rescale_timesteps=unet_config.rescale_timesteps)
            loss = loss + config.lambda_mse * mse
            terms["ddpm"] = mse
        return loss, terms

    def make_state(params):
        return common.init_state(params, tx, jax.random.key(config.seed),
                                 ema=bool(config.ema_decay))

    shardings = common.state_shardings(make_state, unet_parts.params, mesh)
    train_step = common.make_train_step(
        loss_fn, tx, mesh=mesh, state_sharding=shardings, accum_steps=config.accum_steps,
        lr_fn=lr_schedule, ema_decay=config.ema_decay, frozen_sharding=replicated)

    def exported(state):
        return state["ema"] if config.ema_decay else state["params"]

    # ------------------------------------------------------------------ Checkpoint.
    ckpt = checkpoints.TrainCheckpointer(workdir, max_to_keep=config.keep_ckpts,
                                         fingerprint=common.fingerprint(config))
    state, first_step = common.restore_or_init(ckpt, make_state, unet_parts.params, shardings,
                                               data_iter, total_steps)

    # ------------------------------------------------------------------ Loop.
    writer = metrics.create_writer(workdir)
    evaluate = _calibration_evaluator(config, mesh, writer, probs_at)
    progress = common.Progress(writer, ckpt, first_step=first_step, total_steps=total_steps,
                               global_batch_size=config.batch_size)
    with (common.StopSignals() as stop, contextlib.closing(ckpt),
          contextlib.closing(writer),
          common.Profiler(config.get("profile_steps"), workdir) as profiler):
        for step in range(first_step + 1, total_steps + 1):
            profiler.step(step, state)
            state, measurements = train_step(
                state, parallel.global_batch(next(data_iter), mesh), classifier_params)
            save = common.every(step, config.ckpt_every_steps, total_steps)
            log = save or step == first_step + 1 or step % config.log_every_steps == 0
            stopping = stop.requested(sync=log)
            if log or stopping:
                progress.report(step, measurements)
            if save or stopping:
                ckpt.save(step, state, {"data_iter": data_iter.get_state()})
            if stopping:
                stop.exit(step, ckpt)
            if evaluate and common.every(step, config.eval_every_steps, total_steps):
                evaluate(step, state, classifier_params)
        exports.save_final(workdir, exported(state), unet_lib.export_meta(
            unet_config, unet_meta.get("preset"), model=config.model.to_dict(),
            calibrated_from=config.denoiser, classifier=config.classifier,
            sigmas=list(sigmas), dataset=config.data.dataset))


# ---------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------


def _calibration_evaluator(config, mesh, writer, probs_at):
    """Eval: per sigma, majority-vote accuracy and the paper's two error kinds.

    Over every eval_skip-th eval image with eval_noise_draws draws: "acc" (majority vote is
    the label), "overconfident" (wrong with vote share > p0) and "oversmoothed" (top vote
    share <= p0: the cascade would go on to a smaller sigma or abstain).
    """
    from dmae_jax.data import pipeline  # Grain: where data is read

    if not config.eval_every_steps:
        return None
    source = datasets.load_source(
        config.data.dataset, config.data.eval_split,
        data_dir=config.data.data_dir, image_size=config.data.image_size)
    sigmas = checks.sigmas(config, "sigmas")
    draws = config.eval_noise_draws

    def counts(params, batch, rng):
        x, y, mask = batch["image"], batch["label"], batch["mask"]
        out = []
        for k, sigma in enumerate(sigmas):
            # One draw at a time (lax.map): memory stays that of one batch at any scale.
            keys = jax.random.split(jax.random.fold_in(rng, k), draws)
            preds = jax.lax.map(lambda key, s=sigma: jnp.argmax(
                probs_at(*params, x, s, key, 1)[0], -1), keys)            # [draws, B]
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

    def evaluate(step, state, classifier_params):
        total, per_sigma = 0.0, np.zeros((len(sigmas), 3))
        rng = jax.random.key(config.seed + 10_000)
        batches = pipeline.eval_batches(
            source, batch_size=config.eval_batch_size // jax.process_count(),
            image_size=config.data.image_size, process_index=jax.process_index(),
            process_count=jax.process_count(), step=config.eval_skip)
        for i, batch in enumerate(batches):
            batch = parallel.global_batch(
                {k: batch[k] for k in ("image", "label", "mask")}, mesh)
            n, c = jitted((state["params"], classifier_params), batch,
                          jax.random.fold_in(rng, i))
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

    return evaluate
