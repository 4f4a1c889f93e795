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
from dmae_jax.architectures import num_kept
from dmae_jax.data import datasets
from dmae_jax.errors import ConfigError
from dmae_jax.models import ModelParts, create_classifier, create_dmae, resolve_model_config
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
    """One TPU chip generation, from the Cloud TPU documentation of each generation: HBM,
    dense bf16 peak, HBM bandwidth and inter-chip (ICI) bandwidth per chip."""

    name: str
    hbm_bytes: int
    peak_flops: float  # bf16 FLOP/s per chip
    chip_config: str  # libtpu's chip_config_name: "megacore" (2 TensorCores as one device)
    cores_per_chip: int  # what the "-N" of an accelerator type counts per chip
    hbm_bandwidth: float  # bytes/s per chip
    # Bytes/s one chip sends to the others during a collective: half the documented
    # bidirectional ICI bandwidth (v5e 400, v5p 1200, v6e 800 GB/s), which is also the
    # documented all-reduce bandwidth per pod over the pod's chips (v5e 51.2 TB/s / 256,
    # v6e 102.4 TB/s / 256); v4's page gives only the latter (1.1 PB/s / 4096 chips).
    ici_bandwidth: float


# device_kind (as libtpu reports it) -> chip.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, "megacore", 2, 1200e9, 1.1e15 / 4096),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, "default", 1, 819e9, 200e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, "megacore", 2, 2765e9, 600e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, "default", 1, 1638e9, 400e9),
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
# Collectives in the compiled program.
# ---------------------------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass
class Collectives:
    """The collectives of one compiled SPMD program, per kind, per chip and per step.

    `bytes` counts each collective's result on one chip; `sent` the bytes one chip sends for
    it with the ring algorithm over its group of g chips (all-reduce 2 (g-1)/g of the array,
    all-gather and all-to-all (g-1)/g of the result, reduce-scatter g-1 results, a
    collective-permute its whole result). Collectives in a loop body count once per trip.
    """

    count: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(COLLECTIVES, 0))
    bytes: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(COLLECTIVES, 0.0))
    sent: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(COLLECTIVES, 0.0))
    dtypes: dict = dataclasses.field(default_factory=lambda: {k: set() for k in COLLECTIVES})

    def line(self) -> str:
        """`collectives: all-reduce=N (X MiB, f32) all-gather=N (X MiB) ...`."""
        parts = []
        for kind in COLLECTIVES:
            mib = f"{self.bytes[kind] / 2**20:.1f} MiB"
            if kind == "all-reduce":
                mib += ", " + ("+".join(sorted(self.dtypes[kind])) or "none")
            parts.append(f"{kind}={self.count[kind]} ({mib})")
        return "collectives: " + " ".join(parts)

    def seconds(self, chip: Chip) -> float:
        """Time to send every collective's bytes over the chip's ICI, none of it overlapped."""
        return sum(self.sent.values()) / chip.ici_bandwidth


def _arrays(shape: str) -> list[tuple[str, int]]:
    """(element type, element count) of each array of an HLO shape (an array or a tuple)."""
    out = []
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        if dtype in _ITEMSIZE:
            out.append((dtype, math.prod(int(d) for d in dims.split(",") if d)))
    return out


