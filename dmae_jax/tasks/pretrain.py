"""DMAE pretraining: noise (sigma = 0.25) + 75% masking, reconstruct the clean image.

Reads top to bottom like big_vision's train.py: mesh, data, model, optimizer, step,
checkpoint restore, then the loop. The run path (`dmae_jax.tasks`) has checked the config,
taken the workdir's lock and recorded the config before `run` is called.
`python -m dmae_jax.main --config=configs/vit_large.py --workdir=gs://bucket/dmae_l`.
"""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from dmae_jax import checkpoints, exports, metrics, parallel, storage, visualize
from dmae_jax.data import datasets
from dmae_jax.models import ModelParts, create_dmae
from dmae_jax.train import common, optim


def make_optimizer(config: ml_collections.ConfigDict, params, *, steps_per_epoch: int,
                   total_steps: int):
    """(AdamW, lr schedule) of pretraining; `params` may be abstract (shapes only):
    `dmae_jax.aot` compiles this very step."""
    schedule = optim.lr_schedule(
        base_lr=config.optim.base_lr, global_batch_size=config.batch_size,
        total_steps=total_steps,
        warmup_steps=common.warmup_steps(config.optim.warmup_epochs, steps_per_epoch,
                                         total_steps),
        min_lr=config.optim.min_lr,
    )
    tx = optim.pretrain_optimizer(
        params, schedule=schedule, weight_decay=config.optim.weight_decay,
        b1=config.optim.b1, b2=config.optim.b2,
    )
    return tx, schedule


