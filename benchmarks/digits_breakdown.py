r"""Where the digits pipeline's training time goes: per step, input, host-to-device transfer,
dispatch, device compute, metrics and checkpointing, and CPU time by thread.

  python -m benchmarks.digits_breakdown [--steps 100] [--before] [--data_dir DIR] [--json F]

Each training stage of `configs/digits.py` (pretraining; one fine-tuning; the three
fine-tunings trained together) is built as its trainer builds it and timed over the same
steps twice:

* free-running, as the trainer runs: wall time, CPU time (user, system) and minor page
  faults per step, and the CPU time of each thread group (the loop's Python thread, XLA's
  threads, other threads such as Grain's prefetch);
* blocking after every phase, to attribute the time: input (the next batches as NumPy),
  transfer (device arrays ready), dispatch (the call returning), compute (the device
  finishing), metrics (fetching a progress line's numbers, charged per step at the config's
  log period) and checkpoint (one Orbax save and wait, charged per step at the save period).

`--before` measures the loop as it was before several steps per dispatch: one step per call,
the Grain pipeline for the in-memory digits, glibc's default memory settings, and the
fine-tunings one after another. The machine's load average is printed with each stage;
under load, wall times measure the other processes too, CPU times much less so.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import tempfile
import time

BEFORE = "--before" in sys.argv
if not BEFORE:
    from dmae_jax import host

    host.configure()  # as dmae_jax.main does

import jax  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> collections.Counter:
    """{(thread group, user|system): CPU seconds} of this process's threads."""
    out: collections.Counter = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        group = "xla" if "XLA" in name else "python" if tid == str(os.getpid()) else "other"
        out[(group, "user")] += int(fields[11]) / _TICK
        out[(group, "system")] += int(fields[12]) / _TICK
    return out


class RecordsOnly:
    """A source seen as a plain sequence of records: the Grain pipeline reads it."""

    def __init__(self, source):
        self.source, self.name = source, source.name

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return self.source[index]


def build(configs, data_dir: str, per_call: int):
    """(train_step, states, data iterator, mesh) of fine-tunings trained together (or one
    pretraining), as the trainers build them."""
    from dmae_jax import aot, parallel
    from dmae_jax.data import datasets, pipeline
    from dmae_jax.train import common

    config = configs[0]
    mesh = parallel.make_mesh(1)
    source = datasets.load_source(config.data.dataset, config.data.train_split,
                                  data_dir=data_dir, image_size=config.data.image_size)
    data_iter = pipeline.train_iterator(
        RecordsOnly(source) if BEFORE else source, global_batch_size=config.batch_size,
        seed=config.seed, augment=config.data.augment, image_size=config.data.image_size)
    pieces = [aot.train_pieces(c, concrete=True) for c in configs]
    makes = [lambda p, tx=pc.tx: common.init_state(p, tx, jax.random.key(0)) for pc in pieces]
    shardings = tuple(common.state_shardings(m, pc.parts.params, mesh)
                      for m, pc in zip(makes, pieces, strict=True))
    states = tuple(jax.jit(m, out_shardings=sh)(pc.parts.params)
                   for m, sh, pc in zip(makes, shardings, pieces, strict=True))
    several = len(configs) > 1
    step = common.make_train_step(
        tuple(pc.loss_fn for pc in pieces) if several else pieces[0].loss_fn,
        tuple(pc.tx for pc in pieces) if several else pieces[0].tx, mesh=mesh,
        state_sharding=shardings if several else shardings[0],
        lr_fn=tuple(pc.lr_fn for pc in pieces) if several else pieces[0].lr_fn,
        steps_per_call=per_call)
    return step, states if several else states[0], data_iter, mesh


