"""What every training loop shares: the sharded step, the loop with checkpoints and metrics.

The trainers (`pretrain.py`, `finetune.py`, `denoiser.py`) read top to bottom: mesh, data,
model, optimizer, then `run_training`, which owns the parts that must be the same
everywhere: restore-or-init, the jitted step over the mesh, preemption, NaN guard, periodic
async checkpoints, CLU metrics and the progress line.

State is one pytree: `{"params", "opt_state", "step", "rng"}`. Params are the pure nested
dict of `nnx.state(model, nnx.Param)`; the model is rebuilt inside the step with
`nnx.merge(graphdef, nnx.State(params), rest)` (trace-time only, no overhead).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from dmae_jax import checkpoints, parallel

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient became NaN/inf; the run stops and keeps its last good save."""


@dataclasses.dataclass
class ModelParts:
    """A model split for functional use: `bind(params)` gives the module back."""

    graphdef: Any
    params: dict
    rest: Any

    @classmethod
    def split(cls, model: nnx.Module) -> ModelParts:
        """Splits an NNX module into its graph, trainable params (pure dict) and the rest."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(graphdef, params.to_pure_dict(), rest)

    def bind(self, params: Any) -> nnx.Module:
        """The module with `params` (a pure dict, possibly of tracers) in place."""
        return nnx.merge(self.graphdef, nnx.State(params), self.rest)


def init_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> dict:
    """A fresh training state."""
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(rng),
    }


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh,
    state_sharding: Any,
    accum_steps: int = 1,
    lr_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """The jitted, donated, mesh-sharded step: `(state, batch) -> (state, metrics)`.

    `loss_fn(params, batch, rng) -> (loss, aux)`. With `accum_steps > 1` the global batch is
    cut into micro-batches whose gradients are averaged in a `lax.scan` before one optimizer
    update (the official code divides each micro-loss by accum_iter; same mean). Each
    device keeps its own rows in every micro-batch, so the split moves no data.
    """
    batch_sharding = parallel.batch_sharding(mesh)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = state["params"]
        if accum_steps == 1:
            (loss, aux), grads = grad_fn(params, batch, rng)
        else:
            def micro(x):
                x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
                return jnp.swapaxes(x, 0, 1)

            micro_batches = jax.tree.map(micro, batch)

            def body(carry, inputs):
                i, mb = inputs
                (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
                acc = jax.tree.map(jnp.add, carry, (loss, aux, grads))
                return acc, None

            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0],
                                                                     micro_batches), rng)),
            )
            zeros = (zeros[0][0], zeros[0][1], zeros[1])
            (loss, aux, grads), _ = jax.lax.scan(
                body, zeros, (jnp.arange(accum_steps), micro_batches)
            )
            loss, aux, grads = jax.tree.map(lambda x: x / accum_steps, (loss, aux, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        metrics = dict(aux, loss=loss, grad_norm=optax.global_norm(grads))
        if lr_fn is not None:
            metrics["lr"] = lr_fn(state["step"])
        new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
        return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


def put_global(tree: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) to global arrays with the given shardings."""
    return jax.tree.map(
        lambda x, sh: jax.make_array_from_callback(np.shape(x), sh, lambda idx: np.asarray(x)[idx]),
        tree, shardings,
    )


@dataclasses.dataclass
class LoopConfig:
    """The loop's knobs, taken from the task config."""

    total_steps: int
    log_every: int
    ckpt_every: int
    keep_ckpts: int
    global_batch_size: int
    eval_every: int = 0


