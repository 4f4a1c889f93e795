"""Fine-tuning the base classifier of a Gaussian-smoothed model, as the official DMAE code.

Per step: each image appears as m = 2 copies with independent N(0, sigma^2) noise in [0,1]
pixel space, then Mixup/CutMix on the noisy batch (the official order: the noise is added
before the images are mixed), then cross-entropy over all copies + lambda * KL(pbar || p_i)
+ eta * H(pbar). Layer-wise lr decay, drop path, AdamW (0.9, 0.999). `config.linear_probe`
freezes the encoder instead (LARS on the head, as MAE's linear probing).

`python -m dmae_jax.main --config=configs/finetune_imagenet.py:variant=base,sigma=0.25 ...`
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from dmae_jax import checkpoints, exports, metrics, parallel
from dmae_jax.data import datasets
from dmae_jax.models import ModelParts, create_classifier, linprobe
from dmae_jax.models import classifier as classifier_lib
from dmae_jax.train import common, losses, mixup, optim, selection


def make_optimizer(config: ml_collections.ConfigDict, params, *, num_layers: int,
                   steps_per_epoch: int, total_steps: int):
    """(optimizer, lr schedule) of fine-tuning or linear probing.

    `params` may be abstract (shapes only): `dmae_jax.aot` compiles this very step.
    """
    schedule = optim.lr_schedule(
        base_lr=config.optim.base_lr, global_batch_size=config.batch_size,
        total_steps=total_steps,
        warmup_steps=common.warmup_steps(config.optim.warmup_epochs, steps_per_epoch,
                                         total_steps),
        min_lr=config.optim.min_lr,
    )
    if config.linear_probe:
        tx = optim.linear_probe_optimizer(
            params, schedule=schedule, weight_decay=config.optim.weight_decay)
    else:
        tx = optim.finetune_optimizer(
            params, schedule=schedule, weight_decay=config.optim.weight_decay,
            b1=config.optim.b1, b2=config.optim.b2, layer_decay=config.optim.layer_decay,
            num_layers=num_layers,
        )
    return tx, schedule


def copy_blocks(config: ml_collections.ConfigDict, batch_shards: int) -> int:
    """How many blocks the step's m * B noisy rows are laid out in (see `make_loss_fn`).

    One block per batch shard keeps every image's copies on the device that holds the
    image; it needs the Mixup/CutMix groups to lie inside a shard. Whole-batch mixing
    (mixup_group_size 0) pairs images across devices, and linear probing's BatchNorm groups
    are defined on the single-block layout: both use one block.
    """
    group = config.mixup_group_size
    per_shard = config.batch_size // config.accum_steps // batch_shards
    mixing = bool(config.mixup or config.cutmix)
    if config.linear_probe or (mixing and (not group or per_shard % group)):
        return 1
    return batch_shards


def make_loss_fn(config: ml_collections.ConfigDict, parts, num_classes: int,
                 batch_shards: int = 1):
    """`loss_fn(params, batch, rng) -> (loss, aux)` of the fine-tuning step (`parts`: the
    classifier's `ModelParts`); `dmae_jax.aot` compiles this very loss.

    The m noisy copies of the batch's B images are m * B rows, laid out in
    `copy_blocks(config, batch_shards)` blocks: block d holds the m copies of the d-th slice
    of the batch, [x_d + e_1; x_d + e_2], as each GPU of the official DDP run repeated its own
    images. With one block per batch shard (`batch_shards`: the devices the batch is split
    over) no image moves between devices; with one block it is the official single-GPU
    [x + e_1; x + e_2]. The noise of copy c of image i, the Mixup/CutMix draws and the loss do
    not depend on the layout.
    """
    m = config.num_noise_samples
    use_mix = bool(config.mixup or config.cutmix)
    blocks = copy_blocks(config, batch_shards)

    def repeat(x):  # [B, ...] -> [m * B, ...] in `blocks` blocks of [x_d; x_d; ...]
        if blocks == 1:
            return jnp.concatenate([x] * m)
        x = x.reshape((blocks, 1, -1) + x.shape[1:])
        return jnp.broadcast_to(x, (blocks, m) + x.shape[2:]).reshape((-1,) + x.shape[3:])

    def loss_fn(params, batch, rng):
        noise_rng, mix_rng, drop_rng = jax.random.split(rng, 3)
        images, labels = repeat(batch["image"]), repeat(batch["label"])
        # The noise of copy c of image i is element [c, i] of one [m, B, ...] draw, whatever
        # the layout.
        noise = jax.random.normal(noise_rng, (m,) + batch["image"].shape)
        if blocks == 1:
            noise = noise.reshape(images.shape)
        else:
            noise = noise.reshape((m, blocks, -1) + noise.shape[2:])
            noise = jnp.swapaxes(noise, 0, 1).reshape(images.shape)
        noisy = images + config.sigma * noise
        if use_mix:
            noisy, targets = mixup.mixup_fn(
                noisy, labels, mix_rng, num_classes=num_classes, mixup_alpha=config.mixup,
                cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                group_size=config.mixup_group_size, copies=m, blocks=blocks)
        else:
            targets = labels
        if config.linear_probe:
            logits = linprobe.train_logits(parts.bind(params), noisy, config.probe_bn_group_size)
        else:
            logits = parts.bind(params)(noisy, rng=drop_rng)
        return losses.finetune_loss(
            logits, targets, m=m, lbd=config.lbd, eta=config.eta, con_reg=config.con_reg,
            label_smoothing=config.label_smoothing, blocks=blocks)

    return loss_fn


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Fine-tunes a classifier; writes `workdir/export` (kind "classifier")."""
    run_together([config], [workdir])


# Fields in which fine-tunings trained together may differ: what each run's loss and
# initial parameters depend on, nothing the data order, the keys or the schedule do.
TOGETHER_FIELDS = ("sigma", "eta", "init_from")


def run_together(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str]) -> None:
    """Fine-tunes one classifier per config in one loop; each workdir gets what `run` writes
    there (checkpoints, events, evaluations, export) and resumes as `run` does. The run path
    (`dmae_jax.tasks.execute.run_together`) has checked each config, taken each workdir's
    lock and recorded each config.

    The configs may differ only in `TOGETHER_FIELDS` (e.g. the pipeline's sigmas): the runs
    then read the same batches in the same order and draw the same keys at every step, so
    one input pipeline and one dispatch serve them all, and the step holds one step per run,
    each computing exactly what it computes alone (`common.make_train_step`). They must
    resume from the same step; when the newest checkpoints differ (a kill that landed
    while the runs were saving), each run is trained on alone from its own.
    """
    config = configs[0]  # what every run shares: data, batch, schedule, loop, seed
    _check_together(configs)
    several = len(configs) > 1

    # ------------------------------------------------------------------ Mesh.
    mesh = parallel.make_mesh(config.mesh.fsdp)
    parallel.check_batch_size(config.batch_size, "config.batch_size", config.accum_steps)

    # ------------------------------------------------------------------ Data.
    num_classes = datasets.num_classes(config.data.dataset)
    data = common.train_data(config)
    data_iter, steps_per_epoch, total_steps = (
        data.iterator, data.steps_per_epoch, data.total_steps)

    # ------------------------------------------------------------------ Models.
    parts, probe_stats, num_layers = [], [], 0
    for cfg in configs:
        model = create_classifier(cfg.model, num_classes, rngs=nnx.Rngs(cfg.seed))
        num_layers = len(model.blocks)
        if cfg.init_from:
            dmae_params, _ = exports.load_checked(
                cfg.init_from, kind="dmae", field="config.init_from")
            if cfg.linear_probe:  # + pretrained norm, head std 0.01, BatchNorm head
                linprobe.make_probe(model, dmae_params, jax.random.key(cfg.seed))
            else:
                classifier_lib.init_from_dmae(model, dmae_params)
            logging.info("encoder initialised from %s", cfg.init_from)
        stats = None
        if cfg.linear_probe:  # BatchNorm statistics of the frozen features, once
            stats_data = common.train_data(cfg)
            stats = linprobe.estimate_statistics(
                ModelParts.split(model), stats_data.iterator,
                num_batches=cfg.probe_stat_batches, sigma=cfg.sigma,
                rng=jax.random.key(cfg.seed + 1), mesh=mesh)
            stats_data.iterator.close()
            linprobe.set_statistics(model, *stats)
        parts.append(ModelParts.split(model))
        probe_stats.append(stats)
    common.log_parameter_overview(parts[0].params, "classifier"
                                  + (f" (x{len(configs)}, trained together)" if several else ""))

    # ------------------------------------------------------------------ Optimizer.
    optimizers = [make_optimizer(cfg, p.params, num_layers=num_layers,
                                 steps_per_epoch=steps_per_epoch, total_steps=total_steps)
                  for cfg, p in zip(configs, parts, strict=True)]
    txs = tuple(tx for tx, _ in optimizers)
    logging.info("parameter groups:\n%s", optim.describe_param_groups(
        parts[0].params, layer_decay=config.optim.layer_decay, num_layers=num_layers))

    # ------------------------------------------------------------------ Step.
    loss_fns = tuple(make_loss_fn(cfg, p, num_classes, batch_shards=mesh.size)
                     for cfg, p in zip(configs, parts, strict=True))
    make_states = [functools.partial(common.init_state, tx=tx, rng=jax.random.key(cfg.seed))
                   for cfg, tx in zip(configs, txs, strict=True)]
    shardings = tuple(common.state_shardings(make, p.params, mesh)
                      for make, p in zip(make_states, parts, strict=True))
    train_step = common.make_train_step(
        loss_fns, txs, mesh=mesh, state_sharding=shardings, accum_steps=config.accum_steps,
        lr_fn=tuple(schedule for _, schedule in optimizers),
        steps_per_call=config.steps_per_call)

    # ------------------------------------------------------------------ Evaluation.
    writers = [metrics.create_writer(w) for w in workdirs]
    export_metas = [{"kind": "classifier", "model": cfg.model.to_dict(),
                     "num_classes": num_classes, "sigma": cfg.sigma,
                     "dataset": cfg.data.dataset} for cfg in configs]
    export_params = [(lambda p, s=stats: linprobe.fold(exports.to_host(p), *s))
                     if stats is not None else (lambda p: p) for stats in probe_stats]
    mixed_inits = len({cfg.init_from for cfg in configs}) > 1
    names = [f"sigma={cfg.sigma}" + (", random init" if mixed_inits and not cfg.init_from
                                     else "") if several else "" for cfg in configs]
    evaluators = [make_evaluator(
        cfg, p, mesh, num_classes, writer, name=name,
        best=(selection.BestExport(w, meta, export) if cfg.select == "best_vote" else None))
        for cfg, p, writer, name, w, meta, export in zip(
            configs, parts, writers, names, workdirs, export_metas, export_params, strict=True)]

    # ------------------------------------------------------------------ Checkpoint.
    ckpts = [checkpoints.TrainCheckpointer(w, max_to_keep=cfg.keep_ckpts,
                                           fingerprint=common.fingerprint(cfg))
             for cfg, w in zip(configs, workdirs, strict=True)]
    restored = [common.restore_or_init(ckpt, make, p.params, sh, data_iter, total_steps)
                for ckpt, make, p, sh in zip(ckpts, make_states, parts, shardings, strict=True)]
    states = tuple(state for state, _ in restored)
    first_step = restored[0][1]
    if any(step != first_step for _, step in restored):
        for closing in (*ckpts, *writers, data_iter):
            closing.close()
        for cfg, w in zip(configs, workdirs, strict=True):
            run_together([cfg], [w])
        return

    # ------------------------------------------------------------------ Loop.
    progresses = [common.Progress(writer, ckpt, first_step=first_step, total_steps=total_steps,
                                  global_batch_size=config.batch_size, name=name)
                  for writer, ckpt, name in zip(writers, ckpts, names, strict=True)]
    with contextlib.ExitStack() as stack:
        for resource in (contextlib.closing(c) for c in (*ckpts, *writers)):
            stack.enter_context(resource)
        stop = stack.enter_context(common.StopSignals())
        profiler = stack.enter_context(common.Profiler(config.get("profile_steps"),
                                                       workdirs[0]))
        for first, step in common.calls(first_step, total_steps, config.steps_per_call,
                                        (config.ckpt_every_steps, config.eval_every_steps),
                                        profiler.ends):
            profiler.step(first, states)
            states, measurements = common.run_steps(
                train_step, states, data_iter.next_batches(step - first + 1), mesh,
                config.steps_per_call)
            save = common.every(step, config.ckpt_every_steps, total_steps)
            logged = common.log_steps(first, step, first_step, config.log_every_steps)
            stopping = stop.requested(sync=save or bool(logged))
            for progress, run_metrics in zip(progresses, measurements, strict=True):
                progress.report_steps(logged, run_metrics, first, step, save or stopping)
            if save or stopping:
                for ckpt, state in zip(ckpts, states, strict=True):
                    ckpt.save(step, state, {"data_iter": data_iter.get_state()})
            if stopping:
                for ckpt in ckpts[1:]:
                    ckpt.wait()
                stop.exit(step, ckpts[0])
            if common.every(step, config.eval_every_steps, total_steps):
                for evaluate, state in zip(evaluators, states, strict=True):
                    if evaluate:
                        evaluate(step, state)
        for w, export, meta, state in zip(workdirs, export_params, export_metas, states,
                                          strict=True):
            path = exports.save_final(w, export(state["params"]), meta)
            logging.info("exported classifier parameters to %s", path)


