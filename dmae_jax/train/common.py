"""The helpers every trainer calls: state, step, restore, stop signals, progress, profiler.

Each trainer (`dmae_jax/tasks/`: `pretrain.py`, `finetune.py`, `train_denoiser.py`,
`calibrate_denoiser.py`) is one `run(config, workdir)` that reads top to bottom like
big_vision's train.py: mesh, data, model, optimizer, step, checkpoint restore, then the
`for step ...` loop in plain sight (the run path, `dmae_jax.tasks.execute`, has taken the
workdir's lock, `storage.WorkdirLock`, before). Nothing here calls back into a trainer.

State is one pytree: `{"params", "opt_state", "step", "rng"}`, plus `"ema"` (an exponential
moving average of the params) for the denoisers. Params are the pure nested dict of
`nnx.state(model, nnx.Param)`; the model is rebuilt inside the step with
`ModelParts.bind(params)` (trace-time only, no overhead).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dmae_jax import checks, parallel
from dmae_jax.errors import UserError

LossFn = Callable[..., tuple[jax.Array, dict]]


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or the gradient became NaN/inf; the run stops before saving that step."""


# ---------------------------------------------------------------------------------------
# State and step.
# ---------------------------------------------------------------------------------------


def init_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array, *,
               ema: bool = False) -> dict:
    """A fresh training state; with `ema`, the average starts at the initial params."""
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(rng),
    }
    if ema:
        state["ema"] = jax.tree.map(jnp.asarray, params)
    return state


def make_train_step(
    loss_fn: LossFn | tuple[LossFn, ...],
    tx: optax.GradientTransformation | tuple[optax.GradientTransformation, ...],
    *,
    mesh: Mesh,
    state_sharding: Any,
    accum_steps: int = 1,
    lr_fn: Callable[[jax.Array], jax.Array] | tuple | None = None,
    ema_decay: float = 0.0,
    frozen_sharding: Any = None,
    steps_per_call: int = 1,
) -> Callable[..., tuple[Any, Any]]:
    """The jitted, donated, mesh-sharded step: `(state, batch[, frozen]) -> (state, metrics)`.

    `loss_fn(params, batch, rng[, frozen]) -> (loss, aux)`. `frozen` (given when
    `frozen_sharding` is) is a pytree the loss reads but never trains, such as the fixed
    classifier of denoiser calibration; it is an argument, not part of the state, so it is
    neither differentiated, optimised nor checkpointed.

    With `accum_steps > 1` the global batch is cut into micro-batches whose gradients are
    averaged in a `lax.scan` before one optimizer update (the official code divides each
    micro-loss by accum_iter; same mean). Each device keeps its own rows in every
    micro-batch, so the split moves no data. This is the only gradient accumulation: the
    optimizers never accumulate themselves.

    With `ema_decay > 0` the state's "ema" follows ema <- decay * ema + (1 - decay) * params
    after every update.

    With `steps_per_call` K > 1 one call runs several steps: `(state, batches, count[,
    frozen]) -> (state, metrics)`, batches stacked [K, B, ...] of which the first `count`
    (a traced int32, 1 <= count <= K) are trained on in order, metrics stacked [K] (rows
    past `count` are zeros). `run_steps` feeds it. The steps run in a while loop whose trip
    count is traced, so every K > 1 and every `count` compile to one program that computes
    the same values: a run resumed at any step, or cut into calls at other steps, is
    bit-identical to an uninterrupted one. XLA compiles the loop body apart from a lone
    step, so K = 1 and K > 1 may round differently (the digits pretraining step does, in
    the last bits; the fine-tuning step does not).

    Several runs in one program: with `loss_fn`, `tx` and `lr_fn` tuples (one entry per
    run) and `state_sharding` a tuple of their state shardings, the state and the metrics
    are tuples, and every run is trained on the same batch by its own loss and optimizer.
    The program holds one step per run, not a batched one: each computes what its own
    make_train_step computes (for the digits fine-tunings at three sigmas, bit for bit; a
    test checks it), while the runs share one dispatch, one batch and one input pipeline.
    """
    batch_sharding = parallel.batch_sharding(mesh)
    if isinstance(loss_fn, tuple):
        lr_fns = lr_fn if isinstance(lr_fn, tuple) else (lr_fn,) * len(loss_fn)
        steps = [_step_fn(f, t, mesh=mesh, accum_steps=accum_steps, lr_fn=lr,
                          ema_decay=ema_decay)
                 for f, t, lr in zip(loss_fn, tx, lr_fns, strict=True)]

        def step(states, batch, *frozen):
            out = [one(state, batch, *frozen) for one, state in zip(steps, states, strict=True)]
            return tuple(o[0] for o in out), tuple(o[1] for o in out)
    else:
        step = _step_fn(loss_fn, tx, mesh=mesh, accum_steps=accum_steps, lr_fn=lr_fn,
                        ema_decay=ema_decay)

    frozen_shardings = () if frozen_sharding is None else (frozen_sharding,)
    if steps_per_call > 1:
        return _jit_several_steps(step, steps_per_call, mesh=mesh, state_sharding=state_sharding,
                                  frozen_shardings=frozen_shardings)
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding, *frozen_shardings),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