def _group_size(attributes: str, num_devices: int) -> int:
    iota = re.search(r"replica_groups=\[\d+,(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(1))
    listed = re.search(r"replica_groups=\{\{([\d,]+)\}", attributes)
    return len(listed.group(1).split(",")) if listed else num_devices


def count_collectives(hlo_text: str, num_devices: int) -> Collectives:
    """The collectives of an optimised HLO module (`compiled.as_text()`), per chip.

    A synchronous collective is one instruction; an asynchronous one (`all-gather-start` /
    `-done`) counts at its `-done` (the result), with the group read from its `-start`.
    """
    instructions, trips, body_of = {}, {}, {}
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            computation = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        instructions[name] = (shape, opcode, rest, computation)
        if opcode == "while":
            body = re.search(r"body=%?([\w.\-]+)", rest)
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
            if body:
                body_of[body.group(1)] = computation
                trips[body.group(1)] = int(trip.group(1)) if trip else 1

    def repeats(comp: str) -> int:
        n = 1
        while comp in trips:
            n *= trips[comp]
            comp = body_of[comp]
        return n

    out = Collectives()
    for shape, opcode, rest, comp in instructions.values():
        kind = opcode.removesuffix("-done")
        if kind not in COLLECTIVES or opcode.endswith("-start"):
            continue
        attributes = rest
        if opcode.endswith("-done"):
            start = re.match(r"\s*%?([\w.\-]+)", rest)
            attributes = instructions.get(start.group(1), ("", "", "", ""))[2] if start else ""
        arrays = _arrays(shape)
        size = sum(n * _ITEMSIZE[dtype] for dtype, n in arrays) * repeats(comp)
        g = _group_size(attributes, num_devices)
        share = {"all-reduce": 2 * (g - 1) / g, "all-gather": (g - 1) / g,
                 "all-to-all": (g - 1) / g, "reduce-scatter": g - 1,
                 "collective-permute": 1.0}[kind]
        out.count[kind] += repeats(comp)
        out.bytes[kind] += size
        out.sent[kind] += share * size
        out.dtypes[kind].update(dtype for dtype, _ in arrays)
    return out


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
    xla_seconds: float  # XLA's estimated step time, ConcatBitcast calls corrected
    collectives: Collectives
    settings: dict = dataclasses.field(default_factory=dict)
    concat_bitcasts: int = 0  # libtpu's ConcatBitcast calls (priced at -1 s each, added back)
    instruction_seconds: float = math.nan  # the per-instruction estimates, summed
    kernel_calls: int = 0  # fused-attention custom calls (Pallas): not priced by XLA
    kernel_seconds: float = 0.0  # our estimate for them (HBM traffic / bandwidth)
    kernel_bytes: float = 0.0  # their estimated HBM traffic
    xla_attention_bytes: float = 0.0  # the xla path's [B, H, N, N] traffic, for comparison
    reference: CompileReport | None = None  # a plain ViT step under the same cost model

    @property
    def step_seconds(self) -> float:
        """Predicted compute time of a step: XLA's estimate plus the unpriced kernels'."""
        return self.xla_seconds + self.kernel_seconds

    @property
    def comm_seconds(self) -> float:
        """The collectives' bytes over the chip's ICI bandwidth, none of it overlapped."""
        return self.collectives.seconds(self.topology.chip)

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
        """Predicted throughput per chip from the predicted step time."""
        return self.items_per_step / self.num_chips / self.step_seconds

    @property
    def mfu(self) -> float:
        """Model FLOP utilisation: analytic model FLOP/s per chip over the chip's bf16 peak."""
        return self.model_flops / self.step_seconds / self.topology.chip.peak_flops

    def warnings(self) -> list[str]:
        """Where the estimate is less trustworthy than it looks."""
        out = []
        gap = abs(self.instruction_seconds - self.xla_seconds) / self.xla_seconds
        if gap > ESTIMATE_TOLERANCE:
            out.append(
                f"XLA's program estimate ({self.xla_seconds * 1e3:.1f} ms) and its "
                f"per-instruction estimates summed ({self.instruction_seconds * 1e3:.1f} ms) "
                f"differ by {100 * gap:.0f}%: read the step time as +-{100 * gap:.0f}%")
        return out

    def format(self) -> str:
        """The human-readable block `python -m dmae_jax.aot` prints."""
        chip = self.topology.chip
        hbm = chip.hbm_bytes
        s = self.settings
        reduced = self.collectives.dtypes["all-reduce"] | self.collectives.dtypes["reduce-scatter"]
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
            f"  numerics  {s.get('dtype')} compute, float32 parameters, gradients reduced in "
            f"{'+'.join(sorted(reduced)) or '-'}; matmul precision "
            f"{s.get('matmul_precision') or 'default'}; attention "
            f"{s.get('attention')} ({s.get('attention_logits')} logits)",
            f"  compute   {self.xla_seconds * 1e3:.1f} ms (XLA's cost model"
            + (f"; its {self.concat_bitcasts} ConcatBitcast calls, priced at -1 s each, "
               "added back" if self.concat_bitcasts else "") + ")",
        ]
        if self.kernel_calls:
            lines.append(
                f"  kernels   + {self.kernel_seconds * 1e3:.1f} ms: {self.kernel_calls} Pallas "
                f"attention custom calls, which XLA's cost model cannot price; estimated "
                f"from their HBM traffic, {_gib(self.kernel_bytes)} at "
                f"{chip.hbm_bandwidth / 1e9:.0f} GB/s (the xla path's [B, H, N, N] arrays: "
                f"{_gib(self.xla_attention_bytes)})")
        sent = sum(self.collectives.sent.values())
        lines += [
            f"  comms     {self.comm_seconds * 1e3:.1f} ms if none of it overlaps compute: "
            f"{sent / 2**20:.1f} MiB sent per chip at {chip.ici_bandwidth / 1e9:.0f} GB/s "
            f"(ICI per chip, Cloud TPU documentation)",
            self.collectives.line(),
            f"  step      {self.step_seconds * 1e3:.1f} ms predicted (compute"
            + (" + kernels" if self.kernel_calls else "") + ")",
            f"  predicted {self.items_per_sec_per_chip:,.0f} {self.item}/s per chip, "
            f"{self.items_per_sec_per_chip * self.num_chips:,.0f} {self.item}/s in all, "
            f"MFU {100 * self.mfu:.0f}% of {chip.peak_flops / 1e12:.0f} TFLOP/s bf16",
        ]
        if self.reference is not None:
            lines.append(self.reference_line())
        lines += [f"  warning   {w}" for w in self.warnings()]
        return "\n".join(lines)

    def reference_line(self) -> str:
        """How this step compares with `reference`, a plain ViT step (`compile_reference`)."""
        ref = self.reference
        return (f"  reference {ref.what} on the same chips: {ref.step_seconds * 1e3:.1f} ms, "
                f"MFU {100 * ref.mfu:.0f}%; this step takes "
                f"{self.step_seconds / ref.step_seconds:.2f}x its time at "
                f"{self.mfu / ref.mfu:.2f}x its MFU")


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# libtpu's cost model gives these custom calls (concatenations it emits itself) a cost of
# -1 s each in the program's `optimal_seconds`; their real cost is a small copy.
_UNCOSTED_CALLS = 'custom_call_target="ConcatBitcast"'
# Pallas kernels: custom calls XLA's cost model cannot price.
_KERNEL_CALLS = 'custom_call_target="tpu_custom_call"'
# How far XLA's two estimates of a step (the program's, the instructions' summed) may differ
# before the report warns.
ESTIMATE_TOLERANCE = 0.05


