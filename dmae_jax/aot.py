r"""Compile-only mode: will a config fit a TPU slice, and how fast would it run there?

  python -m dmae_jax.aot --config=configs/vit_large.py --topology=v4-128 \
      [--config.mesh.fsdp=4 --config.model.remat=True --config.accum_steps=2 ...]
  python -m dmae_jax.aot --config=configs/certify.py --topology=v4-32 --variant=large

With `libtpu` installed (`pip install -e ".[tpu-compile]"`), JAX compiles a program for a
named TPU topology on a machine without TPUs. This module builds the real training step of
a `pretrain` or `finetune` config (`train.common.make_train_step` with the trainer's loss and
optimizer, the config's ("data", "fsdp") mesh, remat, gradient accumulation and dtype) or the
real certification step of a `certify`/`cascade` config (`smoothing.sampling`'s step
on one host's chips), from abstract shapes only: no data is read and no parameter is
allocated. It prints, per chip, what the compiler reports: argument, output, temporary and
total memory against the chip's HBM, FLOPs per step and XLA's estimated step time, and from
them the predicted images/s per chip and the MFU against the chip's bf16 peak.

The step time is XLA's static cost model (each operation's FLOPs and memory traffic per
chip), not a measurement: it leaves out the input pipeline, host overhead and collectives
that fail to overlap, and prices memory traffic without the real overlap, so it is an
estimate, not a bound. The memory figures are what the compiler allocates: a step that does
not fit here fails the same way on the slice.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from dmae_jax import config as config_lib
from dmae_jax import defaults, errors, parallel, tasks
from dmae_jax.data import datasets
from dmae_jax.errors import ConfigError
from dmae_jax.models import ModelParts, create_classifier, create_dmae, resolve_model_config
from dmae_jax.models.dmae import num_kept
from dmae_jax.smoothing import Settings, sampling
from dmae_jax.tasks import finetune, pretrain
from dmae_jax.train import common

# libtpu reads these at start-up: off a TPU VM it cannot find the first two and prints
# warnings; the third lets several compile-only processes (tests, a table) load it at once.
_LIBTPU_ENV = {"TPU_ACCELERATOR_TYPE": "v4-8", "TPU_WORKER_HOSTNAMES": "localhost",
               "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip generation: HBM per chip and dense bf16 peak (Cloud TPU documentation)."""

    name: str
    hbm_bytes: int
    peak_flops: float  # bf16 FLOP/s per chip
    chip_config: str  # libtpu's chip_config_name: "megacore" (2 TensorCores as one device)
    cores_per_chip: int  # what the "-N" of an accelerator type counts per chip


# device_kind (as libtpu reports it) -> chip.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, "megacore", 2),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, "default", 1),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, "megacore", 2),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, "default", 1),
}
# The anchor every prediction is compared with: TPU v3, 32 GiB and 123 TFLOP/s bf16 per chip.
V3_PEAK_FLOPS = 123e12

# Accelerator-type prefix -> (libtpu topology prefix, device_kind).
_GENERATIONS = {
    "v4": ("v4", "TPU v4"),
    "v5p": ("v5", "TPU v5"),
    "v5e": ("v5e", "TPU v5 lite"),
    "v5litepod": ("v5e", "TPU v5 lite"),
    "v6e": ("v6e", "TPU v6 lite"),
}
# Chips -> the slice shape Cloud TPU gives that accelerator type (3-D tori for v4/v5p,
# 2-D for v5e/v6e).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
TOPOLOGY_HELP = (
    "an accelerator type as gcloud names it (v4-32, v4-128, v5p-128, v5e-16 or "
    "v5litepod-16, v6e-16) or a libtpu topology (v4:2x2x4, v5:4x4x4, v5e:4x4)"
)


class DoesNotFitError(RuntimeError):
    """The compiled step needs more HBM per chip than the chip has."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named TPU slice: libtpu's topology name, its chip and the accelerator type."""

    accelerator_type: str
    topology_name: str
    chip: Chip