def _step_fn(loss_fn: LossFn, tx: optax.GradientTransformation, *, mesh: Mesh,
             accum_steps: int,
             lr_fn: Callable[[jax.Array], jax.Array] | None, ema_decay: float) -> Callable:
    """make_train_step's step of one run, not jitted: `(state, batch[, frozen])`."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch, *frozen):
        with parallel.step_mesh(mesh):
            return _step(state, batch, *frozen)

    def _step(state, batch, *frozen):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = state["params"]
        if accum_steps == 1:
            (loss, aux), grads = grad_fn(params, batch, rng, *frozen)
        else:
            def micro(x):
                x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
                return jnp.swapaxes(x, 0, 1)

            micro_batches = jax.tree.map(micro, batch)

            def body(carry, inputs):
                i, mb = inputs
                (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), *frozen)
                acc = jax.tree.map(jnp.add, carry, (loss, aux, grads))
                return acc, None

            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0],
                                                                     micro_batches), rng,
                                               *frozen)),
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
        if ema_decay:
            new_state["ema"] = jax.tree.map(
                lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema"], params)
        return new_state, metrics

    return step


def _jit_several_steps(step: Callable, steps_per_call: int, *, mesh: Mesh, state_sharding: Any,
                       frozen_shardings: tuple) -> Callable[..., tuple[dict, dict]]:
    """`step` run `count` times per call over stacked batches (make_train_step's K > 1)."""

    def steps(state, batches, count, *frozen):
        def body(i, carry):
            state, stacked = carry
            batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False),
                                 batches)
            state, metrics = step(state, batch, *frozen)
            return state, jax.tree.map(lambda rows, m: rows.at[i].set(m), stacked, metrics)

        first = jax.tree.map(lambda x: x[0], batches)
        shapes = jax.eval_shape(step, state, first, *frozen)[1]
        stacked = jax.tree.map(lambda s: jnp.zeros((steps_per_call, *s.shape), s.dtype), shapes)
        return jax.lax.fori_loop(0, count, body, (state, stacked))

    return jax.jit(
        steps,
        in_shardings=(state_sharding, stacked_batch_sharding(mesh), parallel.replicated(mesh),
                      *frozen_shardings),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches stacked [K, B, ...]: the batch axis (1) split as `parallel.batch_sharding`."""
    return NamedSharding(mesh, P(None, *parallel.batch_sharding(mesh).spec))


def run_steps(train_step: Callable, state: dict, batches: dict[str, np.ndarray], mesh: Mesh,
              steps_per_call: int, *frozen) -> tuple[dict, dict]:
    """Trains on this process's batches stacked [n, b, ...] (n <= steps_per_call) with a
    make_train_step function; returns the state and the metrics of every step, [n]."""
    count = len(next(iter(batches.values())))
    if steps_per_call == 1:
        if count != 1:
            raise ValueError(f"one step per call, got {count} batches")
        state, metrics = train_step(
            state, parallel.global_batch({k: v[0] for k, v in batches.items()}, mesh), *frozen)
        return state, jax.tree.map(lambda m: m[None], metrics)
    if not 1 <= count <= steps_per_call:
        raise ValueError(f"1 to {steps_per_call} batches per call, got {count}")
    padded = {k: np.concatenate([v, np.zeros((steps_per_call - count, *v.shape[1:]), v.dtype)])
              if count < steps_per_call else v for k, v in batches.items()}
    sharding = stacked_batch_sharding(mesh)
    stacked = {k: jax.make_array_from_process_local_data(sharding, v)
               for k, v in padded.items()}
    state, metrics = train_step(state, stacked, jnp.int32(count), *frozen)
    return state, jax.tree.map(lambda m: m[:count], metrics)


def calls(first_step: int, total_steps: int, steps_per_call: int, periods: Sequence[int] = (),
          ends: Sequence[int] = ()) -> Iterator[tuple[int, int]]:
    """(first, last) steps of each call that trains steps first_step + 1 .. total_steps.

    A call runs at most `steps_per_call` steps and ends on every multiple of each of
    `periods` (where the loop saves or evaluates), on every step of `ends` and at
    total_steps, so those happen between calls at the same steps as with one step per call.
    """
    step = first_step
    while step < total_steps:
        last = min(step + steps_per_call, total_steps)
        for period in periods:
            if period:
                last = min(last, (step // period + 1) * period)
        last = min([last] + [end for end in ends if step < end])
        yield step + 1, last
        step = last


def put_global(tree: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) to global arrays with the given shardings."""
    return jax.tree.map(
        lambda x, sh: jax.make_array_from_callback(np.shape(x), sh, lambda idx: np.asarray(x)[idx]),
        tree, shardings,
    )


def state_shardings(make_state: Callable[[Any], dict], params: Any, mesh: Mesh) -> Any:
    """The shardings of `make_state(params)` on `mesh` (traced abstractly, nothing computed)."""
    return parallel.state_shardings(jax.eval_shape(make_state, params), mesh)


# ---------------------------------------------------------------------------------------
# Checkpoint restore.
# ---------------------------------------------------------------------------------------


def restore_or_init(ckpt, make_state: Callable[[Any], dict], params: Any, shardings: Any,
                    data_iter: Any, total_steps: int) -> tuple[dict, int]:
    """(state, its step): the newest checkpoint of `ckpt`, or `make_state(params)` at step 0.

    `params` are host (numpy) parameters, the same on every process. On a restore the data
    iterator is moved to where that checkpoint left it, so a resumed run sees exactly the
    batches the uninterrupted run would have. Says on process 0 which of the three it is:
    a fresh start, a resume, or a run with nothing left to do.
    """
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(make_state, params), shardings)
    restored = ckpt.restore(abstract)
    if restored is None:
        state = jax.jit(make_state, out_shardings=shardings)(
            put_global(params, shardings["params"]))
        logging.info("no checkpoint in %s: starting at step 0", ckpt.directory)
        return state, 0
    step, state, extra = restored
    data_iter.set_state(extra["data_iter"])
    if step >= total_steps:
        _say(f"already complete: the checkpoint in {ckpt.directory} is at step {step} of "
             f"{total_steps}; nothing to train")
    else:
        _say(f"resumed from step {step} of {total_steps} ({ckpt.directory})")
    return state, step


