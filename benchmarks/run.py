r"""Side-by-side benchmarks against PyTorch: matmul peak, training steps, certification.

  python -m benchmarks.run [--json FILE] [--quick] [--only pretrain,finetune,certify]

Every figure is measured in this one run, ours and PyTorch's alternating repetition by
repetition (so a burst of load from another process hits both sides), after warm-up; the
tables give the median and the spread (min-max) of the repetitions. Our side is the real
code path of a config: the digits rows train `configs/digits.py`'s pretraining and
fine-tuning steps as the trainers do (`aot.train_pieces`: the trainers' own loss and
optimizer; `common.make_train_step` with the config's `steps_per_call`, fed by
`common.run_steps`), and the process starts with `dmae_jax.host.configure` as
`dmae_jax.main` does; certification is `dmae_jax.smoothing.certify.sample_counts`.
PyTorch's side is the official architecture (`tests/torch_dmae.py`), eager: forward +
backward + `torch.optim.AdamW` with the official parameter groups (pretraining: timm's
weight-decay split; fine-tuning: two noisy copies, label smoothing, the consistency loss and
MAE's layer-wise lr decay), and Cohen et al.'s `_sample_noise` loop for certification. MFU
is the model's analytic matmul FLOP rate divided by the JAX matmul peak measured in the same
run. One JAX device. Every row records the 1-minute load average before and after it
(os.getloadavg): a figure taken while other processes ran is marked as such, not mistaken
for this machine's speed. About 16 minutes on 2 cores shared with load 9 (roughly a quarter
of that idle); `--quick` (no ViT-B/16, fewer repetitions) 2 to 5 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from dmae_jax import host

host.configure()  # as dmae_jax.main: before JAX starts its threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# -------------------------------------------------------------------------------------------
# Timing.
# -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Seconds per repetition of one side of a figure, and the work one repetition does."""

    seconds: list[float]
    work: float  # items (images, samples, FLOPs) per repetition

    @property
    def rates(self) -> list[float]:
        """work / seconds of every repetition."""
        return [self.work / s for s in self.seconds]

    @property
    def rate(self) -> float:
        """Median rate."""
        return statistics.median(self.rates)

    def spread(self) -> str:
        """Relative spread of the rates, '(-a%/+b%)' around the median."""
        rates, med = self.rates, self.rate
        return f"(-{100 * (1 - min(rates) / med):.0f}%/+{100 * (max(rates) / med - 1):.0f}%)"


