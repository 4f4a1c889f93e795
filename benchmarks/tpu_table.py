r"""The README's TPU table: DMAE-B/16 and DMAE-L/16 compiled for TPU slices on this CPU.

  python -m benchmarks.tpu_table [--json FILE] [--from-json FILE[,FILE]] [--cases S:V:T,...]

For each stage (pretraining at batch 4096, fine-tuning at the papers' batch of 1024 images
x 2 noisy copies, certification at 1000 noisy samples per step) and slice, compiles the
real step with `dmae_jax.aot`, trying settings from the fastest to the most frugal until
one fits the chip's HBM: plain; remat; remat + FSDP over 4 chips; remat + FSDP 4 + 2
accumulation steps. In the same run it compiles reference rows: a plain ViT-B/16 and
ViT-L/16 supervised training step (`aot.compile_reference`: a few lines of JAX, bf16
compute, AdamW) on each slice, at batch 4096 or, where that does not fit, the largest half
of it that does. Prints a markdown table of what fits, the memory per chip, XLA's
estimated step time, the collectives' time over the chips' interconnect, the predicted
images (samples) per second per chip, MFU, each training row's time per image and MFU
against the plain ViT step of its width on its slice, and the predicted wall time of the
papers' schedules, next to MAE's measured TPU v3 anchor.

Every figure is the compiler's prediction (XLA's cost model: FLOPs and memory traffic per
chip), not a measurement. Needs libtpu (`pip install -e ".[tpu-compile]"`). ViT-L compiles
take minutes each on 2 cores: about 30-60 minutes for the whole table on 2 idle cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

# MAE ViT-L/16 on TPU v3 (He et al. 2022, Table 2 and its text): 1600 epochs of ImageNet-1k
# in about 31 h on 128 cores (64 chips): about 287 images/s per chip.
ANCHOR_IMAGES_PER_SEC_PER_V3_CHIP = 287.0
IMAGENET_TRAIN = 1_281_167
# The papers' schedules: epochs (pretraining, fine-tuning) and certification's samples.
SCHEDULES = {
    ("pretrain", "base"): 1100, ("pretrain", "large"): 1600,
    ("finetune", "base"): 100, ("finetune", "large"): 50,
}
CERTIFY_SAMPLES = 1000 * (100 + 10_000)  # every 50th ImageNet val image, N0 = 100, N = 10k
TOPOLOGIES = ("v4-32", "v4-128", "v5p-128")
# Batches the reference step tries, largest first (no remat: a plain step).
REFERENCE_BATCHES = (4096, 2048, 1024)
# Settings to try, fastest first.
LADDER = (
    {},
    {"model.remat": True},
    {"model.remat": True, "mesh.fsdp": 4},
    {"model.remat": True, "mesh.fsdp": 4, "accum_steps": 2},
)


def _config(stage: str, variant: str):
    from dmae_jax import defaults

    if stage in ("pretrain", "reference"):
        cfg = defaults.pretrain("imagenet2012", variant)
    elif stage == "finetune":
        cfg = defaults.finetune("imagenet2012", variant, 0.25)
        if variant == "large":
            cfg.model.drop_path_rate = 0.2
    else:
        cfg = defaults.certify("imagenet2012", 0.25)
        cfg.compute_dtype = "bfloat16"
        return cfg
    cfg.model.dtype = "bfloat16"
    return cfg


def _apply(cfg, settings: dict):
    for key, value in settings.items():
        node = cfg
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return cfg


def compile_case(case: dict) -> dict:
    """Compiles one (stage, variant, topology) over the settings ladder; returns the result."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from dmae_jax import aot
    from dmae_jax import config as config_lib

    topology = aot.resolve_topology(case["topology"])
    tried = []
    if case["stage"] == "reference":
        ladder = tuple({"batch_size": b} for b in REFERENCE_BATCHES)
    else:
        ladder = ({},) if case["stage"] == "certify" else LADDER
    for settings in ladder:
        cfg = _apply(_config(case["stage"], case["variant"]), settings)
        t0 = time.time()
        try:
            if case["stage"] == "reference":
                report = aot.compile_reference(cfg, topology)
            else:
                report = aot.compile_config(cfg, topology, variant=case["variant"])
        except aot.DoesNotFitError as e:
            tried.append({"settings": settings, "error": str(e)[:400]})
            continue
        except Exception as e:  # noqa: BLE001 - one failed case must not lose the others
            tried.append({"settings": settings, "error": f"{type(e).__name__}: {e}"[:400],
                          "failed": True})
            break
        entry = {
            "settings": settings, "compile_seconds": time.time() - t0,
            "total_bytes": report.total_bytes, "hbm_bytes": topology.chip.hbm_bytes,
            "argument_bytes": report.argument_bytes, "temp_bytes": report.temp_bytes,
            "step_seconds": report.step_seconds, "per_chip": report.items_per_sec_per_chip,
            "num_chips": report.num_chips, "mfu": report.mfu, "xla_flops": report.xla_flops,
            "model_flops": report.model_flops, "fits": report.fits,
            "chips_in_slice": len(aot.topology_devices(topology)),
            "comm_seconds": report.comm_seconds, "collectives": report.collectives.line(),
            "images_per_step": report.items_per_step, "warnings": report.warnings(),
            # Images through the ViT per step: a fine-tuning step's noisy copies count.
            "vit_images": (report.items_per_step if case["stage"] in ("reference", "certify")
                           else aot.reference_images(config_lib.resolve(cfg))),
        }
        tried.append(entry)
        if report.fits:
            break
    return {**case, "tried": tried}