def _clock_hz(chip: Chip) -> float:
    """The TensorCore clock implied by the documented peak: 2 FLOPs per MAC per cycle of its
    128x128 systolic arrays (v4, v5p: 8 per chip; v5e: 4; v6e: 2 of 256x256)."""
    macs = {"v4": 8 * 128 * 128, "v5p": 8 * 128 * 128, "v5e": 4 * 128 * 128,
            "v6e": 2 * 256 * 256}[chip.name]
    return chip.peak_flops / (2 * macs)


def _cost(compiled, chip: Chip) -> tuple[float, float, int, float]:
    """(FLOPs, XLA's step seconds with the ConcatBitcast calls corrected, how many there
    were, the per-instruction estimates summed) per chip of a compiled program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    if not cost or "flops" not in cost or "optimal_seconds" not in cost:
        raise RuntimeError("the compiler returned no cost analysis for this program")
    text = compiled.as_text()
    calls = text.count(_UNCOSTED_CALLS)
    seconds = float(cost["optimal_seconds"]) + calls
    if not seconds > 0:
        raise RuntimeError(
            f"XLA's cost model gave no usable step time ({cost['optimal_seconds']} s with "
            f"{calls} ConcatBitcast calls)")
    cycles = sum(int(c) for c in re.findall(r'"estimated_cycles":"(\d+)"', text))
    return float(cost["flops"]), seconds, calls, cycles / _clock_hz(chip)


def _report(compiled, *, topology: Topology, num_chips: int, **kwargs) -> CompileReport:
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError("the compiler returned no memory analysis for this program")
    flops, seconds, calls, summed = _cost(compiled, topology.chip)
    text = compiled.as_text()
    return CompileReport(
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes, xla_flops=flops, xla_seconds=seconds,
        concat_bitcasts=calls, instruction_seconds=summed,
        collectives=count_collectives(text, num_chips), kernel_calls=text.count(_KERNEL_CALLS),
        topology=topology, num_chips=num_chips, **kwargs)


def _advice(task: str, settings: dict, topology: Topology) -> str:
    return _fit_advice(task, settings, settings.get("state_bytes"), topology.chip.hbm_bytes)


def _fit_advice(task: str, settings: dict, state_bytes: float | None = None,
                hbm_bytes: float | None = None) -> str:
    """What to change when a step does not fit, the largest overflowing part first.

    `state_bytes` is the per-chip size of the parameters and optimizer state: when it takes
    half the chip or more, sharding it (FSDP) comes first; otherwise the activations
    overflow, and recomputing them (remat), smaller micro-batches (accumulation) or a
    smaller batch come first.
    """
    if task == "certify":
        steps = [f"--config.batch_size={max(settings['batch'] // 2, 1)} (noisy samples per "
                 "step; certification results do not depend on it)"]
        if settings.get("dtype") != "bfloat16":
            steps.append("--config.compute_dtype=bfloat16")
        return "; or ".join(steps)
    activations = []
    if settings.get("dtype") != "bfloat16":
        activations.append("--config.model.dtype=bfloat16 (halves the activations)")
    if not settings.get("remat"):
        activations.append("--config.model.remat=True (recompute activations in the backward "
                           "pass)")
    activations.append(f"--config.accum_steps={settings['accum'] * 2} (same global batch in "
                       "smaller micro-batches)")
    activations.append(f"--config.batch_size={settings['batch'] // 2} (fewer images per step)")
    state = [f"--config.mesh.fsdp={settings['fsdp'] * 2} (shard parameters and optimizer "
             "state over more chips)"]
    state_first = state_bytes is not None and hbm_bytes and state_bytes >= 0.5 * hbm_bytes
    steps = state + activations if state_first else activations + state
    what = ""
    if state_bytes is not None:
        what = (f"parameters and optimizer state take {_gib(state_bytes)} per chip, "
                + ("the largest part: " if state_first else "the activations the rest: "))
    return what + "; or ".join(steps)


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


def train_pieces(config, *, concrete: bool = False, platform: str | None = None,
                 batch_shards: int = 1) -> TrainPieces:
    """The optimizer, loss and model of a `pretrain` or `finetune` config's training step,
    built by the trainers' own `make_optimizer` and `make_loss_fn`, for `platform` (None:
    JAX's default backend) and a batch split over `batch_shards` devices.

    Abstract parameters by default (compiling needs only their shapes); `concrete=True`
    initialises them for a real run (the GPU check). `config` may be unresolved: its derived
    fields are filled here as the run path fills them.
    """
    config = config_lib.resolve(config)
    num_examples, num_classes = _dataset(config.data.dataset)
    per_epoch, total = _steps(config, num_examples)
    if config.task == "pretrain":
        parts, _ = _model_parts(lambda: create_dmae(config.model, rngs=nnx.Rngs(config.seed),
                                                    platform=platform), concrete)
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
        lambda: create_classifier(config.model, num_classes, rngs=nnx.Rngs(config.seed),
                                  platform=platform), concrete)
    tx, schedule = finetune.make_optimizer(config, parts.params, num_layers=len(model.blocks),
                                           steps_per_epoch=per_epoch, total_steps=total)
    flops = config.num_noise_samples * TRAIN_FLOPS_FACTOR * classifier_forward_flops(
        resolve_model_config(config.model), num_classes)
    loss_fn = finetune.make_loss_fn(config, parts, num_classes, batch_shards=batch_shards)
    return TrainPieces(parts, tx, loss_fn, schedule, flops, labels=True)


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
    pieces = train_pieces(config, platform="tpu", batch_shards=n)
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
                "accum": accum, "dtype": config.model.dtype, **_numerics(config.model),
                "state_bytes": _per_chip_bytes(state)}
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
        flops, seconds, _, summed = _update_cost(tx, state, shardings, topology.chip)
        report.xla_flops = accum * (report.xla_flops - flops) + flops
        report.xla_seconds = accum * (report.xla_seconds - seconds) + seconds
        report.instruction_seconds = accum * (report.instruction_seconds - summed) + summed
    _price_kernels(report, _attention_layers(config, batch // n), training=True,
                   remat=settings["remat"])
    return report


def _numerics(model_cfg) -> dict:
    """The report's numerics settings of a model config: resolved for a TPU."""
    from dmae_jax.models import attention, vit

    cfg = resolve_model_config(model_cfg)
    dtype = vit.DTYPES[cfg["dtype"]]
    impl = attention.resolve(cfg["attention"], "tpu", dtype)
    return {"attention": impl,
            "attention_logits": attention.resolve_logits(cfg["attention_logits"], impl, dtype),
            "matmul_precision": vit.resolve_matmul_precision(cfg["matmul_precision"], dtype)}


