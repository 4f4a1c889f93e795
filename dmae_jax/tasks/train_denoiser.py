r"""DDPM training of a diffusion denoiser (the `train_denoiser` task).

An ADM UNet preset trained as Ho et al. 2020 (L_simple, plus improved-diffusion's L_vlb when
the preset learns the variance) on a data set's training images mapped to [-1, 1].
Optimizer as improved-diffusion: AdamW at a constant lr (theirs: 1e-4, batch 128, no weight
decay) after an optional linear warm-up, and an exponential moving average of the weights
(theirs: 0.9999), kept in the training state next to the params; the average is what gets
exported. Eval steps write the one-shot denoising MSE at config.eval_sigmas and a PNG grid
(clean / noisy / denoised per sigma).

  python -m dmae_jax.main --config=configs/train_denoiser_digits.py --workdir=runs/denoise/ddpm
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dmae_jax import checkpoints, checks, exports, metrics, parallel, visualize
from dmae_jax.architectures import UNET_PRESETS
from dmae_jax.data import datasets
from dmae_jax.diffusion import denoise, losses
from dmae_jax.models import DTYPES, ModelParts
from dmae_jax.models import unet as unet_lib
from dmae_jax.models.unet import UNet
from dmae_jax.train import common, optim


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """DDPM training of `config.model.preset`; exports the EMA weights (or the raw ones)."""
    # ------------------------------------------------------------------ Mesh.
    mesh = parallel.make_mesh(config.mesh.fsdp)
    parallel.check_batch_size(config.batch_size, "config.batch_size", config.accum_steps)

    # ------------------------------------------------------------------ Data.
    data = common.train_data(config)
    data_iter, total_steps = data.iterator, data.total_steps

    # ------------------------------------------------------------------ Model.
    unet_config = UNET_PRESETS[config.model.preset]
    schedule = unet_config.schedule()
    model = UNet(unet_config, dtype=DTYPES[config.model.dtype], rngs=nnx.Rngs(config.seed))
    parts = ModelParts.split(model)
    common.log_parameter_overview(parts.params, f"UNet {config.model.preset}")

    # ------------------------------------------------------------------ Optimizer.
    tx, lr_schedule = optim.denoiser_optimizer(
        lr=config.optim.lr, warmup_steps=config.optim.warmup_steps, total_steps=total_steps,
        b1=config.optim.b1, b2=config.optim.b2, weight_decay=config.optim.weight_decay)

    # ------------------------------------------------------------------ Step.
    def loss_fn(params, batch, rng):
        model = parts.bind(params)
        terms = losses.ddpm_loss_terms(
            lambda x, t, rng: model(x, t, rng=rng), schedule, 2.0 * batch["image"] - 1.0,
            rng, rescale_timesteps=unet_config.rescale_timesteps)
        return terms["loss"], {"mse": terms["mse"], "vb": terms["vb"]}

    def make_state(params):
        return common.init_state(params, tx, jax.random.key(config.seed),
                                 ema=bool(config.ema_decay))

    shardings = common.state_shardings(make_state, parts.params, mesh)
    train_step = common.make_train_step(
        loss_fn, tx, mesh=mesh, state_sharding=shardings, accum_steps=config.accum_steps,
        lr_fn=lr_schedule, ema_decay=config.ema_decay)

    def exported(state):
        return state["ema"] if config.ema_decay else state["params"]

    # ------------------------------------------------------------------ Checkpoint.
    ckpt = checkpoints.TrainCheckpointer(workdir, max_to_keep=config.keep_ckpts,
                                         fingerprint=common.fingerprint(config))
    state, first_step = common.restore_or_init(ckpt, make_state, parts.params, shardings,
                                               data_iter, total_steps)

    # ------------------------------------------------------------------ Loop.
    writer = metrics.create_writer(workdir)
    evaluate = _denoising_writer(config, workdir, parts, unet_config, schedule, writer,
                                 exported)
    progress = common.Progress(writer, ckpt, first_step=first_step, total_steps=total_steps,
                               global_batch_size=config.batch_size)
    with (common.StopSignals() as stop, contextlib.closing(ckpt),
          contextlib.closing(writer),
          common.Profiler(config.get("profile_steps"), workdir) as profiler):
        for step in range(first_step + 1, total_steps + 1):
            profiler.step(step, state)
            state, measurements = train_step(state, parallel.global_batch(next(data_iter), mesh))
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
                evaluate(step, state)
        exports.save_final(workdir, exported(state), unet_lib.export_meta(
            unet_config, config.model.preset, model=config.model.to_dict(),
            ema_decay=config.ema_decay, dataset=config.data.dataset))


# ---------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------


def _eval_images(config, n: int) -> np.ndarray:
    """The first n images of the eval split, [n, S, S, 3] in [0, 1]."""
    from dmae_jax.data import pipeline  # Grain: where data is read

    source = datasets.load_source(
        config.data.dataset, config.data.eval_split,
        data_dir=config.data.data_dir, image_size=config.data.image_size)
    batch = next(iter(pipeline.eval_batches(
        source, batch_size=min(n, len(source)), image_size=config.data.image_size)))
    return batch["image"]


def _denoising_writer(config, workdir, parts, unet_config, schedule, writer, exported):
    """Eval hook: one-shot denoising MSE at each eval sigma and a PNG grid of examples."""
    if not config.eval_every_steps:
        return None
    images = _eval_images(config, config.eval_batch_size)
    sigmas = checks.sigmas(config, "eval_sigmas")
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

    def evaluate_at(step, state):
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

    return evaluate_at