# Fields a resumed run may change: how long it trains (a run may be extended), how often it
# logs, saves, evaluates or profiles, and where its data lives. Every other field changes the
# computation, so a checkpoint written under another value is refused, naming the field.
RESUMABLE_FIELDS = frozenset({
    "total_steps", "num_epochs", "log_every_steps", "ckpt_every_steps", "eval_every_steps",
    "keep_ckpts", "profile_steps", "eval_batch_size", "eval_noise_draws", "num_grid_images",
    "data.data_dir", "data.worker_count",
})


def fingerprint(config) -> dict:
    """The training config a checkpoint records: every field but `RESUMABLE_FIELDS`."""

    def keep(node: Mapping[str, Any], prefix: str) -> dict:
        out = {}
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name in RESUMABLE_FIELDS:
                continue
            out[key] = keep(value, f"{name}.") if isinstance(value, Mapping) else value
        return out

    return keep(config.to_dict(), "")


def every(step: int, period: int, total_steps: int) -> bool:
    """True at every `period`-th step and at the last one (`period` 0: only at the last)."""
    return step == total_steps or bool(period) and step % period == 0


def _say(line: str) -> None:
    logging.info(line)
    if jax.process_index() == 0:
        print(line, flush=True)


# ---------------------------------------------------------------------------------------
# SIGTERM and Ctrl-C.
# ---------------------------------------------------------------------------------------