def time_interleaved(
    fns: dict[str, Callable[[], Any]], works: dict[str, float], *, warmup: int, reps: int
) -> dict[str, Timing]:
    """Times each blocking fn `reps` times after `warmup` calls, alternating between the fns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return {name: Timing(seconds[name], works[name]) for name in fns}


# FLOP counts (matmuls only): the same analytic counts the compile-only mode reports MFU with.
from dmae_jax.aot import classifier_forward_flops  # noqa: E402

# -------------------------------------------------------------------------------------------
# Model configurations.
# -------------------------------------------------------------------------------------------

# (config file, stage of an end_to_end config or None, overrides): the configs the rows train.
TRAIN_CASES = {
    # configs/digits.py's pretraining: ViT "mu", 16x16, 50% masking, pixel targets, batch 128.
    "pretrain cpu": ("configs/digits.py", "pretrain", {}),
    # Its fine-tuning at sigma 0.25: 64 images x 2 noisy copies, consistency loss.
    "finetune cpu": ("configs/digits.py", "finetune", {"sigma": 0.25}),
    # The paper's DMAE-B/16 (MAE decoder 512/8/16) at 224, batch 8.
    "pretrain vitb": ("configs/vit_base.py", None, {"batch_size": 8}),
}
CERTIFY_CASES = {
    # The classifier of the CPU config (configs/digits.py fine-tuning), 10 classes.
    "cpu": dict(variant="mu", img_size=16, patch_size=4, num_classes=10, batch=500, num=2000),
    # ViT-B/16 at 224, 1000 classes: one batch of noisy samples per call.
    "vitb": dict(variant="base", img_size=224, patch_size=16, num_classes=1000, batch=16,
                 num=16),
}
SIGMA = 0.25


def _model_cfg(case: dict, dtype: str = "float32") -> dict:
    from dmae_jax.models import resolve_model_config

    keys = ("variant", "img_size", "patch_size", "decoder_width", "decoder_depth",
            "decoder_heads")
    return resolve_model_config({**{k: case[k] for k in keys if k in case}, "dtype": dtype})


# -------------------------------------------------------------------------------------------
# Matmul peak.
# -------------------------------------------------------------------------------------------


def bench_matmul(size: int, reps: int) -> dict[str, Timing]:
    """fp32 and bf16 [size, size] @ [size, size] in JAX (jit) and PyTorch; work in FLOPs."""
    import torch

    flops = 2.0 * size**3
    fns, works = {}, {}
    for name, jdt, tdt in (("fp32", jnp.float32, torch.float32),
                           ("bf16", jnp.bfloat16, torch.bfloat16)):
        a = jax.random.normal(jax.random.key(0), (size, size), jdt)
        b = jax.random.normal(jax.random.key(1), (size, size), jdt)
        dot = jax.jit(jnp.dot)
        ta, tb = torch.randn(size, size, dtype=tdt), torch.randn(size, size, dtype=tdt)
        fns[f"jax_{name}"] = lambda dot=dot, a=a, b=b: dot(a, b).block_until_ready()
        fns[f"torch_{name}"] = lambda ta=ta, tb=tb: torch.mm(ta, tb)
        works[f"jax_{name}"] = works[f"torch_{name}"] = flops
    return time_interleaved(fns, works, warmup=2, reps=reps)


# -------------------------------------------------------------------------------------------
# Pretraining step.
# -------------------------------------------------------------------------------------------


def _one_device_mesh():
    from jax.sharding import AxisType, Mesh

    from dmae_jax import parallel

    return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), parallel.BATCH_AXES,
                axis_types=(AxisType.Auto,) * 2)


def train_config(name: str):
    """The resolved config of TRAIN_CASES[name]."""
    import importlib.util

    from dmae_jax import config as config_lib

    path, stage, overrides = TRAIN_CASES[name]
    spec = importlib.util.spec_from_file_location("config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config = config[stage] if stage else config
    config.update(overrides)
    return config_lib.resolve(config)


def jax_train_steps(config, steps: int) -> Callable[[], None]:
    """`steps` real training steps of `config` per call, blocking: the trainer's step
    (`aot.train_pieces`), `config.steps_per_call` of them per dispatch."""
    from dmae_jax import aot, parallel
    from dmae_jax.train import common

    pieces = aot.train_pieces(config, concrete=True)
    mesh = _one_device_mesh()
    make_state = lambda p: common.init_state(p, pieces.tx, jax.random.key(0))  # noqa: E731
    shardings = parallel.state_shardings(jax.eval_shape(make_state, pieces.parts.params), mesh)
    state = [jax.jit(make_state, out_shardings=shardings)(pieces.parts.params)]
    per_call = config.get("steps_per_call", 1)
    step = common.make_train_step(pieces.loss_fn, pieces.tx, mesh=mesh, state_sharding=shardings,
                                  lr_fn=pieces.lr_fn, steps_per_call=per_call)
    size, b = config.data.image_size, config.batch_size
    rng = np.random.default_rng(0)
    batches = {"image": rng.random((steps, b, size, size, 3), np.float32)}
    if pieces.labels:
        batches["label"] = rng.integers(0, 10, (steps, b)).astype(np.int32)

    def run() -> None:
        for first in range(0, steps, per_call):
            call = {k: v[first:first + per_call] for k, v in batches.items()}
            state[0], metrics = common.run_steps(step, state[0], call, mesh, per_call)
        jax.block_until_ready((state[0], metrics))

    return run


def torch_pretrain_step(config) -> Callable[[], None]:
    """One eager PyTorch step of the official DMAE: forward, backward, AdamW (timm groups)."""
    import torch

    from dmae_jax.models import resolve_model_config
    from tests.torch_dmae import TorchDMAE

    cfg = resolve_model_config(config.model)
    torch.manual_seed(0)
    model = TorchDMAE(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["width"],
        depth=cfg["depth"], num_heads=cfg["num_heads"], decoder_embed_dim=cfg["decoder_width"],
        decoder_depth=cfg["decoder_depth"], decoder_num_heads=cfg["decoder_heads"],
        norm_pix_loss=cfg["norm_pix_loss"],
    ).train()
    # timm.optim.optim_factory.add_weight_decay, as the official main_pretrain.py.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                             {"params": decay, "weight_decay": config.optim.weight_decay}],
                            lr=config.optim.base_lr * config.batch_size / 256,
                            betas=(config.optim.b1, config.optim.b2))
    size = config.data.image_size
    images = torch.rand(config.batch_size, 3, size, size)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss, _, _ = model(images, mask_ratio=config.mask_ratio, sigma=config.sigma)
        loss.backward()
        opt.step()

    return run


def torch_finetune_step(config) -> Callable[[], None]:
    """One eager PyTorch step of the official fine-tuning (engine_finetune.py with the
    consistency loss): m noisy copies, label-smoothing cross-entropy + lambda KL + eta H,
    backward, AdamW with MAE's layer-wise lr decay groups (util/lr_decay.py)."""
    import torch
    import torch.nn.functional as F

    from dmae_jax.models import resolve_model_config
    from tests.torch_dmae import TorchViTClassifier

    cfg = resolve_model_config(config.model)
    torch.manual_seed(0)
    model = TorchViTClassifier(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], num_classes=10,
        embed_dim=cfg["width"], depth=cfg["depth"], num_heads=cfg["num_heads"]).train()
    num_layers = cfg["depth"] + 1
    groups: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        top = name.split(".")[0]
        layer = (0 if top in ("cls_token", "pos_embed", "patch_embed")
                 else int(name.split(".")[1]) + 1 if top == "blocks" else num_layers)
        groups.setdefault((layer, p.ndim > 1 and top not in ("cls_token", "pos_embed")),
                          []).append(p)
    lr = config.optim.base_lr * config.batch_size / 256
    opt = torch.optim.AdamW(
        [{"params": ps, "weight_decay": config.optim.weight_decay if decays else 0.0,
          "lr": lr * config.optim.layer_decay ** (num_layers - layer)}
         for (layer, decays), ps in groups.items()],
        lr=lr, betas=(config.optim.b1, config.optim.b2))
    m, size = config.num_noise_samples, config.data.image_size
    images = torch.rand(config.batch_size, 3, size, size)
    labels = torch.randint(0, 10, (config.batch_size,))

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        x, y = images.repeat(m, 1, 1, 1), labels.repeat(m)
        logits = model(x + torch.randn_like(x) * config.sigma)
        loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
        # DMAE util/consistency.consistency_loss (loss="default").
        chunks = logits.chunk(m)
        avg = sum(F.softmax(c, dim=1) for c in chunks) / m
        kl = sum(F.kl_div(F.log_softmax(c, dim=1), avg, reduction="none").sum(1)
                 for c in chunks) / m
        entropy = (-avg * torch.log(avg.clamp(min=1e-20))).sum(1)
        (loss + (config.lbd * kl + config.eta * entropy).mean()).backward()
        opt.step()

    return run