def _check_together(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Fine-tunings trained together may differ only in TOGETHER_FIELDS."""
    shared = [{k: v for k, v in common.fingerprint(c).items() if k not in TOGETHER_FIELDS}
              for c in configs]
    for i, other in enumerate(shared[1:], start=1):
        if other != shared[0]:
            fields = sorted(k for k in shared[0].keys() | other.keys()
                            if shared[0].get(k) != other.get(k))
            raise ValueError(f"fine-tunings trained together may differ only in "
                             f"{TOGETHER_FIELDS}; configs 0 and {i} differ in {fields}")


def make_evaluator(config, parts, mesh, num_classes: int, writer, best=None, name: str = ""):
    """Eval hook: clean, one-noise-draw and majority-vote accuracy on every `eval_skip`-th
    image of the eval split (official order); `best` (a BestExport) keeps the best vote;
    `name` starts its printed line (which run, when several train together)."""
    from dmae_jax.data import pipeline  # Grain: where data is read (not in compile-only mode)

    if not config.eval_every_steps:
        return None
    source = datasets.load_source(
        config.data.dataset, config.data.eval_split,
        data_dir=config.data.data_dir, image_size=config.data.image_size)
    draws = config.eval_noise_draws
    indices = None if config.eval_skip == 1 else [i for i, _ in datasets.official_subset(
        len(source), config.data.dataset, config.data.eval_split, skip=config.eval_skip,
        stop=-1, data_dir=config.data.data_dir)]

    def counts(params, batch, rng):
        model = parts.bind(params)
        x, y, mask = batch["image"], batch["label"], batch["mask"].astype(jnp.float32)
        clean = jnp.argmax(model(x), -1) == y
        keys = jax.random.split(rng, draws)
        preds = jax.vmap(lambda k: jnp.argmax(
            model(x + config.sigma * jax.random.normal(k, x.shape)), -1))(keys)
        votes = jax.nn.one_hot(preds, num_classes).sum(0)              # [B, K]
        return jnp.stack([
            jnp.sum(mask), jnp.sum(mask * clean), jnp.sum(mask * (preds[0] == y)),
            jnp.sum(mask * (jnp.argmax(votes, -1) == y)),
        ])

    jitted = jax.jit(counts, in_shardings=(None, parallel.batch_sharding(mesh), None),
                     out_shardings=parallel.replicated(mesh))

    def evaluate(step, state):
        total = np.zeros(4)
        rng = jax.random.key(config.seed + 10_000)
        batches = pipeline.eval_batches(
            source, batch_size=config.eval_batch_size // jax.process_count(),
            image_size=config.data.image_size, process_index=jax.process_index(),
            process_count=jax.process_count(), indices=indices)
        for i, batch in enumerate(batches):
            batch = parallel.global_batch(
                {k: batch[k] for k in ("image", "label", "mask")}, mesh)
            total += np.asarray(jitted(state["params"], batch, jax.random.fold_in(rng, i)))
        n = max(total[0], 1.0)
        metrics = {"eval_clean_acc": total[1] / n, "eval_noisy_acc": total[2] / n,
                   "eval_vote_acc": total[3] / n}
        writer.write_scalars(step, metrics)
        if jax.process_index() == 0:
            print(f"{name}{': ' if name else ''}step {step} eval: "
                  + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
        if best is not None and best.update(step, metrics["eval_vote_acc"], state["params"]):
            logging.info("best eval_vote_acc so far: exported to %s", best.path)

    return evaluate