def measure(name: str, configs, data_dir: str, steps: int) -> dict:
    """The free-running and the blocking breakdown of `steps` steps of one stage."""
    from dmae_jax import checkpoints
    from dmae_jax.train import common

    config = configs[0]
    per_call = 1 if BEFORE else config.steps_per_call
    step, states, data_iter, mesh = build(configs, config.data.data_dir or data_dir, per_call)
    calls = [min(per_call, steps - i) for i in range(0, steps, per_call)]

    def train(blocking: bool, times: collections.Counter):
        nonlocal states
        for count in calls:
            t0 = time.perf_counter()
            batches = data_iter.next_batches(count)
            t1 = time.perf_counter()
            if blocking:  # the transfer run_steps makes, on its own
                jax.block_until_ready(jax.device_put(batches))
            t2 = time.perf_counter()
            states, metrics = common.run_steps(step, states, batches, mesh, per_call)
            t3 = time.perf_counter()
            if blocking:
                jax.block_until_ready((states, metrics))
            t4 = time.perf_counter()
            times.update(input=t1 - t0, transfer=t2 - t1, dispatch=t3 - t2, compute=t4 - t3)
        jax.block_until_ready(states)
        return metrics

    train(False, collections.Counter())  # compile and warm up
    cpu0, faults0 = thread_cpu(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    load0, wall0 = os.getloadavg()[0], time.perf_counter()
    train(False, collections.Counter())
    wall = time.perf_counter() - wall0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    cpu = thread_cpu()
    cpu.subtract(cpu0)
    blocked: collections.Counter = collections.Counter()
    metrics = train(True, blocked)
    t0 = time.perf_counter()
    jax.device_get(metrics)
    blocked["metrics"] = (time.perf_counter() - t0) * steps / config.log_every_steps
    with tempfile.TemporaryDirectory() as workdir:
        ckpt = checkpoints.TrainCheckpointer(workdir, fingerprint={})
        t0 = time.perf_counter()
        for i, state in enumerate(states if len(configs) > 1 else (states,)):
            ckpt.save(i + 1, state, {"data_iter": data_iter.get_state()})
            ckpt.wait()
        save = time.perf_counter() - t0
        ckpt.close()
    blocked["checkpoint"] = save * steps / config.ckpt_every_steps
    per_step = {k: 1e3 * v / steps for k, v in blocked.items()}
    result = {
        "stage": name, "runs": len(configs), "steps": steps, "steps_per_call": per_call,
        "load": (load0, os.getloadavg()[0]), "wall_ms": 1e3 * wall / steps,
        "cpu_ms": {f"{g} {k}": 1e3 * v / steps for (g, k), v in sorted(cpu.items()) if v > 0},
        "faults_per_step": faults / steps, "blocking_ms": per_step, "save_s": save,
    }
    data_iter.close()
    return result


def markdown(results: list[dict]) -> str:
    """One table row per stage."""
    phases = ("input", "transfer", "dispatch", "compute", "metrics", "checkpoint")
    lines = ["| stage | steps per call | wall per step | CPU per step (user + system) | "
             "CPU by thread | page faults per step | "
             + " | ".join(f"{p} (blocking)" for p in phases) + " | load |",
             "|---" * (7 + len(phases)) + "|"]
    for r in results:
        cpu = r["cpu_ms"]
        user = sum(v for k, v in cpu.items() if k.endswith("user"))
        system = sum(v for k, v in cpu.items() if k.endswith("system"))
        groups = collections.Counter()
        for k, v in cpu.items():
            groups[k.split()[0]] += v
        by_thread = ", ".join(f"{g} {v:.0f}" for g, v in groups.most_common())
        lines.append(
            f"| {r['stage']} | {r['steps_per_call']} | {r['wall_ms']:.1f} ms | "
            f"{user + system:.0f} ms ({user:.0f} + {system:.0f}) | {by_thread} | "
            f"{r['faults_per_step']:,.0f} | "
            + " | ".join(f"{r['blocking_ms'].get(p, 0):.1f} ms" for p in phases)
            + f" | {r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Measures every training stage of the digits pipeline, prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per measurement")
    parser.add_argument("--before", action="store_true",
                        help="one step per call, Grain, glibc defaults, fine-tunings in turn")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
    parser.add_argument("--json", help="write the raw results to this file")
    args = parser.parse_args(argv)

    from configs import digits
    from dmae_jax import config as config_lib

    pipeline = digits.get_config()
    stages = [("pretrain", [pipeline.pretrain])]
    finetunes = []
    for sigma in pipeline.sigmas:  # from a random initialisation: the same computation
        cfg = pipeline.finetune.copy_and_resolve_references()
        cfg.sigma, cfg.init_from = sigma, ""
        finetunes.append(cfg)
    stages.append(("fine-tune sigma=0.25", finetunes[:1]))
    if not args.before:
        stages.append(("fine-tune 3 sigmas together", finetunes))
    results = []
    for name, configs in stages:
        configs = [config_lib.resolve(c) for c in configs]
        for c in configs:
            c.data.data_dir = args.data_dir
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        results.append(measure(name, configs, args.data_dir, args.steps))
    print(("before (one step per call, Grain, glibc defaults)\n" if args.before else "")
          + markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