def resolve_topology(name: str) -> Topology:
    """`v4-128` (gcloud's accelerator type) or `v4:4x4x4` (libtpu's name) to a Topology."""
    name = name.strip()
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if m:
        prefix, kind = _GENERATIONS[m.group(1)]
        chip = CHIPS[kind]
        count = int(m.group(2))
        chips, rem = divmod(count, chip.cores_per_chip)
        shapes = _SHAPES_3D if prefix in ("v4", "v5") else _SHAPES_2D
        if rem or chips not in shapes:
            raise ValueError(
                f"--topology {name!r}: {m.group(1)} slices come in "
                f"{sorted(n * chip.cores_per_chip for n in shapes)} "
                f"({'TensorCores' if chip.cores_per_chip == 2 else 'chips'}); or give "
                f"{TOPOLOGY_HELP}")
        return Topology(name, f"{prefix}:{shapes[chips]}", chip)
    m = re.fullmatch(r"(v4|v5|v5e|v6e):(\d+(?:x\d+)+)", name)
    if m:
        kind = {"v4": "TPU v4", "v5": "TPU v5", "v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}[
            m.group(1)]
        chips = math.prod(int(d) for d in m.group(2).split("x"))
        chip = CHIPS[kind]
        return Topology(f"{chip.name}-{chips * chip.cores_per_chip}", name, chip)
    raise ValueError(f"--topology must be {TOPOLOGY_HELP}, got {name!r}")


def topology_devices(topology: Topology) -> list:
    """The devices of the slice (one per chip), from libtpu, without any TPU attached."""
    for key, value in _LIBTPU_ENV.items():
        os.environ.setdefault(key, value)
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            topology_name=topology.topology_name, platform="tpu",
            chip_config_name=topology.chip.chip_config, chips_per_host_bounds=(2, 2, 1),
            num_slices=1)
    except Exception as e:  # noqa: BLE001 - libtpu missing or too old: say how to get it
        raise RuntimeError(
            f"cannot describe TPU topology {topology.topology_name!r} ({type(e).__name__}: "
            f"{e}); compile-only mode needs libtpu: pip install -e \".[tpu-compile]\""
        ) from e
    return list(desc.devices)


# ---------------------------------------------------------------------------------------------
# Model FLOPs (analytic, matmuls only: what MFU is measured against; remat's recomputation and
# the non-matmul ops are not model FLOPs).
# ---------------------------------------------------------------------------------------------