def _settings_text(settings: dict) -> str:
    if not settings:
        return "plain"
    if "batch_size" in settings:
        return f"plain, batch {settings['batch_size']}"
    parts = []
    if settings.get("model.remat"):
        parts.append("remat")
    if settings.get("mesh.fsdp", 1) > 1:
        parts.append(f"fsdp {settings['mesh.fsdp']}")
    if settings.get("accum_steps", 1) > 1:
        parts.append(f"accum {settings['accum_steps']}")
    return " + ".join(parts)


def _hours(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 72 * 3600 else f"{seconds / 86400:.1f} d"


def _fitting(result: dict) -> dict | None:
    return next((t for t in result["tried"] if t.get("fits")), None)


def _versus(t: dict, ref: dict | None) -> str:
    """Time per ViT image and MFU of a training row against its plain ViT reference."""
    if ref is None or "vit_images" not in t:
        return "-"
    per_image = t["step_seconds"] / t["vit_images"]
    ref_per_image = ref["step_seconds"] / ref["vit_images"]
    return f"{per_image / ref_per_image:.2f}x time, {t['mfu'] / ref['mfu']:.2f}x MFU"


def markdown(results: list[dict], meta: dict) -> str:
    """The table and its caption."""
    from dmae_jax import aot
    from dmae_jax.models import resolve_model_config

    large = resolve_model_config({"variant": "large", "img_size": 224, "patch_size": 16})
    anchor_flops = aot.TRAIN_FLOPS_FACTOR * aot.dmae_forward_flops(large, 0.75)
    anchor_mfu = ANCHOR_IMAGES_PER_SEC_PER_V3_CHIP * anchor_flops / aot.V3_PEAK_FLOPS
    references = {(r["variant"], r["topology"]): _fitting(r) for r in results
                  if r["stage"] == "reference"}
    rows = [
        "| stage | model | slice | batch | settings that fit | memory per chip | XLA step "
        "| comms | predicted per chip | MFU | vs plain ViT step | papers' schedule, predicted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = _fitting(r)
        letter = r["variant"][0].upper()
        model = {"pretrain": f"DMAE-{letter}/16", "finetune": f"ViT-{letter}/16",
                 "certify": f"ViT-{letter}/16 (bf16)",
                 "reference": f"plain ViT-{letter}/16"}[r["stage"]]
        if r["stage"] == "reference":
            batch = str(t["vit_images"]) if t else "-"
        else:
            batch = {"pretrain": "4096", "finetune": "1024 x 2",
                     "certify": "1000 samples"}[r["stage"]]
        if t is None:
            rows.append(f"| {r['stage']} | {model} | {r['topology']} | {batch} | none of "
                        f"{len(r['tried'])} tried fits | | | | | | | |")
            continue
        unit = "samples/s" if r["stage"] == "certify" else "images/s"
        versus = "-"
        if r["stage"] == "certify":
            # Every host certifies its own images on its 4 chips: the slice's rate is the
            # per-chip rate times all its chips.
            total = CERTIFY_SAMPLES / (t["per_chip"] * t["chips_in_slice"])
            schedule = f"1000 images, N = 10k: {_hours(total)}"
            where = f"{r['topology']} (one host, {t['num_chips']} chips)"
        elif r["stage"] == "reference":
            schedule, where, versus = "-", r["topology"], "1"
        else:
            epochs = SCHEDULES[(r["stage"], r["variant"])]
            total = epochs * IMAGENET_TRAIN / (t["per_chip"] * t["num_chips"])
            schedule = f"{epochs} epochs: {_hours(total)}"
            where = r["topology"]
            versus = _versus(t, references.get((r["variant"], r["topology"])))
        comms = f"{t['comm_seconds'] * 1e3:.0f} ms" if "comm_seconds" in t else "-"
        settings = "plain" if r["stage"] == "reference" else _settings_text(t["settings"])
        rows.append(
            f"| {r['stage']} | {model} | {where} | {batch} | {settings} | "
            f"{t['total_bytes'] / 2**30:.1f} of {t['hbm_bytes'] / 2**30:.0f} GiB | "
            f"{t['step_seconds'] * 1e3:.0f} ms | {comms} | {t['per_chip']:,.0f} {unit} | "
            f"{100 * t['mfu']:.0f}% | {versus} | {schedule} |")
    caption = [
        f"Compiler predictions, not measurements: `python -m benchmarks.tpu_table` "
        f"({meta['date']}, jax {meta['jax']}, libtpu {meta['libtpu']}) compiled each real step "
        "for the slice on a CPU and took XLA's memory analysis and its cost-model step time "
        "(each operation's FLOPs and memory traffic per chip; no input pipeline, no host "
        "overhead): an estimate, not a bound. The step time leaves the collectives out; "
        "comms is their bytes sent per chip over the chip's interconnect bandwidth, as if "
        "none of it overlapped the compute. MFU counts the model's matmul "
        "FLOPs (remat's recomputation excluded) against the chip's bf16 peak (v4 275, v5p 459 "
        "TFLOP/s). Reference rows: a plain ViT supervised training step of the same width "
        "(pre-norm, bf16 compute, AdamW, a few lines of JAX) on the same slice; \"vs plain "
        "ViT step\" is a row's step time per image through the ViT (a fine-tuning step's "
        "noisy copies count) and its MFU over the reference's. Anchor: MAE ViT-L/16 "
        f"pretraining measured about {ANCHOR_IMAGES_PER_SEC_PER_V3_CHIP:.0f} images/s per "
        f"TPU v3 chip (64 chips x 31 h for 1600 epochs), i.e. {100 * anchor_mfu:.0f}% MFU of "
        "v3's 123 TFLOP/s by the same FLOP count.",
    ]
    return "\n".join(rows + [""] + caption)


def main(argv: list[str] | None = None) -> None:
    """Compiles every case (or reads them from --from-json) and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--from-json",
                        help="print the table of previous runs' results (FILE[,FILE...])")
    parser.add_argument("--cases", default="",
                        help="comma-separated stage:variant:topology to compile, in this order")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    parser.add_argument("--only", default="", help="comma-separated stages to compile")
    args = parser.parse_args(argv)
    if args.case:
        stage, variant, topology = args.case.split(":")
        print(json.dumps(compile_case({"stage": stage, "variant": variant,
                                       "topology": topology})), flush=True)
        return
    if args.from_json:
        results, meta = [], {}
        for path in args.from_json.split(","):
            with open(path) as f:
                data = json.load(f)
            results += data["results"]
            meta = meta or data["meta"]
        stages = {"reference": 0, "pretrain": 1, "finetune": 2, "certify": 3}
        results.sort(key=lambda r: (stages[r["stage"]], r["variant"] == "large",
                                    TOPOLOGIES.index(r["topology"])))
        print(markdown(results, meta))
        return
    import importlib.metadata

    import jax

    stages = (args.only.split(",") if args.only
              else ["reference", "pretrain", "finetune", "certify"])
    cases = []
    for stage in stages:
        for variant in ("base", "large"):
            # Certification runs per host: one compile per chip generation.
            topologies = ("v4-32", "v5p-128") if stage == "certify" else TOPOLOGIES
            for topology in topologies:
                cases.append({"stage": stage, "variant": variant, "topology": topology})
    if args.cases:
        wanted = [tuple(c.split(":")) for c in args.cases.split(",")]
        cases = [{"stage": s, "variant": v, "topology": t} for s, v, t in wanted]
    meta = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "libtpu": importlib.metadata.version("libtpu"), "load_start": os.getloadavg()}
    results = []
    # One process per case, one at a time: a ViT-L compile takes several GiB, and a case
    # that runs out of host memory must not take the others with it.
    for case in cases:
        spec = f"{case['stage']}:{case['variant']}:{case['topology']}"
        out = subprocess.run([sys.executable, "-m", "benchmarks.tpu_table", "--case", spec],
                             capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            result = {**case, "tried": [{"settings": {}, "failed": True,
                                         "error": f"exit {out.returncode}: "
                                                  + out.stderr.strip()[-300:]}]}
        else:
            result = json.loads(lines[-1])
        last = result["tried"][-1]
        print(f"[{time.strftime('%H:%M:%S')}] {spec}: {_settings_text(last['settings'])} "
              + ("fits" if last.get("fits") else "FAILED" if last.get("failed")
                 else "does not fit"), flush=True)
        results.append(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
    meta["load_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    print(markdown(results, meta))
    print(f"\nLoad average (1 min) {meta['load_start'][0]:.1f} at the start, "
          f"{meta['load_end'][0]:.1f} at the end (compile time only; the figures above do "
          "not depend on it).", file=sys.stderr)


if __name__ == "__main__":
    main()
