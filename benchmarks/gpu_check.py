r"""GPU check: our code against PyTorch on the same GPU, in a plain JAX + PyTorch image.

  python -m benchmarks.gpu_check              # one GPU, under 8 minutes
  python -m benchmarks.gpu_check --small      # tiny models: proves it runs end to end (CPU)

Needs only jax (CUDA build), flax, optax, orbax-checkpoint, numpy, scipy, torch and
ml_collections (a small pure-Python wheel to carry along); no TensorFlow, TFDS, Grain, CLU
or timm is imported (checked at the end). Prints, each figure the median of a few
repetitions after warm-up, ours and PyTorch's alternating:
  1. matmul peak, bf16 and fp32 (full fp32: TF32 off), JAX and PyTorch;
  2. the DMAE-B/16 pretraining step in bf16 (ours: the real jitted step with AdamW; PyTorch:
     the official architecture from tests/torch_dmae.py under autocast, fused AdamW):
     images/s and MFU against the measured bf16 matmul peak;
  3. the ViT-B/16 fine-tuning step in bf16 (noise x 2 copies, Mixup/CutMix, consistency
     loss; ours only): images/s and MFU;
  4. certification sampling with ViT-B/16 (bf16 and fp32): noisy samples/s of our
     `sample_counts` against Cohen et al.'s `_sample_noise` loop in PyTorch;
  5. a short training run that is interrupted and resumed from its Orbax checkpoint, and
     must end where the uninterrupted run ends;
  6. the attention core of each `model.attention` path the backend runs (einsum, xla, cudnn
     on a GPU, pallas on a TPU; einsum and xla also with bfloat16 logits), forward and
     gradient at the DMAE-B/16 decoder's and the ViT-B/16 encoder's shapes: milliseconds per
     call, the ratio to the einsum path, and the largest difference from float32 einsum
     attention (relative to the largest magnitude). A path the backend cannot run is listed
     as skipped.
Exits non-zero if any part failed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

MODULES_ABSENT_FROM_A_PLAIN_IMAGE = ("tensorflow", "tensorflow_datasets", "grain", "clu")
SIGMA = 0.25


def _median_rate(fn: Callable[[], Any], work: float, reps: int) -> tuple[float, float]:
    """(median, min) of work / seconds over reps calls of a blocking fn, after one warm-up."""
    fn()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        rates.append(work / (time.perf_counter() - t0))
    return statistics.median(rates), min(rates)


def _interleaved(fns: dict[str, Callable[[], Any]], work: float, reps: int) -> dict[str, float]:
    """Median rate of each fn, the fns alternating repetition by repetition."""
    for fn in fns.values():
        fn()
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(work / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


class Check:
    """Sizes of one run: the full GPU check or the --small one."""

    def __init__(self, small: bool):
        self.small = small
        self.matmul = 512 if small else 8192
        self.reps = 2 if small else 5
        # (variant, img_size, patch_size, decoder width/depth/heads, pretrain and finetune batch)
        if small:
            self.model = dict(variant="mu", img_size=32, patch_size=8, decoder_width=64,
                              decoder_depth=1, decoder_heads=2)
            self.pretrain_batch, self.finetune_batch = 8, 4
            self.cert_batch, self.cert_num, self.num_classes = 64, 128, 10
        else:
            self.model = dict(variant="base", img_size=224, patch_size=16, decoder_width=512,
                              decoder_depth=8, decoder_heads=16)
            self.pretrain_batch, self.finetune_batch = 256, 128
            self.cert_batch, self.cert_num, self.num_classes = 500, 2000, 1000
        self.name = f"ViT-{self.model['variant']}/{self.model['patch_size']}"


# ---------------------------------------------------------------------------------------------
# 1. Matmul peak.
# ---------------------------------------------------------------------------------------------


def matmul_peaks(check: Check, torch_device: str) -> dict[str, float]:
    """FLOP/s of an n^3 matmul in bf16 and fp32, JAX and PyTorch."""
    import jax
    import jax.numpy as jnp
    import torch

    n = check.matmul
    flops = 2.0 * n**3
    out = {}
    for name, dtype, tdtype in (("bf16", jnp.bfloat16, torch.bfloat16),
                                ("fp32", jnp.float32, torch.float32)):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
        out[f"jax_{name}"] = _median_rate(lambda f=f, a=a, b=b: f(a, b).block_until_ready(),
                                          flops, check.reps)[0]
        ta = torch.randn(n, n, dtype=tdtype, device=torch_device)
        tb = torch.randn(n, n, dtype=tdtype, device=torch_device)

        def torch_mm(ta=ta, tb=tb):
            ta @ tb
            if torch_device == "cuda":
                torch.cuda.synchronize()

        out[f"torch_{name}"] = _median_rate(torch_mm, flops, check.reps)[0]
    return out


# ---------------------------------------------------------------------------------------------
# 2-3. Training steps.
# ---------------------------------------------------------------------------------------------


def _train_config(check: Check, task: str):
    from dmae_jax import defaults

    if task == "pretrain":
        cfg = defaults.pretrain("imagenet2012", check.model["variant"])
        cfg.batch_size = check.pretrain_batch
    else:
        cfg = defaults.finetune("imagenet2012", check.model["variant"], SIGMA)
        cfg.batch_size = check.finetune_batch
    cfg.model.update({k: v for k, v in check.model.items() if k != "variant"})
    cfg.data.image_size = check.model["img_size"]
    cfg.model.dtype = "bfloat16"
    cfg.total_steps = 10_000
    cfg.optim.warmup_epochs = 0  # the schedule's shape does not matter for timing
    return cfg


def jax_train_step(check: Check, task: str, mesh=None):
    """(blocking step fn, flops per image, state getter) of our real training step."""
    import jax
    import jax.numpy as jnp

    from dmae_jax import aot, parallel
    from dmae_jax.train import common

    cfg = _train_config(check, task)
    pieces = aot.train_pieces(cfg, concrete=True)
    mesh = mesh or parallel.make_mesh(1, devices=jax.devices()[:1])

    def make_state(params):
        return common.init_state(params, pieces.tx, jax.random.key(0))

    shardings = common.state_shardings(make_state, pieces.parts.params, mesh)
    state = [jax.jit(make_state, out_shardings=shardings)(
        jax.tree.map(jnp.asarray, pieces.parts.params))]
    step = common.make_train_step(pieces.loss_fn, pieces.tx, mesh=mesh,
                                  state_sharding=shardings, lr_fn=pieces.lr_fn)
    size, b = check.model["img_size"], cfg.batch_size
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((b, size, size, 3), np.float32)}
    if pieces.labels:
        batch["label"] = rng.integers(0, 1000, b).astype(np.int32)
    batch = parallel.global_batch(batch, mesh)

    def run():
        state[0], metrics = step(state[0], batch)
        jax.block_until_ready((state[0], metrics))

    return run, pieces.flops_per_image, cfg.batch_size


def torch_pretrain_step(check: Check, device: str):
    """One step of the official DMAE in PyTorch: autocast bf16 forward/backward, AdamW."""
    import torch

    from dmae_jax.models import resolve_model_config
    from tests.torch_dmae import TorchDMAE

    cfg = resolve_model_config(check.model)
    torch.manual_seed(0)
    model = TorchDMAE(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["width"],
        depth=cfg["depth"], num_heads=cfg["num_heads"], decoder_embed_dim=cfg["decoder_width"],
        decoder_depth=cfg["decoder_depth"], decoder_num_heads=cfg["decoder_heads"],
    ).to(device).train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                             {"params": decay, "weight_decay": 0.05}],
                            lr=1.5e-4 * check.pretrain_batch / 256, betas=(0.9, 0.95),
                            fused=device == "cuda")
    size = cfg["img_size"]
    images = torch.rand(check.pretrain_batch, 3, size, size, device=device)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, _, _ = model(images, mask_ratio=0.75, sigma=SIGMA)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


# ---------------------------------------------------------------------------------------------
# 4. Certification sampling.
# ---------------------------------------------------------------------------------------------


def certify_rates(check: Check, dtype: str, device: str) -> dict[str, float]:
    """Noisy samples/s: our sample_counts and Cohen et al.'s PyTorch loop, same ViT."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from dmae_jax import defaults
    from dmae_jax.models import ModelParts, create_classifier, resolve_model_config
    from dmae_jax.smoothing import place_replicated, sample_counts
    from tests.torch_dmae import TorchViTClassifier

    model_cfg = defaults.model(check.model["variant"], img_size=check.model["img_size"],
                               patch_size=check.model["patch_size"])
    k, size = check.num_classes, check.model["img_size"]
    parts = ModelParts.split(create_classifier(model_cfg, k, rngs=nnx.Rngs(0)))

    def apply(params, images):
        return parts.bind(params)(images)

    devices = jax.devices()[:1]
    logits_fn = place_replicated(
        jax.tree_util.Partial(apply, jax.tree.map(jnp.asarray, parts.params)), devices)
    x = np.random.default_rng(0).random((size, size, 3), np.float32)
    compute_dtype = jnp.bfloat16 if dtype == "bfloat16" else None

    def ours():
        sample_counts(logits_fn, x, sigma=SIGMA, num=check.cert_num,
                      batch_size=check.cert_batch, rng=jax.random.key(0), num_classes=k,
                      compute_dtype=compute_dtype, devices=devices)

    cfg = resolve_model_config(model_cfg)
    torch.manual_seed(0)
    tmodel = TorchViTClassifier(img_size=size, patch_size=cfg["patch_size"], num_classes=k,
                                embed_dim=cfg["width"], depth=cfg["depth"],
                                num_heads=cfg["num_heads"]).to(device).eval()
    tx = torch.from_numpy(x).permute(2, 0, 1)[None].contiguous().to(device)

    def cohen():
        # locuslab/smoothing core.py `_sample_noise`: batches of noisy copies, counts on host.
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16,
                                             enabled=dtype == "bfloat16"):
            counts = np.zeros(k, dtype=int)
            remaining = check.cert_num
            while remaining > 0:
                this_batch = min(check.cert_batch, remaining)
                remaining -= this_batch
                batch = tx.repeat((this_batch, 1, 1, 1))
                noise = torch.randn_like(batch) * SIGMA
                predictions = tmodel(batch + noise).argmax(1)
                counts += np.bincount(predictions.cpu().numpy(), minlength=k)

    return _interleaved({"ours": ours, "torch": cohen}, float(check.cert_num), check.reps)