def blocks_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward matmul FLOPs of `depth` pre-norm ViT blocks on one sample of `tokens` tokens.

    Per block: qkv (3 D^2), proj (D^2) and the MLP (2 * ratio * D^2) per token, plus
    q k^T and attn v (N^2 D each); 2 FLOPs per multiply-add.
    """
    hidden = int(width * mlp_ratio)
    per_token = 2 * (3 * width * width + width * width + 2 * width * hidden)
    attention = 2 * 2 * tokens * tokens * width
    return float(depth * (tokens * per_token + attention))


def dmae_forward_flops(cfg: dict, mask_ratio: float) -> float:
    """Forward FLOPs of DMAE on one image: encoder on the visible tokens, decoder on all."""
    num_patches = (cfg["img_size"] // cfg["patch_size"]) ** 2
    kept = num_kept(num_patches, mask_ratio)
    patch_dim = cfg["patch_size"] ** 2 * 3
    width, dec = cfg["width"], cfg["decoder_width"]
    return (
        2.0 * num_patches * patch_dim * width  # patch embedding (before masking, all patches)
        + blocks_flops(1 + kept, width, cfg["depth"])
        + 2.0 * (1 + kept) * width * dec  # decoder_embed
        + blocks_flops(1 + num_patches, dec, cfg["decoder_depth"])
        + 2.0 * (1 + num_patches) * dec * patch_dim  # decoder_pred
    )


def classifier_forward_flops(cfg: dict, num_classes: int) -> float:
    """Forward FLOPs of the ViT classifier on one image (all patches + cls token)."""
    num_patches = (cfg["img_size"] // cfg["patch_size"]) ** 2
    patch_dim = cfg["patch_size"] ** 2 * 3
    return (
        2.0 * num_patches * patch_dim * cfg["width"]
        + blocks_flops(1 + num_patches, cfg["width"], cfg["depth"])
        + 2.0 * cfg["width"] * num_classes
    )


# Training = forward + backward (twice the forward: gradients w.r.t. inputs and weights).
TRAIN_FLOPS_FACTOR = 3.0


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompileReport:
    """What the compiler says about one step on one chip, and what follows from it."""

    what: str  # e.g. "pretrain DMAE-L/16, batch 4096, fsdp 1, remat off, accum 1, bfloat16"
    topology: Topology
    num_chips: int  # chips the step runs on (all of the slice; one host for certification)
    items_per_step: int  # images (training) or noisy samples (certification) per step
    item: str  # "images" | "samples"
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    code_bytes: int
    xla_flops: float  # per chip per step, as XLA counts them (with remat's recomputation)
    model_flops: float  # analytic matmul FLOPs per chip per step
    step_seconds: float  # XLA's estimated step time
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Peak HBM per chip: arguments + outputs + temporaries, less what donation aliases."""
        return (self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        """Whether the total fits the chip's HBM."""
        return self.total_bytes <= self.topology.chip.hbm_bytes

    @property
    def items_per_sec_per_chip(self) -> float:
        """Predicted throughput per chip from XLA's estimated step time."""
        return self.items_per_step / self.num_chips / self.step_seconds

    @property
    def mfu(self) -> float:
        """Model FLOP utilisation: analytic model FLOP/s per chip over the chip's bf16 peak."""
        return self.model_flops / self.step_seconds / self.topology.chip.peak_flops

    def format(self) -> str:
        """The human-readable block `python -m dmae_jax.aot` prints."""
        chip = self.topology.chip
        hbm = chip.hbm_bytes
        lines = [
            f"{self.what} on {self.topology.accelerator_type} ({self.topology.topology_name}, "
            f"{self.num_chips} {chip.name} chips"
            + (" of one host" if self.item == "samples" else "") + ")",
            "per chip, as compiled (XLA's figures; a prediction, not a measurement):",
            f"  memory    arguments {_gib(self.argument_bytes)}  outputs {_gib(self.output_bytes)}"
            f"  temporaries {_gib(self.temp_bytes)}  aliased (donated) {_gib(self.alias_bytes)}"
            f"  code {_gib(self.code_bytes)}",
            f"  total     {_gib(self.total_bytes)} of {_gib(hbm)} HBM "
            f"({100 * self.total_bytes / hbm:.0f}%): " + ("fits" if self.fits else "DOES NOT FIT"),
            f"  FLOPs     {self.xla_flops:.3e} per step as XLA counts them, "
            f"{self.model_flops:.3e} model (matmul) FLOPs",
            f"  step      {self.step_seconds * 1e3:.1f} ms (XLA's cost model)",
            f"  predicted {self.items_per_sec_per_chip:,.0f} {self.item}/s per chip, "
            f"{self.items_per_sec_per_chip * self.num_chips:,.0f} {self.item}/s in all, "
            f"MFU {100 * self.mfu:.0f}% of {chip.peak_flops / 1e12:.0f} TFLOP/s bf16",
        ]
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# libtpu's cost model gives these custom calls (concatenations it emits itself) a cost of
# -1 s each in the program's `optimal_seconds`; their real cost is a small copy.
_UNCOSTED_CALLS = ('custom_call_target="ConcatBitcast"',)


def _cost(compiled) -> tuple[float, float]:
    """(FLOPs, estimated seconds) per chip of a compiled program, from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    if not cost or "flops" not in cost or "optimal_seconds" not in cost:
        raise RuntimeError("the compiler returned no cost analysis for this program")
    seconds = float(cost["optimal_seconds"])
    if seconds < 0:
        text = compiled.as_text()
        seconds += sum(text.count(call) for call in _UNCOSTED_CALLS)
    if not seconds > 0:
        raise RuntimeError(
            f"XLA's cost model gave no usable step time ({cost['optimal_seconds']} s)")
    return float(cost["flops"]), seconds


def _report(compiled, **kwargs) -> CompileReport:
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError("the compiler returned no memory analysis for this program")
    flops, seconds = _cost(compiled)
    return CompileReport(
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes, xla_flops=flops, step_seconds=seconds,
        **kwargs)


def _fit_advice(task: str, settings: dict) -> str:
    """What to change when a step does not fit, in the order that costs the least speed."""
    steps = []
    if task == "certify":
        steps.append(f"--config.batch_size={max(settings['batch'] // 2, 1)} (noisy samples "
                     "per step; certification results do not depend on it)")
        steps.append("--config.compute_dtype=bfloat16")
        return "; or ".join(steps)
    if settings.get("dtype") != "bfloat16":
        steps.append("--config.model.dtype=bfloat16")
    if not settings.get("remat"):
        steps.append("--config.model.remat=True (recompute activations in the backward pass)")
    steps.append(f"--config.mesh.fsdp={settings['fsdp'] * 2} (shard parameters and optimizer "
                 "state over more chips)")
    steps.append(f"--config.accum_steps={settings['accum'] * 2} (same global batch in more "
                 "micro-batches)")
    return "; or ".join(steps)


# ---------------------------------------------------------------------------------------------
# Abstract models: shapes only, no parameter allocated.
# ---------------------------------------------------------------------------------------------


def abstract_parts(create: Callable[[], Any]):
    """`models.ModelParts` with abstract parameters (ShapeDtypeStructs) and concrete constants.

    The parameters are never initialised; the model's non-parameter state (fixed sin-cos
    position embeddings) is computed for real, inside a jit whose parameter initialisers XLA
    removes as dead code, so the compiled step sees the same constants as in training.
    """
    abstract = nnx.eval_shape(create)
    graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
    rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[2])()
    return ModelParts(graphdef, params.to_pure_dict(), rest), abstract


# ---------------------------------------------------------------------------------------------
# Training steps.
# ---------------------------------------------------------------------------------------------


def _dataset(name: str) -> tuple[int, int]:
    """(training examples, classes) of a data set, from its published sizes (no TFDS)."""
    return max(datasets.NUM_EXAMPLES[name].values()), datasets.num_classes(name)


@dataclasses.dataclass
class TrainPieces:
    """What a trainer puts into `common.make_train_step`, built for a config."""

    parts: Any  # models.ModelParts (abstract parameters unless built with concrete=True)
    tx: Any  # optax.GradientTransformation
    loss_fn: Callable
    lr_fn: Callable
    flops_per_image: float  # analytic model FLOPs of one training image (forward + backward)
    labels: bool  # whether the batch has a "label" field


def _steps(config, num_examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps), as `common.train_data` counts them."""
    per_epoch = max(num_examples // config.batch_size, 1)
    total = config.get("total_steps") or max(1, int(round(config.num_epochs * per_epoch)))
    return per_epoch, total


def _model_parts(create: Callable[[], Any], concrete: bool):
    if not concrete:
        return abstract_parts(create)
    model = create()
    return ModelParts.split(model), model


def train_pieces(config, *, concrete: bool = False) -> TrainPieces:
    """The optimizer, loss and model of a `pretrain` or `finetune` config's training step,
    built by the trainers' own `make_optimizer` and `make_loss_fn`.

    Abstract parameters by default (compiling needs only their shapes); `concrete=True`
    initialises them for a real run (the GPU check). `config` may be unresolved: its derived
    fields are filled here as the run path fills them.
    """
    config = config_lib.resolve(config)
    num_examples, num_classes = _dataset(config.data.dataset)
    per_epoch, total = _steps(config, num_examples)
    if config.task == "pretrain":
        parts, _ = _model_parts(lambda: create_dmae(config.model, rngs=nnx.Rngs(config.seed)),
                                concrete)
        tx, schedule = pretrain.make_optimizer(config, parts.params, steps_per_epoch=per_epoch,
                                               total_steps=total)
        flops = TRAIN_FLOPS_FACTOR * dmae_forward_flops(resolve_model_config(config.model),
                                                        config.mask_ratio)
        return TrainPieces(parts, tx, pretrain.make_loss_fn(config, parts), schedule, flops,
                           labels=False)
    if config.task != "finetune" or config.get("linear_probe"):
        raise ValueError("compile-only mode covers pretraining and fine-tuning (not linear "
                         f"probing), got config.task={config.task!r}, linear_probe="
                         f"{config.get('linear_probe')}")
    parts, model = _model_parts(
        lambda: create_classifier(config.model, num_classes, rngs=nnx.Rngs(config.seed)),
        concrete)
    tx, schedule = finetune.make_optimizer(config, parts.params, num_layers=len(model.blocks),
                                           steps_per_epoch=per_epoch, total_steps=total)
    flops = config.num_noise_samples * TRAIN_FLOPS_FACTOR * classifier_forward_flops(
        resolve_model_config(config.model), num_classes)
    return TrainPieces(parts, tx, finetune.make_loss_fn(config, parts, num_classes), schedule,
                       flops, labels=True)


def train_mesh(config, devices: Sequence):
    """The trainers' ("data", "fsdp") mesh over the slice's devices."""
    return parallel.make_mesh(config.mesh.fsdp, devices=devices)


def compile_train(config, topology: Topology, devices: Sequence | None = None) -> CompileReport:
    """Compiles the config's training step for the slice and returns the compiler's figures."""
    devices = topology_devices(topology) if devices is None else list(devices)
    n = len(devices)
    batch, accum = config.batch_size, config.accum_steps
    if batch <= 0 or batch % (n * accum):
        raise ValueError(
            f"config.batch_size must be a multiple of the {n} chips of {topology.accelerator_type}"
            f" times config.accum_steps ({accum}), got {batch}")
    mesh = train_mesh(config, devices)
    pieces = train_pieces(config)
    parts, tx, loss_fn, lr_fn = pieces.parts, pieces.tx, pieces.loss_fn, pieces.lr_fn
    key = jax.random.key(config.seed)
    shapes = jax.eval_shape(lambda p: common.init_state(p, tx, key), parts.params)
    shardings = parallel.state_shardings(shapes, mesh)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         shapes, shardings)
    size = config.model.img_size
    bsh = parallel.batch_sharding(mesh)
    batch_spec = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32,
                                                sharding=bsh)}
    if pieces.labels:
        batch_spec["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bsh)
    step = common.make_train_step(loss_fn, tx, mesh=mesh, state_sharding=shardings,
                                  accum_steps=accum, lr_fn=lr_fn)
    settings = {"batch": batch, "fsdp": config.mesh.fsdp, "remat": bool(config.model.remat),
                "accum": accum, "dtype": config.model.dtype}
    variant = config.model.variant
    name = "DMAE" if config.task == "pretrain" else "classifier"
    what = (f"{config.task} {name} {variant}/{config.model.patch_size} at {size}, batch {batch}"
            f", fsdp {settings['fsdp']}, remat {'on' if settings['remat'] else 'off'}, accum "
            f"{accum}, {settings['dtype']}")
    compiled = _compile(step.lower(state, batch_spec), "train", settings, what, topology)
    report = _report(compiled, what=what, topology=topology, num_chips=n, items_per_step=batch,
                     item="images", model_flops=pieces.flops_per_image * batch / n,
                     settings=settings)
    if accum > 1:
        # XLA's cost analysis counts a loop body once: the micro-batch scan ran accum times.
        # Step = accum x (what was counted - the optimizer update) + the update.
        update = _update_cost(tx, state, shardings)
        report.xla_flops = accum * (report.xla_flops - update[0]) + update[0]
        report.step_seconds = accum * (report.step_seconds - update[1]) + update[1]
    return report


def _update_cost(tx, state, shardings) -> tuple[float, float]:
    """(FLOPs, XLA seconds) per chip of the optimizer update alone (gradients as parameters)."""
    def update(params, opt_state):
        updates, opt_state = tx.update(params, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    sh = (shardings["params"], shardings["opt_state"])
    compiled = jax.jit(update, in_shardings=sh, out_shardings=sh).lower(
        state["params"], state["opt_state"]).compile()
    return _cost(compiled)


def _compile(lowered, task: str, settings: dict, what: str, topology: Topology):
    try:
        return lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA reports an OOM as a generic runtime error
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "memory" in text.lower():
            raise DoesNotFitError(
                f"{what} does not fit {topology.accelerator_type} ({topology.chip.name}, "
                f"{_gib(topology.chip.hbm_bytes)} HBM per chip): {text.splitlines()[0][:300]}."
                f" Try {_fit_advice(task, settings)}") from e
        raise


# ---------------------------------------------------------------------------------------------
# Certification step.
# ---------------------------------------------------------------------------------------------


def compile_certify(config, topology: Topology, variant: str,
                    devices: Sequence | None = None) -> CompileReport:
    """Compiles one certification sampling step (config.batch_size noisy samples of one image).

    `variant` is the classifier's ViT variant, optionally with its patch size ("large",
    "mu/4"; patch 16 by default): a certification config names only the export.

    Certification runs per host (each host certifies its own images on its local chips), so
    the step is compiled for the chips of one host of the slice.
    """
    devices = topology_devices(topology) if devices is None else list(devices)
    host = [d for d in devices if d.process_index == devices[0].process_index]
    batch = config.batch_size
    if batch % len(host):
        raise ValueError(f"config.batch_size must be a multiple of the {len(host)} chips of "
                         f"one {topology.accelerator_type} host, got {batch}")
    num_classes = _dataset(config.data.dataset)[1]
    size = config.data.image_size
    name, _, patch = variant.partition("/")
    model_cfg = defaults.model(name, img_size=size, patch_size=int(patch or 16))
    parts, _ = abstract_parts(lambda: create_classifier(model_cfg, num_classes,
                                                        rngs=nnx.Rngs(0)))

    def apply(params, images):
        return parts.bind(params)(images)

    certification = Settings(
        sigma=config.sigma if config.task == "certify" else tuple(config.sigmas),
        n0=config.n0, n=config.n, alpha=config.alpha, batch_size=batch,
        num_classes=num_classes, devices=tuple(host), noise=config.noise,
        compute_dtype=None if config.compute_dtype == "float32" else jnp.bfloat16)
    lowered = sampling.lower_count_step(
        certification, jax.tree_util.Partial(apply, parts.params), (size, size, 3))
    settings = {"batch": batch, "dtype": config.compute_dtype}
    what = (f"certify ViT {name}/{model_cfg.patch_size} classifier at {size}, {batch} noisy "
            f"samples per step, {config.compute_dtype}")
    compiled = _compile(lowered, "certify", settings, what, topology)
    flops = classifier_forward_flops(resolve_model_config(model_cfg), num_classes)
    return _report(compiled, what=what, topology=topology, num_chips=len(host),
                   items_per_step=batch, item="samples",
                   model_flops=flops * batch / len(host), settings=settings)


def compile_config(config, topology: Topology | str, *, variant: str | None = None,
                   devices: Sequence | None = None) -> CompileReport:
    """The compile report of any config's step (training or certification) on a slice.

    The config is resolved and validated as the run path does (`tasks.prepare`), without the
    exports it names: compiling needs their shapes only.
    """
    if isinstance(topology, str):
        topology = resolve_topology(topology)
    task, config = tasks.prepare(config, exports=False)
    if task.name in ("pretrain", "finetune"):
        return compile_train(config, topology, devices)
    if task.name in ("certify", "cascade"):
        if not variant:
            raise ConfigError("--variant (the classifier's ViT variant, e.g. base or large) "
                              "is required for a certification config")
        return compile_certify(config, topology, variant, devices)
    raise ConfigError(f"compile-only mode supports the tasks pretrain, finetune, certify and "
                      f"cascade, got config.task={task.name!r}")


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m dmae_jax.aot --config=... --topology=...`: prints the compile report.

    A bad config, flag, topology or variant is one `error:` line and exit status 2; a step
    that does not fit the chips prints the report, then what to change, and exits with 3.
    """
    if "JAX_PLATFORMS" not in os.environ:  # before any backend starts: no TPU is attached
        jax.config.update("jax_platforms", "cpu")
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Path to the config file (any pretrain/finetune/certify config).",
        lock_config=True)
    topology_flag = flags.DEFINE_string("topology", None, f"TPU slice: {TOPOLOGY_HELP}.")
    variant_flag = flags.DEFINE_string(
        "variant", None,
        "Certification configs only: the classifier's ViT variant[/patch], e.g. large or mu/4.")

    @errors.reporting
    def run(argv):
        del argv
        if config_flag.value is None or not topology_flag.value:
            raise ConfigError("--config=configs/NAME.py and --topology=v4-32 are required")
        try:
            topology = resolve_topology(topology_flag.value)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            report = compile_config(config_flag.value, topology, variant=variant_flag.value)
        except (ValueError, DoesNotFitError) as e:
            raise ConfigError(str(e)) from None
        print(report.format(), flush=True)
        if not report.fits:
            task = "certify" if report.item == "samples" else "train"
            print(f"error: does not fit; try {_fit_advice(task, report.settings)}",
                  file=sys.stderr, flush=True)
            sys.exit(3)

    app.run(run, argv=argv, flags_parser=config_lib.flags_parser(config_flag))


if __name__ == "__main__":
    main()