def _per_chip_bytes(tree) -> int:
    """Bytes per chip of a tree of sharded ShapeDtypeStructs."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def _attention_layers(config, images_per_chip: int) -> list[tuple[int, int, int, int, int]]:
    """(sequences, heads, tokens, head_dim, layers) per chip of a config's attention layers."""
    from dmae_jax.models import resolve_model_config

    cfg = resolve_model_config(config.model)
    num_patches = (cfg["img_size"] // cfg["patch_size"]) ** 2
    width, heads = cfg["width"], cfg["num_heads"]
    if config.task == "pretrain":
        kept = num_kept(num_patches, config.mask_ratio)
        dec, dec_heads = cfg["decoder_width"], cfg["decoder_heads"]
        return [(images_per_chip, heads, 1 + kept, width // heads, cfg["depth"]),
                (images_per_chip, dec_heads, 1 + num_patches, dec // dec_heads,
                 cfg["decoder_depth"])]
    copies = config.get("num_noise_samples", 1)
    return [(images_per_chip * copies, heads, 1 + num_patches, width // heads, cfg["depth"])]


def _price_kernels(report: CompileReport, layers, *, training: bool, remat: bool) -> None:
    """Adds the Pallas attention kernels' estimated time (their HBM traffic at the chip's HBM
    bandwidth) to a report whose program has them, and the xla path's traffic beside it."""
    from dmae_jax.models import attention

    if not report.kernel_calls:
        return
    dtype = report.settings.get("dtype", "float32")
    itemsize = 2 if dtype == "bfloat16" else 4
    passes = {"forward": 2 if remat else 1, "backward": 1 if training else 0}
    report.kernel_bytes = attention.step_hbm_bytes(layers, "pallas", itemsize, **passes)
    report.xla_attention_bytes = attention.step_hbm_bytes(layers, "xla", 4, **passes)
    report.kernel_seconds = report.kernel_bytes / report.topology.chip.hbm_bandwidth


def _update_cost(tx, state, shardings, chip: Chip) -> tuple[float, float, int, float]:
    """`_cost` of the optimizer update alone (gradients as parameters)."""
    import jax

    def update(params, opt_state):
        updates, opt_state = tx.update(params, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    sh = (shardings["params"], shardings["opt_state"])
    compiled = jax.jit(update, in_shardings=sh, out_shardings=sh).lower(
        state["params"], state["opt_state"]).compile()
    return _cost(compiled, chip)


def _compile(lowered, task: str, settings: dict, what: str, topology: Topology):
    try:
        return lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA reports an OOM as a generic runtime error
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "memory" in text.lower():
            raise DoesNotFitError(
                f"{what} does not fit {topology.accelerator_type} ({topology.chip.name}, "
                f"{_gib(topology.chip.hbm_bytes)} HBM per chip): {text.splitlines()[0][:300]}."
                f" Try {_advice(task, settings, topology)}") from e
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
    # Built in the compute dtype, as the certification task builds it.
    model_cfg = defaults.model(name, img_size=size, patch_size=int(patch or 16),
                               dtype=config.compute_dtype)
    parts, _ = abstract_parts(lambda: create_classifier(model_cfg, num_classes,
                                                        rngs=nnx.Rngs(0), platform="tpu"))

    def apply(params, images):
        return parts.bind(params)(images)

    certification = Settings(
        sigma=config.sigma if config.task == "certify" else tuple(config.sigmas),
        n0=config.n0, n=config.n, alpha=config.alpha, batch_size=batch,
        num_classes=num_classes, devices=tuple(host), noise=config.noise,
        compute_dtype=None if config.compute_dtype == "float32" else jnp.bfloat16)
    lowered = sampling.lower_count_step(
        certification, jax.tree_util.Partial(apply, parts.params), (size, size, 3))
    settings = {"batch": batch, "dtype": config.compute_dtype, **_numerics(model_cfg)}
    what = (f"certify ViT {name}/{model_cfg.patch_size} classifier at {size}, {batch} noisy "
            f"samples per step, {config.compute_dtype}")
    compiled = _compile(lowered, "certify", settings, what, topology)
    flops = classifier_forward_flops(resolve_model_config(model_cfg), num_classes)
    report = _report(compiled, what=what, topology=topology, num_chips=len(host),
                     items_per_step=batch, item="samples",
                     model_flops=flops * batch / len(host), settings=settings)
    cfg = resolve_model_config(model_cfg)
    tokens = 1 + (size // cfg["patch_size"]) ** 2
    _price_kernels(report, [(batch // len(host), cfg["num_heads"], tokens,
                             cfg["width"] // cfg["num_heads"], cfg["depth"])],
                   training=False, remat=False)
    return report


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
# Reference: a plain ViT training step under the same cost model.
# ---------------------------------------------------------------------------------------------


def _reference_params(cfg: dict, num_classes: int) -> dict:
    """The parameters of a plain ViT (pre-norm, learned position embedding, cls-token head)."""
    import jax.numpy as jnp

    d, heads = cfg["width"], cfg["num_heads"]
    hidden, patch = 4 * d, cfg["patch_size"] ** 2 * 3
    tokens = 1 + (cfg["img_size"] // cfg["patch_size"]) ** 2

    def zeros(*shape):
        return jnp.zeros(shape, jnp.float32)

    def block():
        return {"ln1": (zeros(d), zeros(d)), "ln2": (zeros(d), zeros(d)),
                "qkv": (zeros(d, 3, heads, d // heads), zeros(3, heads, d // heads)),
                "out": (zeros(heads, d // heads, d), zeros(d)),
                "fc1": (zeros(d, hidden), zeros(hidden)), "fc2": (zeros(hidden, d), zeros(d))}

    return {"embed": (zeros(patch, d), zeros(d)), "cls": zeros(d), "pos": zeros(tokens, d),
            "blocks": [block() for _ in range(cfg["depth"])], "norm": (zeros(d), zeros(d)),
            "head": (zeros(d, num_classes), zeros(num_classes))}


def _reference_loss(params: dict, images, labels, *, patch_size: int, dtype):
    """Cross-entropy of a plain ViT on images [B, H, W, 3]: a few lines of JAX, no framework."""
    import jax
    import jax.numpy as jnp

    def dense(x, w, spec="...i,io->...o"):
        return jnp.einsum(spec, x, w[0].astype(dtype)) + w[1].astype(dtype)

    def norm(x, w):
        x32 = x.astype(jnp.float32)
        x32 = (x32 - x32.mean(-1, keepdims=True)) * jax.lax.rsqrt(x32.var(-1, keepdims=True)
                                                                  + 1e-6)
        return (x32 * w[0] + w[1]).astype(dtype)

    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = dense(x.reshape(b, -1, p * p * c).astype(dtype), params["embed"])
    cls = jnp.broadcast_to(params["cls"].astype(dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + params["pos"].astype(dtype)
    for blk in params["blocks"]:
        q, k, v = (dense(norm(x, blk["ln1"]), (blk["qkv"][0][:, i], blk["qkv"][1][i]),
                         "bnd,dhk->bnhk") for i in range(3))
        x = x + dense(jax.nn.dot_product_attention(q, k, v), blk["out"], "bnhk,hkd->bnd")
        x = x + dense(jax.nn.gelu(dense(norm(x, blk["ln2"]), blk["fc1"]), approximate=False),
                      blk["fc2"])
    logits = dense(norm(x[:, 0], params["norm"]), params["head"]).astype(jnp.float32)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def reference_images(config) -> int:
    """Images a training config's step sends through its ViT: the batch, times the noisy
    copies of a fine-tuning step."""
    return config.batch_size * (config.num_noise_samples if config.task == "finetune" else 1)


def compile_reference(config, topology: Topology | str, devices: Sequence | None = None, *,
                      images: int | None = None) -> CompileReport:
    """A plain ViT supervised training step (AdamW, cross-entropy over 1000 classes) of the
    config's encoder, compiled like its step: the same mesh and parameter sharding, `images`
    images per step (a fine-tuning step's noisy copies count as images), compute dtype and
    matmul precision (`images` default: `reference_images(config)`). What a ViT of this size
    costs under the same cost model when nothing of DMAE's is in it."""
    import jax
    import jax.numpy as jnp

    from dmae_jax import parallel
    from dmae_jax.models import resolve_model_config, vit

    if isinstance(topology, str):
        topology = resolve_topology(topology)
    config = config_lib.resolve(config)
    images = images or reference_images(config)
    devices = topology_devices(topology) if devices is None else list(devices)
    n = len(devices)
    cfg = resolve_model_config(config.model)
    dtype = vit.DTYPES[cfg["dtype"]]
    precision = vit.resolve_matmul_precision(cfg["matmul_precision"], dtype)
    tx = optax.adamw(1e-3, weight_decay=0.05)
    mesh = train_mesh(config, devices)

    def init():
        params = _reference_params(cfg, 1000)
        return {"params": params, "opt_state": tx.init(params)}

    shapes = jax.eval_shape(init)
    shardings = parallel.state_shardings(shapes, mesh)
    state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                         shapes, shardings)

    def step(state, images_, labels):
        with jax.default_matmul_precision(precision):
            loss, grads = jax.value_and_grad(_reference_loss)(
                state["params"], images_, labels, patch_size=cfg["patch_size"], dtype=dtype)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state}, loss

    bsh = parallel.batch_sharding(mesh)
    size = cfg["img_size"]
    lowered = jax.jit(step, out_shardings=(shardings, parallel.replicated(mesh)),
                      donate_argnums=(0,)).lower(
        state, jax.ShapeDtypeStruct((images, size, size, 3), jnp.float32, sharding=bsh),
        jax.ShapeDtypeStruct((images,), jnp.int32, sharding=bsh))
    settings = {"batch": images, "fsdp": config.mesh.fsdp, "remat": False, "accum": 1,
                "dtype": cfg["dtype"], "attention": "xla", "attention_logits": "float32",
                "matmul_precision": precision}
    what = (f"plain ViT {cfg['variant']}/{cfg['patch_size']} supervised step, {images} images, "
            f"{cfg['dtype']}")
    compiled = _compile(lowered, "train", settings, what, topology)
    return _report(compiled, what=what, topology=topology, num_chips=n, items_per_step=images,
                   item="images", settings=settings,
                   model_flops=TRAIN_FLOPS_FACTOR * classifier_forward_flops(cfg, 1000)
                   * images / n)


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
    reference_flag = flags.DEFINE_bool(
        "reference", True,
        "Training configs: also compile a plain ViT step of the same encoder and print the "
        "ratio to it (a second compile).")

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
            print(f"error: does not fit; try {_advice(task, report.settings, report.topology)}",
                  file=sys.stderr, flush=True)
            sys.exit(3)
        if reference_flag.value and report.item == "images":
            # Compiled after the step's own executable is gone: two at once would double the
            # compiler's host memory.
            report.reference = compile_reference(config_flag.value, report.topology)
            print(report.reference_line(), flush=True)

    app.run(run, argv=argv, flags_parser=config_lib.flags_parser(config_flag))


if __name__ == "__main__":
    main()
