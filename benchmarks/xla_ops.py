r"""Where XLA:CPU spends a digits training step, by kind of operation.

  python -m benchmarks.xla_ops [--steps 10] [--only pretrain,finetune] [--json F]

Builds `configs/digits.py`'s pretraining and fine-tuning steps as `benchmarks.run` does (the
trainers' own loss, optimizer and `common.make_train_step`, the config's steps per call),
runs `--steps` of them under `jax.profiler` and sums the profiler's per-operation events by
what each operation of the optimized HLO is: matmuls XLA hands to YNNPACK (a `__ynn_fusion`
holding a dot), XLA's own dots (here the attention's batched 17x17 products), elementwise
fusions (XLA's loop fusions and YNNPACK's elementwise ones) and copies. The times are
summed over XLA's threads (two operations may run at once), so they add up to CPU time, not
wall time; the analytic matmul FLOPs of the step over that CPU time is the rate per core.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

_DUMP = tempfile.mkdtemp(prefix="xla_ops_dump_")
if "jax" in sys.modules:
    raise RuntimeError("benchmarks.xla_ops must set XLA_FLAGS before JAX starts")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_dump_to={_DUMP} --xla_dump_hlo_as_text").strip()

from dmae_jax import host  # noqa: E402

host.configure()  # as dmae_jax.main does

import jax  # noqa: E402

from benchmarks import run as bench  # noqa: E402
from dmae_jax import aot  # noqa: E402

_DEF = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")


def hlo_kinds(text: str) -> dict[str, str]:
    """{instruction name: kind} of an optimized HLO module's text."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            current = bodies.setdefault(head.group(1), [])
        elif current is not None and line.strip() not in ("", "}"):
            current.append(line)
    kinds = {}
    for lines in bodies.values():
        for line in lines:
            m = _DEF.match(line)
            if not m:
                continue
            name, op = m.groups()
            if op == "fusion":
                called = _CALLS.search(line)
                body = bodies.get(called.group(1), []) if called else []
                inner = {m.group(2) for x in body if (m := _DEF.match(x))}
                library = "YNNPACK" if "__ynn_fusion" in line else "XLA"
                matmul = "dot" in inner or "convolution" in inner
                kinds[name] = f"matmul ({library})" if matmul else "elementwise"
            elif op in ("dot", "convolution"):
                kinds[name] = "matmul (XLA)"
            elif op in ("copy", "transpose"):
                kinds[name] = "copy"
            else:
                kinds[name] = "other"
    return kinds


def profile(name: str, steps: int) -> dict:
    """Per-kind CPU milliseconds per step of TRAIN_CASES[name]."""
    config = bench.train_config(name)
    dumped = set(glob.glob(os.path.join(_DUMP, "*after_optimizations.txt")))
    run = bench.jax_train_steps(config, steps)
    run()  # compile and warm up
    before = set(glob.glob(os.path.join(_DUMP, "*after_optimizations.txt")))
    # The step is the largest module this case compiled.
    step_module = max(before - dumped, key=os.path.getsize)
    trace_dir = tempfile.mkdtemp(prefix="xla_ops_trace_")
    jax.profiler.start_trace(trace_dir)
    run()
    jax.profiler.stop_trace()
    dumps = set(glob.glob(os.path.join(_DUMP, "*after_optimizations.txt"))) - before
    assert not dumps, f"compiled again while profiling: {sorted(dumps)}"
    with open(step_module) as f:
        kinds = hlo_kinds(f.read())
    trace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                             recursive=True))[-1]
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    per_kind: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in kinds:
            per_kind[kinds[e["name"]]] += e["dur"] / 1e3 / steps
    flops = aot.train_pieces(config).flops_per_image * config.batch_size
    total = sum(per_kind.values())
    return {"case": name, "batch": config.batch_size, "ms_per_step": dict(per_kind),
            "total_ms": total, "gflops_per_cpu_second": flops / total / 1e6}


def markdown(results: list[dict]) -> str:
    kinds = ["matmul (YNNPACK)", "matmul (XLA)", "elementwise", "copy", "other"]
    lines = ["| step | " + " | ".join(kinds) + " | total CPU ms per step | GFLOP/s per core |",
             "|---" * (len(kinds) + 3) + "|"]
    for r in results:
        ms = [r["ms_per_step"].get(k, 0.0) for k in kinds]
        cells = [f"{t:.1f} ({100 * t / r['total_ms']:.0f}%)" for t in ms]
        lines.append(f"| {r['case']}, batch {r['batch']} | " + " | ".join(cells)
                     + f" | {r['total_ms']:.1f} | {r['gflops_per_cpu_second']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per case")
    parser.add_argument("--only", default="pretrain,finetune",
                        help="comma-separated subset of pretrain,finetune")
    parser.add_argument("--json", help="write the raw results to this file")
    args = parser.parse_args(argv)
    only = args.only.split(",")
    if not set(only) <= {"pretrain", "finetune"}:
        parser.error(f"--only must name some of pretrain, finetune, got {args.only!r}")
    results = [profile(f"{what} cpu", args.steps) for what in only]
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