# ---------------------------------------------------------------------------------------------
# 5. Interrupted and resumed training.
# ---------------------------------------------------------------------------------------------


class _Batches:
    """A deterministic batch iterator with the get_state/set_state the checkpoints save."""

    def __init__(self, batch: int, size: int):
        self.batch, self.size, self.position = batch, size, 0

    def __next__(self) -> dict:
        rng = np.random.default_rng(self.position)
        self.position += 1
        return {"image": rng.random((self.batch, self.size, self.size, 3), np.float32)}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


def resume_check(check: Check) -> float:
    """Trains 6 steps in one go and 3 + 3 steps with a restart from the checkpoint in between;
    returns the largest parameter difference between the two (0 on a deterministic GPU)."""
    import jax

    from dmae_jax import checkpoints, parallel
    from dmae_jax.train import common

    cfg = _train_config(check, "pretrain")
    cfg.batch_size = min(cfg.batch_size, 32)
    pieces = aot_train_pieces(cfg)
    mesh = parallel.make_mesh(1, devices=jax.devices()[:1])

    def make_state(params):
        return common.init_state(params, pieces.tx, jax.random.key(0))

    shardings = common.state_shardings(make_state, pieces.parts.params, mesh)
    step_fn = common.make_train_step(pieces.loss_fn, pieces.tx, mesh=mesh,
                                     state_sharding=shardings, lr_fn=pieces.lr_fn)

    def train(workdir: str, until: int, total: int = 6) -> dict:
        data = _Batches(cfg.batch_size, check.model["img_size"])
        ckpt = checkpoints.TrainCheckpointer(workdir, max_to_keep=2,
                                             fingerprint={"gpu_check": 1})
        state, first = common.restore_or_init(ckpt, make_state, pieces.parts.params, shardings,
                                              data, total)
        for step in range(first + 1, until + 1):
            state, _ = step_fn(state, parallel.global_batch(next(data), mesh))
            if step % 3 == 0:
                ckpt.save(step, state, {"data_iter": data.get_state()})
        ckpt.wait()
        ckpt.close()
        return jax.device_get(state["params"])

    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        straight = train(one, 6)
        train(two, 3)
        resumed = train(two, 6)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         straight, resumed)
    return max(jax.tree.leaves(diffs))