def bench_train(name: str, reps: int, steps: int) -> dict[str, Any]:
    """Images/s of our training steps and PyTorch's, and our MFU inputs (FLOPs per image)."""
    from dmae_jax import aot

    config = train_config(name)
    torch_step = torch_pretrain_step if config.task == "pretrain" else torch_finetune_step
    fns = {"ours": jax_train_steps(config, steps), "torch": torch_step(config)}
    torch_steps = fns["torch"]
    fns["torch"] = lambda: [torch_steps() for _ in range(steps)]
    images = float(config.batch_size * steps)
    timings = time_interleaved(fns, {"ours": images, "torch": images}, warmup=1, reps=reps)
    flops = aot.train_pieces(config).flops_per_image
    return {"case": name, "timings": timings, "flops_per_image": flops,
            "batch": config.batch_size, "steps_per_call": config.get("steps_per_call", 1)}


# -------------------------------------------------------------------------------------------
# Certification sampling.
# -------------------------------------------------------------------------------------------


def _jax_classifier(case: dict, dtype: str):
    """(logits_fn as a Partial over replicated params, apply(params, images), params)."""
    from flax import nnx

    from dmae_jax.models import ModelParts, create_classifier
    from dmae_jax.smoothing import place_replicated

    model = create_classifier(_model_cfg(case, dtype), case["num_classes"], rngs=nnx.Rngs(0))
    parts = ModelParts.split(model)

    def apply(params, images):
        return parts.bind(params)(images)

    params = jax.tree.map(jnp.asarray, parts.params)
    logits_fn = place_replicated(jax.tree_util.Partial(apply, params),
                                         jax.devices()[:1])
    return logits_fn, apply, params