def make_loss_fn(config: ml_collections.ConfigDict, parts):
    """`loss_fn(params, batch, rng) -> (loss, aux)` of pretraining (`parts`: the DMAE's
    `ModelParts`); `dmae_jax.aot` compiles this very loss."""

    def loss_fn(params, batch, rng):
        out = parts.bind(params)(
            batch["image"], sigma=config.sigma, mask_ratio=config.mask_ratio, rng=rng)
        return out.loss, {}

    return loss_fn


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Pretrains DMAE and writes `workdir/export` (the encoder-decoder's parameters)."""
    # ------------------------------------------------------------------ Mesh.
    mesh = parallel.make_mesh(config.mesh.fsdp)
    parallel.check_batch_size(config.batch_size, "config.batch_size", config.accum_steps)

    # ------------------------------------------------------------------ Data.
    data = common.train_data(config)
    data_iter, steps_per_epoch, total_steps = (
        data.iterator, data.steps_per_epoch, data.total_steps)
    logging.info("%d examples, %d steps/epoch, %d steps", data.num_examples, steps_per_epoch,
                 total_steps)

    # ------------------------------------------------------------------ Model.
    model = create_dmae(config.model, rngs=nnx.Rngs(config.seed))
    parts = ModelParts.split(model)
    if config.get("init_from"):
        # Continued pretraining: every parameter from the export (shapes must agree).
        loaded, _ = exports.load_checked(config.init_from, kind="dmae", field="config.init_from")
        parts = parts.with_params(loaded, where=f"config.init_from = {config.init_from!r}")
    params = parts.params
    common.log_parameter_overview(params, "DMAE")

    # ------------------------------------------------------------------ Optimizer.
    tx, schedule = make_optimizer(config, params, steps_per_epoch=steps_per_epoch,
                                  total_steps=total_steps)

    # ------------------------------------------------------------------ Step.
    loss_fn = make_loss_fn(config, parts)

    def make_state(params):
        return common.init_state(params, tx, jax.random.key(config.seed))

    shardings = common.state_shardings(make_state, params, mesh)
    train_step = common.make_train_step(
        loss_fn, tx, mesh=mesh, state_sharding=shardings, accum_steps=config.accum_steps,
        lr_fn=schedule, steps_per_call=config.steps_per_call)

    # ------------------------------------------------------------------ Checkpoint.
    ckpt = checkpoints.TrainCheckpointer(workdir, max_to_keep=config.keep_ckpts,
                                         fingerprint=common.fingerprint(config))
    state, first_step = common.restore_or_init(ckpt, make_state, params, shardings, data_iter,
                                               total_steps)

    # ------------------------------------------------------------------ Loop.
    writer = metrics.create_writer(workdir)
    evaluate = _reconstruction_writer(config, workdir, parts, writer)
    progress = common.Progress(writer, ckpt, first_step=first_step, total_steps=total_steps,
                               global_batch_size=config.batch_size)
    with (common.StopSignals() as stop, contextlib.closing(ckpt),
          contextlib.closing(writer),
          common.Profiler(config.get("profile_steps"), workdir) as profiler):
        for first, step in common.calls(first_step, total_steps, config.steps_per_call,
                                        (config.ckpt_every_steps, config.eval_every_steps),
                                        profiler.ends):
            profiler.step(first, state)
            state, measurements = common.run_steps(
                train_step, state, data_iter.next_batches(step - first + 1), mesh,
                config.steps_per_call)
            save = common.every(step, config.ckpt_every_steps, total_steps)
            logged = common.log_steps(first, step, first_step, config.log_every_steps)
            stopping = stop.requested(sync=save or bool(logged))
            progress.report_steps(logged, measurements, first, step, save or stopping)
            if save or stopping:
                ckpt.save(step, state, {"data_iter": data_iter.get_state()})
            if stopping:
                stop.exit(step, ckpt)
            if evaluate and common.every(step, config.eval_every_steps, total_steps):
                evaluate(step, state)
        path = exports.save_final(workdir, state["params"],
                                  {"kind": "dmae", "model": config.model.to_dict()})
    logging.info("exported dmae parameters to %s", path)


def flat_blocks(model, noisy: jax.Array, mask: jax.Array, sigma: float) -> jax.Array:
    """The flat-block baseline [B, img_size, img_size, C] in [0, 1]: every patch one colour,
    taken from what the reconstruction of the masked patches is given.

    A norm-pix DMAE's masked patches are un-normalised with the noisy input patch's own mean
    and scale (`pred_to_images`), so its baseline is the reconstruction of a prediction of
    zeros: each patch at its noisy mean, the grey blocks the model shows when it predicts
    nothing. A DMAE with pixel targets gets no per-patch statistics, so its baseline is the
    mean colour of the image's visible (noisy) patches. `noisy` [B, H, W, C] is the
    encoder's input in [0, 1], `mask` [B, L] (1 = masked).
    """
    if model.norm_pix_loss:
        zeros = jnp.zeros((noisy.shape[0], model.num_patches,
                           model.patch_size**2 * model.in_chans), jnp.float32)
        return model.pred_to_images(zeros, noisy, sigma)
    x = model.preprocess(noisy) * jnp.asarray(model.std) + jnp.asarray(model.mean)
    b, h, w, c = x.shape
    patches = model.patchify(x).reshape(b, model.num_patches, -1, c)
    visible = (1.0 - mask.astype(jnp.float32))[:, :, None, None]
    colour = jnp.sum(visible * patches, axis=(1, 2)) / (
        jnp.maximum(jnp.sum(visible, axis=(1, 2)), 1.0) * patches.shape[2])
    return jnp.broadcast_to(jnp.clip(colour, 0.0, 1.0)[:, None, None, :], x.shape)


def masked_patch_errors(clean: jax.Array, recon: jax.Array, flat: jax.Array, mask: jax.Array,
                        patch_size: int) -> tuple[jax.Array, jax.Array]:
    """(MSE of `recon`, MSE of `flat`) against `clean` over the masked patches only, [0, 1]
    pixel units; images [B, H, W, C], `mask` [B, L] (1 = masked, patches row-major)."""
    b, h, w, c = clean.shape
    p = patch_size

    def per_patch(image):  # squared error, [B, H, W, C] -> [B, L]
        err = jnp.square(image.astype(jnp.float32) - clean.astype(jnp.float32))
        return jnp.mean(err.reshape(b, h // p, p, w // p, p, c), axis=(2, 4, 5)).reshape(b, -1)

    mask = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(mask * per_patch(recon)) / count, jnp.sum(mask * per_patch(flat)) / count


def _reconstruction_writer(config, workdir, parts, writer):
    """Eval hook: reconstruction loss and masked-patch errors on a fixed batch, a PNG grid.

    The errors (`masked_patch_errors`: the reconstruction against `flat_blocks`) are
    measured on the first eval_batch_size eval images, written to TensorBoard and to
    workdir/reconstructions/step_<step>.json next to the grid. Grid rows (the first
    num_grid_images): clean; noisy with the masked patches grey (the encoder's input); the
    reconstruction from it; the whole noisy image; DMAE's reconstruction of it with nothing
    masked (DMAE as a one-step denoiser).
    """
    from dmae_jax.data import pipeline  # Grain: where data is read (not in compile-only mode)

    if not config.eval_every_steps:
        return None
    source = datasets.load_source(
        config.data.dataset, config.data.eval_split,
        data_dir=config.data.data_dir, image_size=config.data.image_size,
    )
    num_eval = min(config.eval_batch_size, len(source))
    n = min(config.num_grid_images, num_eval)
    # The same images on every process (parameters are gathered): process_count=1.
    batch = next(iter(pipeline.eval_batches(source, batch_size=num_eval,
                                            image_size=config.data.image_size,
                                            process_index=0, process_count=1)))
    images = batch["image"]
    rng = jax.random.key(config.seed + 1)

    @jax.jit
    def reconstruct(params):
        model = parts.bind(params)
        noise = jax.random.normal(jax.random.fold_in(rng, 1), images.shape)
        out = model(images, sigma=config.sigma, mask_ratio=config.mask_ratio, noise=noise,
                    rng=rng)
        noisy = images + config.sigma * noise
        recon = model.pred_to_images(out.pred, noisy, config.sigma)
        clean = model.preprocess(images) * jnp.asarray(model.std) + jnp.asarray(model.mean)
        flat = flat_blocks(model, noisy, out.mask, config.sigma)
        errors = masked_patch_errors(clean, recon, flat, out.mask, model.patch_size)
        return (out.loss, errors, out.mask[:n], noisy[:n], recon[:n],
                model.reconstruct(noisy[:n], config.sigma))

    def evaluate(step, state):
        params = exports.gather(state["params"])
        loss, (mse, flat_mse), mask, noisy, recon, denoised = jax.device_get(
            reconstruct(params))
        writer.write_scalars(step, {"eval_loss": float(loss), "eval_masked_mse": float(mse),
                                    "eval_masked_mse_flat": float(flat_mse)})
        if jax.process_index() == 0:
            grid = visualize.image_grid(
                [images[:n], visualize.masked_view(noisy, mask, config.model.patch_size), recon,
                 noisy, denoised],
                scale=max(1, 96 // config.data.image_size),
                labels=["clean", f"noisy, {config.mask_ratio:.0%} masked (input)",
                        "reconstruction", f"noisy (sigma {config.sigma:g})",
                        "reconstruction, unmasked"],
            )
            path = f"{workdir}/reconstructions/step_{step:06d}.png"
            visualize.save_png(path, grid)
            storage.write_atomic(f"{workdir}/reconstructions/step_{step:06d}.json", json.dumps(
                {"step": step, "images": num_eval, "masked_mse": float(mse),
                 "flat_block_mse": float(flat_mse),
                 "norm_pix_loss": bool(config.model.norm_pix_loss)}))
            writer.write_images(step, {"reconstructions": grid})
            logging.info("eval_loss=%.4f, masked-patch MSE %.4f (flat blocks %.4f), "
                         "reconstruction grid %s", loss, mse, flat_mse, path)

    return evaluate