def aot_train_pieces(cfg):
    """The trainers' loss and optimizer with initialised parameters."""
    from dmae_jax import aot

    return aot.train_pieces(cfg, concrete=True)


# ---------------------------------------------------------------------------------------------
# 6. Attention paths.
# ---------------------------------------------------------------------------------------------


def attention_shapes(check: Check) -> dict[str, tuple[int, int, int, int]]:
    """(batch, tokens, heads, head_dim) of the attention layers the steps above run."""
    if check.small:
        return {"decoder": (4, 17, 2, 32), "encoder": (4, 17, 4, 16)}
    return {"DMAE-B/16 decoder": (check.pretrain_batch, 197, 16, 32),
            "ViT-B/16 encoder": (2 * check.finetune_batch, 197, 12, 64)}


def attention_paths(backend: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """([(implementation, logits dtype)] the backend runs, {path: why skipped})."""
    paths = [("einsum", "float32"), ("xla", "float32"), ("einsum", "bfloat16"),
             ("xla", "bfloat16")]
    skipped = {}
    if backend == "gpu":
        paths.append(("cudnn", "float32"))
    else:
        skipped["cudnn"] = "cuDNN's kernel needs a GPU"
    if backend == "tpu":
        paths.append(("pallas", "float32"))
    else:
        skipped["pallas"] = "the Pallas TPU kernel needs a TPU (tests/test_attention.py " \
                            "checks it in interpret mode)"
    return paths, skipped


def _attention_grad(impl: str, logits: str, dtype):
    """Jitted (q, k, v, g) -> (sum(core(q, k, v) * g), its q, k, v gradients) of one path,
    q, k, v and g [B, N, H, d] float32, the core computed in `dtype`."""
    import jax
    import jax.numpy as jnp

    from dmae_jax.models import attention

    order = (0, 2, 1, 3) if attention.layout(impl) == "bhnk" else (0, 1, 2, 3)

    def loss(q, k, v, g):
        out = attention.core(*(x.astype(dtype).transpose(order) for x in (q, k, v)),
                             impl=impl, logits_dtype=attention.ATTENTION_LOGITS[logits])
        return jnp.sum(out.transpose(order).astype(jnp.float32) * g)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def attention_rates(check: Check, backend: str) -> dict[str, dict[str, tuple[float, float]]]:
    """{shape: {path: (ms per forward + gradient call, largest relative difference from
    float32 einsum attention)}} in bfloat16, the paths alternating."""
    import jax
    import jax.numpy as jnp

    paths, _ = attention_paths(backend)
    out = {}
    for shape_name, (b, n, h, d) in attention_shapes(check).items():
        args = tuple(jax.random.normal(key, (b, n, h, d), jnp.float32)
                     for key in jax.random.split(jax.random.key(0), 4))
        want = jax.tree.leaves(_attention_grad("einsum", "float32", jnp.float32)(*args))
        fns, errors = {}, {}
        for impl, logits in paths:
            name = f"{impl}, {logits} logits"
            fn = _attention_grad(impl, logits, jnp.bfloat16)
            got = jax.tree.leaves(fn(*args))
            errors[name] = max(float(jnp.max(jnp.abs(a - w)) / jnp.max(jnp.abs(w)))
                               for a, w in zip(got, want, strict=True))
            fns[name] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
        rates = _interleaved(fns, 1.0, check.reps)  # calls per second
        out[shape_name] = {name: (1e3 / rate, errors[name]) for name, rate in rates.items()}
    return out


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs every part, prints the results, returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="tiny models and matrices: an end-to-end run on a CPU")
    args = parser.parse_args(argv)
    check = Check(args.small)

    import jax
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.small and (jax.default_backend() != "gpu" or device != "cuda"):
        print(f"error: the full check needs a GPU for JAX (backend {jax.default_backend()!r}) "
              f"and PyTorch (cuda available: {torch.cuda.is_available()}); use --small on a "
              "CPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; JAX {jax.__version__} on "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}), torch {torch.__version__} "
          f"on {device} ({gpu}); load {os.getloadavg()[0]:.1f}; sizes: "
          f"{'--small' if args.small else 'full'}", flush=True)
    failures = []
    results: dict[str, Any] = {}
    t_start = time.time()

    def part(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.time()
        print(f"\n== {name}", flush=True)
        try:
            value = fn()
        except Exception:  # noqa: BLE001 - report the part and go on with the others
            traceback.print_exc()
            failures.append(name)
            return None
        print(f"   ({time.time() - t0:.0f} s)", flush=True)
        return value

    peaks = part("1. matmul peak", lambda: matmul_peaks(check, device)) or {}
    for key, value in peaks.items():
        print(f"   {key:11s} {value / 1e12:8.2f} TFLOP/s")
    peak = peaks.get("jax_bf16", float("nan"))

    def pretrain():
        ours, flops, batch = jax_train_step(check, "pretrain")
        rates = _interleaved({"ours": ours, "torch": torch_pretrain_step(check, device)},
                             float(batch), check.reps)
        for name, rate in rates.items():
            print(f"   {name:6s} {rate:10.1f} images/s  MFU {100 * rate * flops / peak:5.1f}% "
                  "of the measured JAX bf16 matmul peak")
        print(f"   ours / PyTorch {rates['ours'] / rates['torch']:.2f}")
        return rates

    results["pretrain"] = part(f"2. DMAE pretraining step, {check.name}, batch "
                               f"{check.pretrain_batch}, bf16", pretrain)

    def finetune():
        ours, flops, batch = jax_train_step(check, "finetune")
        rate = _median_rate(ours, float(batch), check.reps)[0]
        print(f"   ours   {rate:10.1f} images/s (x 2 noisy copies)  MFU "
              f"{100 * rate * flops / peak:5.1f}%")
        return rate

    results["finetune"] = part(f"3. fine-tuning step, {check.name}, batch "
                               f"{check.finetune_batch} x 2, bf16", finetune)
    for dtype in ("bfloat16", "float32"):
        def certify(dtype=dtype):
            rates = certify_rates(check, dtype, device)
            print(f"   ours {rates['ours']:10.1f} samples/s, Cohen's PyTorch loop "
                  f"{rates['torch']:10.1f} samples/s: ours / PyTorch "
                  f"{rates['ours'] / rates['torch']:.2f}")
            return rates

        results[f"certify_{dtype}"] = part(
            f"4. certification sampling, {check.name}, {check.cert_num} samples in batches of "
            f"{check.cert_batch}, {dtype}", certify)

    def resume():
        diff = resume_check(check)
        print(f"   6 steps straight vs 3 + restart + 3: largest parameter difference {diff:.3g}")
        if not diff < 1e-3:
            raise AssertionError(f"the resumed run ended elsewhere (difference {diff})")
        return diff

    results["resume"] = part("5. interrupted and resumed training (Orbax checkpoint)", resume)

    def attention_paths_part():
        rates = attention_rates(check, jax.default_backend())
        for shape_name, paths in rates.items():
            b, n, h, d = attention_shapes(check)[shape_name]
            print(f"   {shape_name}: batch {b}, {n} tokens, {h} heads of {d}")
            base = paths["einsum, float32 logits"][0]
            for name, (ms, err) in paths.items():
                print(f"     {name:26s} {ms:9.3f} ms  x{ms / base:5.2f} of einsum  "
                      f"difference from float32 einsum {err:.2e}")
        for impl, why in attention_paths(jax.default_backend())[1].items():
            print(f"   {impl} skipped: {why}")
        return rates

    results["attention"] = part("6. attention core, forward + gradient, bf16, each path",
                                attention_paths_part)
    present = [m for m in MODULES_ABSENT_FROM_A_PLAIN_IMAGE if m in sys.modules]
    print(f"\nimported and not in a plain JAX image: {present or 'none'}")
    if present:
        failures.append(f"imports {present}")
    print(f"total {time.time() - t_start:.0f} s; "
          + (f"FAILED: {failures}" if failures else "all parts passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