def bench_certify(name: str, case: dict, dtype: str, reps: int) -> dict[str, Any]:
    """Noisy forward passes/s: sample_counts vs Cohen's loop; plus our sampler's overhead."""
    import torch

    from dmae_jax.smoothing import sample_counts
    from tests.torch_dmae import TorchViTClassifier

    cfg = _model_cfg(case)
    size, k, batch, num = case["img_size"], case["num_classes"], case["batch"], case["num"]
    compute_dtype = jnp.bfloat16 if dtype == "bfloat16" else None
    x = np.random.default_rng(0).random((size, size, 3), np.float32)
    logits_fn, apply, params = _jax_classifier(case, dtype)
    devices = jax.devices()[:1]

    def ours(fn=logits_fn) -> None:
        sample_counts(fn, x, sigma=SIGMA, num=num, batch_size=batch,
                              rng=jax.random.key(0), num_classes=k,
                              compute_dtype=compute_dtype, devices=devices)

    # The model alone on one batch of noisy inputs (same dtype as inside the sampler).
    forward = jax.jit(lambda p, xs: jnp.argmax(apply(p, xs), axis=-1))
    noisy = jnp.asarray(np.clip(x + SIGMA * np.random.default_rng(1).standard_normal(
        (batch, size, size, 3)), 0, 1).astype(np.float32), compute_dtype or jnp.float32)
    batches = -(-num // batch)

    def model_only() -> None:
        for _ in range(batches):
            forward(params, noisy).block_until_ready()

    # A near-free classifier: what sample_counts costs without the model.
    weight = jnp.ones((3, k), jnp.float32)
    trivial_fn = jax.tree_util.Partial(
        lambda w, xs: xs.astype(jnp.float32).mean(axis=(1, 2)) @ w, weight)

    torch.manual_seed(0)
    tmodel = TorchViTClassifier(
        img_size=size, patch_size=cfg["patch_size"], num_classes=k, embed_dim=cfg["width"],
        depth=cfg["depth"], num_heads=cfg["num_heads"]).eval()
    tx = torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()

    def torch_loop() -> None:
        # Cohen et al., core.py `_sample_noise`.
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                             enabled=dtype == "bfloat16"):
            counts = np.zeros(k, dtype=int)
            remaining = num
            while remaining > 0:
                this_batch = min(batch, remaining)
                remaining -= this_batch
                xs = tx.repeat((this_batch, 1, 1, 1))
                noise = torch.randn_like(xs) * SIGMA
                predictions = tmodel(xs + noise).argmax(1)
                counts += np.bincount(predictions.numpy(), minlength=k)

    fns = {"ours": ours, "torch": torch_loop, "model_only": model_only,
           "trivial": lambda: ours(trivial_fn)}
    timings = time_interleaved(fns, {n: float(num) for n in fns}, warmup=1, reps=reps)
    return {"case": name, "dtype": dtype, "timings": timings, "batch": batch, "num": num,
            "flops_per_sample": classifier_forward_flops(cfg, k)}