def run_training(
    *,
    workdir: str,
    loop: LoopConfig,
    mesh: Mesh,
    step_builder: Callable[[Any], Callable[[dict, dict], tuple[dict, dict]]],
    init_params: Any,
    make_state: Callable[[Any], dict],
    data_iter: Any,
    fingerprint: Mapping[str, Any],
    writer: Any,
    eval_fn: Callable[[int, dict], None] | None = None,
) -> dict:
    """Restores or initialises the state, then trains to `loop.total_steps`.

    `init_params` are host (numpy) parameters, the same on every process;
    `make_state(params) -> state` builds the optimizer state around them (jitted here);
    `step_builder(state_shardings)` returns the jitted step (see `make_train_step`).

    `data_iter` yields local numpy batches and has `get_state()/set_state()` (the Grain
    iterator); its position is saved with every checkpoint so a resumed run sees exactly
    the batches the uninterrupted run would have. Returns the final state.
    """
    ckpt = checkpoints.TrainCheckpointer(
        workdir, max_to_keep=loop.keep_ckpts, fingerprint=fingerprint
    )
    shapes = jax.eval_shape(make_state, init_params)
    shardings = parallel.state_shardings(shapes, mesh)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    step_fn = step_builder(shardings)
    restored = ckpt.restore(abstract)
    if restored is None:
        params = put_global(init_params, shardings["params"])
        state = jax.jit(make_state, out_shardings=shardings)(params)
        start = 0
        logging.info("no checkpoint in %s: starting at step 0", ckpt.directory)
    else:
        start, state, extra = restored
        data_iter.set_state(extra["data_iter"])
        logging.info("resumed from %s/%d", ckpt.directory, start)

    watcher = checkpoints.PreemptionWatcher()
    progress = _Progress(loop.total_steps, start, loop.global_batch_size)
    last_saved = start if restored is not None else None
    step = start
    try:
        while step < loop.total_steps:
            batch = parallel.global_batch(next(data_iter), mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            must_save = step % loop.ckpt_every == 0 or step == loop.total_steps
            stop = watcher.should_stop()
            if step % loop.log_every == 0 or must_save or stop or step == start + 1:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm")):
                    raise NonFiniteLossError(
                        f"loss={values['loss']} grad_norm={values['grad_norm']} at step {step}: "
                        f"stopping; the last good checkpoint is step {last_saved} in "
                        f"{ckpt.directory}. Lower the learning rate or use float32 compute."
                    )
                progress.report(step, values, writer)
            if must_save or stop:
                ckpt.save(step, state, {"data_iter": data_iter.get_state()})
                last_saved = step
            if stop:
                logging.warning("preemption notice (SIGTERM): saved step %d, exiting", step)
                ckpt.wait()
                raise SystemExit(143)
            if eval_fn is not None and loop.eval_every and (
                step % loop.eval_every == 0 or step == loop.total_steps
            ):
                eval_fn(step, state)
    finally:
        watcher.restore_handler()
        ckpt.close()
        writer.flush()
    return state


class _Progress:
    """One progress line per log step: step, loss, lr, images/s and ETA; scalars to TensorBoard."""

    def __init__(self, total_steps: int, start: int, global_batch_size: int):
        self.total, self.batch = total_steps, global_batch_size
        self.t0, self.step0 = time.time(), start

    def report(self, step: int, values: dict[str, float], writer: Any) -> None:
        now = time.time()
        done = step - self.step0
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        values = dict(values, images_per_sec=rate * self.batch)
        writer.write_scalars(step, values)
        extras = " ".join(
            f"{k}={v:.4g}" for k, v in sorted(values.items())
            if k not in ("loss", "lr", "images_per_sec")
        )
        line = (
            f"step {step}/{self.total} loss={values['loss']:.4f}"
            + (f" lr={values['lr']:.3g}" if "lr" in values else "")
            + f" {values['images_per_sec']:.1f} img/s ETA {_fmt(eta)} {extras}"
        )
        logging.info(line)
        if jax.process_index() == 0:
            print(line, flush=True)


def _fmt(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def log_parameter_overview(params: Any, title: str) -> None:
    """Logs a table of parameter names, shapes and counts at the start of a run."""
    from clu import parameter_overview

    flat = {
        jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    count = sum(v.size for v in flat.values())
    text = parameter_overview.get_parameter_overview(flat, include_stats=False, max_lines=60)
    logging.info("%s: %d parameters\n%s", title, count, text)
    if jax.process_index() == 0:
        print(f"{title}: {count:,} parameters", flush=True)


def steps_from_epochs(epochs: float, num_examples: int, global_batch_size: int) -> int:
    """Number of optimizer steps in `epochs` epochs (drop-remainder batches)."""
    return max(1, int(round(epochs * (num_examples // global_batch_size))))



def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """Warm-up length in steps; a run shorter than its warm-up (a smoke run) warms up half."""
    steps = int(warmup_epochs * steps_per_epoch)
    if steps >= total_steps:
        logging.warning("warm-up (%d steps) >= total steps (%d): using %d", steps, total_steps,
                        total_steps // 2)
        steps = total_steps // 2
    return steps


@dataclasses.dataclass
class TrainData:
    """The training input of a task: its iterator and the step counts derived from it."""

    iterator: Any
    num_examples: int
    steps_per_epoch: int
    total_steps: int


def train_data(config) -> TrainData:
    """Grain iterator over `config.data`'s train split, sharded per process, and step counts.

    `config.total_steps` (when > 0) overrides `config.num_epochs`.
    """
    from dmae_jax.data import datasets, pipeline

    source = datasets.load_source(
        config.data.dataset, config.data.train_split,
        data_dir=config.data.data_dir, image_size=config.data.image_size,
    )
    iterator = pipeline.train_iterator(
        source, global_batch_size=config.batch_size, seed=config.seed,
        augment=config.data.augment, image_size=config.data.image_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=config.data.worker_count,
    )
    total_steps = config.get("total_steps") or steps_from_epochs(
        config.num_epochs, len(source), config.batch_size)
    return TrainData(iterator, len(source), max(len(source) // config.batch_size, 1),
                     total_steps)