class StopSignals:
    """SIGTERM (a preemption notice) and Ctrl-C become a request to save and exit.

    The loop asks `requested(sync)` after each step. A single process answers from its own
    flag at every step. Processes of a multi-host job must stop at the same step, so they
    OR their flags with an all-gather, and only where `sync` is true (the log and checkpoint
    steps, which every process computes alike): a host synchronisation at every step would
    cost a pod real time. A second Ctrl-C aborts at once, without saving.
    """

    EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}

    def __init__(self):
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self._received is not None:
            raise KeyboardInterrupt
        if self._received is None:
            self._received = signum
        if signum == signal.SIGINT:
            sys.stderr.write("\nCtrl-C: saving a checkpoint after this step, then exiting "
                             "(Ctrl-C again to abort without saving)\n")

    def requested(self, sync: bool) -> bool:
        """True when this run must save and exit now (the same answer on every process)."""
        if jax.process_count() == 1:
            return self._received is not None
        if not sync:
            return False
        flags = multihost_utils.process_allgather(np.array([self._received is not None]))
        return bool(np.any(flags))

    def exit(self, step: int, ckpt) -> None:
        """After the save at `step`: waits for it to be on disk, says so, and exits."""
        ckpt.wait()
        signum = self._received if self._received is not None else signal.SIGTERM
        why = "Ctrl-C" if signum == signal.SIGINT else "preemption notice (SIGTERM)"
        logging.warning("%s: saved step %d in %s, exiting; rerun the same command to resume",
                        why, step, ckpt.directory)
        raise SystemExit(self.EXIT_CODES[signum])


# ---------------------------------------------------------------------------------------
# Progress line and profiler.
# ---------------------------------------------------------------------------------------