# -------------------------------------------------------------------------------------------
# Report.
# -------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Date, CPU, core count, load and library versions."""
    import flax
    import jaxlib
    import optax
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "optax": optax.__version__, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "jax_devices": len(jax.devices()),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _fmt(rate: float, unit: str) -> str:
    if unit == "FLOP/s":
        return f"{rate / 1e9:.1f} G{unit}"
    return f"{rate:,.1f}" if rate >= 100 else f"{rate:.3g}"


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table plus the machine line."""
    info = results["machine"]
    mm = results.get("matmul", {})
    peak = mm["jax_fp32"].rate if "jax_fp32" in mm else float("nan")
    peak_bf16 = mm["jax_bf16"].rate if "jax_bf16" in mm else float("nan")
    rows = ["| figure | ours | PyTorch | ours / PyTorch | MFU ours (PyTorch) vs JAX fp32 peak "
            "| load (1 min) before-after |",
            "|---|---|---|---|---|---|"]

    def row(label, ours: Timing, theirs: Timing, unit: str, flops: float | None,
            note: str = "", load: tuple | None = None) -> None:
        ratio = ours.rate / theirs.rate
        mfu = ""
        if flops is not None:
            mfu = f"{100 * ours.rate * flops / peak:.0f}% ({100 * theirs.rate * flops / peak:.0f}%)"
        loads = f"{load[0]:.1f}-{load[1]:.1f}" if load else ""
        rows.append(f"| {label} | {_fmt(ours.rate, unit)} {ours.spread()} | "
                    f"{_fmt(theirs.rate, unit)} {theirs.spread()} | {ratio:.2f} | {mfu}{note} "
                    f"| {loads} |")

    for name in ("fp32", "bf16"):
        if f"jax_{name}" in mm:
            row(f"matmul {results['matmul_size']}^3 {name} (GFLOP/s)", mm[f"jax_{name}"],
                mm[f"torch_{name}"], "FLOP/s", None, load=results.get("matmul_load"))
    for r in results.get("train", []):
        t = r["timings"]
        what, case = r["case"].split()
        per_call = r["steps_per_call"]
        row(f"{what} step {case} batch {r['batch']}"
            + (f", {per_call} steps per call" if per_call > 1 else "") + " (images/s)",
            t["ours"], t["torch"], "", r["flops_per_image"], load=r.get("load"))
    overheads = []
    for r in results.get("certify", []):
        t = r["timings"]
        note = ""
        if r["dtype"] == "bfloat16":
            note = f"; {100 * t['ours'].rate * r['flops_per_sample'] / peak_bf16:.0f}% of bf16 peak"
        row(f"certify {r['case']} {r['dtype']} batch {r['batch']} (noisy samples/s)",
            t["ours"], t["torch"], "", r["flops_per_sample"], note, load=r.get("load"))
        sampler = statistics.median(t["ours"].seconds)
        model = statistics.median(t["model_only"].seconds)
        trivial = statistics.median(t["trivial"].seconds)
        overheads.append(
            f"| certify {r['case']} {r['dtype']} | {1e3 * sampler:.1f} ms | {1e3 * model:.1f} ms"
            f" | {100 * (sampler - model) / sampler:.1f}% | {100 * trivial / sampler:.1f}% |")
    lines = [
        f"Date {info['date']}; {info['cpu']}, nproc {info['nproc']} "
        f"({info['cores_usable']} usable), torch threads {info['torch_threads']}, "
        f"one JAX device; python {info['python']}, jax {info['jax']}, jaxlib {info['jaxlib']}, "
        f"flax {info['flax']}, optax {info['optax']}, torch {info['torch']}.",
        f"Command: python -m benchmarks.run {' '.join(sys.argv[1:])}".rstrip(),
        "",
        *rows,
    ]
    if overheads:
        lines += [
            "",
            "Our sampler's cost outside the model (median call time; model = the jitted "
            "classifier alone on the same batches; trivial = sample_counts with a near-free "
            "classifier):",
            "",
            "| figure | sample_counts | model only | (sampler - model) / sampler | "
            "trivial / sampler |",
            "|---|---|---|---|---|",
            *overheads,
        ]
    load0, load1 = info["loadavg_start"][0], results["loadavg_end"][0]
    cores = info["cores_usable"]
    lines += ["", f"Load average (1 min) {load0:.2f} at the start, {load1:.2f} at the end "
                  f"on {cores} cores."]
    if max(load0, load1) > 0.5 * cores:
        lines.append(f"WARNING: the machine was busy with other processes (load > {cores / 2})"
                     ": absolute numbers are low and noisy; the ratios, measured alternately, "
                     "are more reliable.")
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Timing):
        return {"seconds": obj.seconds, "work": obj.work, "rates": obj.rates,
                "median_rate": obj.rate}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the selected benchmarks, prints the table, optionally writes the raw numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the raw timings to this file")
    parser.add_argument("--quick", action="store_true",
                        help="CPU-config models only, fewer repetitions")
    parser.add_argument("--only", default="pretrain,finetune,certify",
                        help="comma-separated subset of pretrain,finetune,certify (matmul "
                             "always runs)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="PyTorch intra-op threads (default: the usable cores)")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default 5; quick 3)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= {"pretrain", "finetune", "certify"}:
        parser.error(f"--only must name some of pretrain, finetune, certify, got {args.only!r}")

    import torch

    torch.set_num_threads(args.torch_threads or len(os.sched_getaffinity(0)))
    reps = args.reps or (3 if args.quick else 5)
    cases = ["cpu"] if args.quick else ["cpu", "vitb"]
    results: dict[str, Any] = {"machine": machine_info(), "reps": reps, "matmul_size": 2048}

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def done(timings: dict[str, Timing]) -> None:
        say("  " + ", ".join(f"{k} {t.rate:,.4g}/s {t.spread()}" for k, t in timings.items())
            + f"; load {os.getloadavg()[0]:.2f}")

    say("matmul peak")
    load0 = os.getloadavg()[0]
    results["matmul"] = bench_matmul(results["matmul_size"], max(reps, 5))
    results["matmul_load"] = (load0, os.getloadavg()[0])
    done(results["matmul"])
    results["train"] = []
    for name in TRAIN_CASES:
        what, case = name.split()
        if what not in only or case not in cases:
            continue
        say(f"{what} step: {case}")
        load0 = os.getloadavg()[0]
        # The digits rows: one call of the config's steps_per_call steps per repetition.
        results["train"].append(bench_train(name, min(reps, 3) if case == "vitb" else reps,
                                            10 if case == "cpu" else 1))
        results["train"][-1]["load"] = (load0, os.getloadavg()[0])
        done(results["train"][-1]["timings"])
    if "certify" in only:
        results["certify"] = []
        for name in cases:
            for dtype in ("float32", "bfloat16"):
                say(f"certification sampling: {name} {dtype}")
                load0 = os.getloadavg()[0]
                results["certify"].append(bench_certify(
                    name, CERTIFY_CASES[name], dtype, min(reps, 3) if name == "vitb" else reps))
                results["certify"][-1]["load"] = (load0, os.getloadavg()[0])
                done(results["certify"][-1]["timings"])
    results["loadavg_end"] = os.getloadavg()
    print()
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_jsonable(results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