class Progress:
    """One progress line per log step: step, loss, lr, images/s and ETA; scalars to the writer.

    The first call after a start or a resume includes compilation, so its first line reports
    that call's duration instead of a rate, and the rate and ETA of later lines count from
    its end. `done` is the last step the device has finished when the line is printed (the
    last step of the call that trained `step`).
    A non-finite loss or gradient norm stops the run (`NonFiniteLossError`) before that
    step is saved. `name` starts every line (which run, when several train together).
    """

    def __init__(self, writer: Any, ckpt, *, first_step: int, total_steps: int,
                 global_batch_size: int, name: str = ""):
        self.writer, self.ckpt, self.name = writer, ckpt, name
        self.total, self.batch = total_steps, global_batch_size
        self.t0, self.step0 = time.time(), first_step
        self.first_reported = False

    def report_steps(self, steps: Sequence[int], metrics: Mapping[str, jax.Array], first: int,
                     last: int, with_last: bool) -> None:
        """Reports `steps` of the call that trained first..last (`metrics` stacked [last -
        first + 1], as `run_steps` returns them), and `last` too if `with_last` (a save or
        a stop)."""
        steps = list(steps) + ([last] if with_last and last not in steps else [])
        if steps:
            rows = jax.device_get(metrics)
            for step in steps:
                self.report(step, {k: v[step - first] for k, v in rows.items()}, done=last)

    def report(self, step: int, metrics: Mapping[str, jax.Array], done: int | None = None
               ) -> None:
        """Fetches `metrics` of `step`, checks them, prints the line, writes the scalars."""
        done = step if done is None else done
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm")):
            self.ckpt.wait()
            raise NonFiniteLossError(
                f"loss={values['loss']} grad_norm={values['grad_norm']} at step {step}: "
                f"stopping without saving it. Rerunning resumes from the newest checkpoint in "
                f"{self.ckpt.directory} whose checksums verify (a corrupt one is set aside); "
                "if the loss diverges again, lower the learning rate or use float32 compute.")
        now = time.time()
        if not self.first_reported:
            steps = "first step" if done == self.step0 + 1 else f"first {done - self.step0} steps"
            speed = f"{steps} {now - self.t0:.1f}s (with compilation)"
            self.t0, self.step0, self.first_reported = now, done, True
        elif done == self.step0:  # another line of the first call: no rate yet
            speed = ""
        else:
            rate = (done - self.step0) / max(now - self.t0, 1e-9)
            values["images_per_sec"] = rate * self.batch
            speed = (f"{values['images_per_sec']:.1f} img/s "
                     f"ETA {_fmt((self.total - done) / rate)}")
        self.writer.write_scalars(step, values)
        extras = " ".join(
            f"{k}={v:.4g}" for k, v in sorted(values.items())
            if k not in ("loss", "lr", "images_per_sec")
        )
        _say(f"{self.name}{': ' if self.name else ''}step {step}/{self.total} "
             f"loss={values['loss']:.4f}"
             + (f" lr={values['lr']:.3g}" if "lr" in values else "")
             + (f" {speed}" if speed else "") + f" {extras}")


def log_steps(first: int, last: int, first_step: int, log_every_steps: int) -> list[int]:
    """The steps of a call (first..last) that print a progress line: the first step after a
    start or resume (`first_step` + 1) and every `log_every_steps`-th."""
    return [step for step in range(first, last + 1)
            if step == first_step + 1 or step % log_every_steps == 0]


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Profiler:
    """A `jax.profiler` trace of steps [start, stop) into `<workdir>/profile` (TensorBoard).

    `profile_steps` is `config.profile_steps`: () or 0 is off, a pair (start, stop) traces
    those steps. Start after the first step of a run so compilation is not in the trace.
    """

    def __init__(self, profile_steps: Any, workdir: str):
        self.start, self.stop = checks.profile_steps(profile_steps)
        self.directory = os.path.join(workdir, "profile")
        self._active = False

    @property
    def ends(self) -> tuple[int, ...]:
        """Steps after which a call must end, so that the trace starts and stops between
        calls (`calls`)."""
        return (self.start - 1, self.stop - 1) if self.start else ()

    def step(self, step: int, state: Any) -> None:
        """Called before step `step` runs; `state` is what the previous step returned."""
        if self.start and step == self.start:
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.directory)
            self._active = True
        elif self._active and step == self.stop:
            self._finish(state)

    def _finish(self, state: Any) -> None:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self._active = False
        _say(f"profile of steps {self.start}-{self.stop - 1} written to {self.directory} "
             "(open it with TensorBoard's profile plugin or xprof)")

    def __enter__(self) -> Profiler:
        return self

    def __exit__(self, *exc) -> None:
        if self._active:
            self._finish(None)


# ---------------------------------------------------------------------------------------
# Data and schedule lengths.
# ---------------------------------------------------------------------------------------


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
