"""The whole pipeline in one command: pretrain, fine-tune per sigma, certify, cascade, report.

`python -m dmae_jax.main --config=configs/digits.py --workdir=runs/digits`

Stages (each resumes on its own: a finished stage is skipped, a killed training stage
restarts from its last checkpoint, a killed certification from its last logged image):

  workdir/pretrain/                DMAE pretraining (export/, reconstructions/)
  workdir/finetune_<sigma>/        classifier fine-tuned from the DMAE encoder, per sigma
                                   (every sigma in one loop, each run as it runs alone)
  workdir/certify/certify_sigma_<sigma>.tsv   CERTIFY at each sigma
  workdir/certify/cascade_<...>.tsv           the multi-scale cascade over all sigmas
  workdir/finetune_<sigma>_random_init/, certify/certify_sigma_<sigma>_random_init.tsv
                                   with random_init_baseline: the same fine-tuning from a
                                   random initialisation and its certification, per sigma
  workdir/report.md, certified_accuracy.png, reconstructions.png

Each stage is a run of its own through the run path (`dmae_jax.tasks.execute.run`; the
fine-tunings, trained in one loop, through `execute.run_together`): its
config is checked, its workdir or log locked, a resume under another configuration refused
and its config recorded exactly as when `main` starts it. The pipeline's own workdir is
locked for the whole pipeline.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from absl import logging

from dmae_jax import checks, report, storage
from dmae_jax import config as config_lib
from dmae_jax.tasks import execute


def _finetune_config(config, sigma: float, init_from: str) -> ml_collections.ConfigDict:
    """The fine-tuning stage at `sigma`, resolved (eta: the user's, else sigma's official)."""
    return config_lib.stage(config.finetune, sigma=sigma, init_from=init_from)


def _certify_config(config, **updates) -> ml_collections.ConfigDict:
    """One certification stage: config.certify with `updates`, resolved."""
    drop = ("sigma",) if updates.get("task") == "cascade" else ()
    return config_lib.stage(config.certify, drop=drop, **updates)


class _Stages:
    """Prints which stage runs, the time spent and an estimate of what is left.

    The estimate scales the time of the stages that did work in this invocation by their
    share of `weights`; a stage that took under a second had finished in an earlier
    invocation (a resumed pipeline) and does not count, so a resumed run is not promised
    an early end.
    """

    def __init__(self, names: list[str], weights: list[float]):
        self.names, self.weights = names, weights
        self.t0 = time.time()
        self.current: int | None = None
        self.current_start = self.t0
        self.worked = 0.0   # weight of the stages that did work in this invocation

    def start(self, i: int) -> None:
        now = time.time()
        if self.current is not None and now - self.current_start >= 1.0:
            self.worked += self.weights[self.current]
        self.current, self.current_start = i, now
        elapsed = now - self.t0
        eta = (f"{elapsed / self.worked * sum(self.weights[i:]):.0f}s" if self.worked
               else "?")
        line = (f"=== stage {i + 1}/{len(self.names)}: {self.names[i]} "
                f"(elapsed {elapsed:.0f}s, pipeline ETA {eta})")
        logging.info(line)
        if jax.process_index() == 0:
            print(line, flush=True)


def _finished(export_dir: str) -> bool:
    return storage.exists(os.path.join(export_dir, "meta.json"))


def _finetune_stage(config, runs: list[tuple[float, str, str]]) -> None:
    """Fine-tunes every (sigma, init_from, workdir) of `runs` whose export does not exist
    yet, all in one loop (`finetune.run_together`: same data, keys and step as each alone)."""
    todo = [(_finetune_config(config, sigma, init_from), ft_dir)
            for sigma, init_from, ft_dir in runs
            if not _finished(os.path.join(ft_dir, "export"))]
    if todo:
        execute.run_together([cfg for cfg, _ in todo], [ft_dir for _, ft_dir in todo])


def _certify_stage(config, cert_dir: str, **updates) -> str:
    """Runs (or resumes) one certification task; returns its log path."""
    cfg = _certify_config(config, **updates)
    execute.run(cfg, cert_dir)
    return os.path.join(cert_dir, cfg.log_name)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs every stage that has not finished yet, then writes the report."""
    sigmas = checks.sigmas(config, "sigmas")
    baselines = sigmas if config.random_init_baseline else ()
    listed = ", ".join(str(s) for s in sigmas)
    names = (["pretrain DMAE",
              f"fine-tune sigma={listed}" + (" from DMAE and random init" if baselines else "")]
             + [f"certify sigma={s}" for s in sigmas] + ["certify cascade"]
             + [f"certify random-init baseline sigma={s}" for s in baselines] + ["report"])
    # Each stage's share of the digits default's time on 2 idle cores (pretraining 67 s,
    # a fine-tuning ~85 s, a certification ~16 s).
    stages = _Stages(names, [4, 5 * (len(sigmas) + len(baselines))] + [1] * len(sigmas) + [1]
                     + [1] * len(baselines) + [0.2])
    storage.makedirs(workdir)
    k = 0

    pre_dir = os.path.join(workdir, "pretrain")
    stages.start(k)
    if not _finished(os.path.join(pre_dir, "export")):
        execute.run(config_lib.stage(config.pretrain), pre_dir)
    k += 1

    # Every fine-tuning in one loop: the DMAE-initialised classifier at each sigma and, with
    # random_init_baseline, DMAE's claim at every sigma: the same fine-tuning from a random
    # initialisation.
    ft_dirs = {sigma: os.path.join(workdir, f"finetune_{sigma}") for sigma in sigmas}
    baseline_dirs = {sigma: os.path.join(workdir, f"finetune_{sigma}_random_init")
                     for sigma in baselines}
    stages.start(k)
    _finetune_stage(config, [(s, os.path.join(pre_dir, "export"), d) for s, d in ft_dirs.items()]
                    + [(s, "", d) for s, d in baseline_dirs.items()])
    exports = {sigma: os.path.join(d, "export") for sigma, d in ft_dirs.items()}
    k += 1

    cert_dir = os.path.join(workdir, "certify")
    logs = {}
    for sigma in sigmas:
        stages.start(k)
        logs[f"sigma={sigma}"] = _certify_stage(
            config, cert_dir, task="certify", sigma=sigma, checkpoint=exports[sigma])
        k += 1

    stages.start(k)
    order = sorted(sigmas, reverse=True)
    logs["cascade"] = _certify_stage(
        config, cert_dir, task="cascade", sigmas=tuple(order), p0=config.p0,
        checkpoints=tuple(exports[s] for s in order))
    k += 1

    for sigma in baselines:
        stages.start(k)
        logs[f"sigma={sigma}, random init"] = _certify_stage(
            config, cert_dir, task="certify", sigma=sigma,
            checkpoint=os.path.join(baseline_dirs[sigma], "export"),
            log_name=f"certify_sigma_{sigma}_random_init.tsv")
        k += 1

    stages.start(k)
    if jax.process_index() == 0:
        write_report(workdir, logs, pre_dir, config, time.time() - stages.t0)


def write_report(workdir: str, logs: dict[str, str], pre_dir: str, config,
                 seconds: float) -> None:
    """report.md (clean accuracy, certified accuracy at radii, ACR), plot, reconstructions."""
    names = list(logs)
    rows = [report.load(logs[n]) for n in names]
    radii = list(config.report_radii)
    plot = os.path.join(workdir, "certified_accuracy.png")
    report.plot_certified_accuracy(plot, rows, names, max_radius=max(radii))
    grids = [f for f in storage.listdir(os.path.join(pre_dir, "reconstructions"))
             if f.endswith(".png")]
    if grids:
        storage.copy(os.path.join(pre_dir, "reconstructions", grids[-1]),
                     os.path.join(workdir, "reconstructions.png"))
    table = report.markdown_table(rows, names, radii=radii)
    comparison = init_comparison(dict(zip(names, rows, strict=True)))
    text = (
        f"# dmae_jax digits pipeline\n\n"
        f"Certified accuracy (fraction of the {len(rows[0])} test images certified correct "
        f"at L2 radius >= r, [0,1] pixel units), N0={config.certify.n0}, N={config.certify.n}, "
        f"alpha={config.certify.alpha}. Clean accuracy is the smoothed classifier's accuracy "
        f"(r = 0); ACR is the average certified radius.\n\n{table}\n\n"
        f"{comparison}"
        f"![certified accuracy](certified_accuracy.png)\n\n"
        f"Reconstructions on test digits (rows: clean; noisy sigma={config.pretrain.sigma} "
        f"with {config.pretrain.mask_ratio:.0%} of the patches masked; DMAE's reconstruction "
        f"of it; the whole noisy image; DMAE's reconstruction with nothing masked):\n\n"
        f"![reconstructions](reconstructions.png)\n\n"
        f"{reconstruction_summary(os.path.join(pre_dir, 'reconstructions'))}"
        f"Wall time of this invocation: {seconds:.0f} s on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s).\n"
    )
    storage.write_atomic(os.path.join(workdir, "report.md"), text)
    print(text, flush=True)


def init_comparison(rows: dict[str, list]) -> str:
    """Markdown: DMAE-initialised against random-init fine-tuning at each sigma that has both
    logs ("sigma=<s>" and "sigma=<s>, random init"), clean accuracy (r = 0) and ACR; "" when
    no sigma has a baseline."""
    lines = []
    for name, baseline in rows.items():
        if not name.endswith(", random init") or name[:-len(", random init")] not in rows:
            continue
        dmae = rows[name[:-len(", random init")]]
        acc = [float(report.certified_accuracy(r, [0.0])[0]) for r in (dmae, baseline)]
        acrs = [report.acr(r) for r in (dmae, baseline)]
        ahead = ", ".join(what for what, (a, b) in (("r = 0", acc), ("ACR", acrs)) if a > b)
        lines.append(f"| {name[len('sigma='):-len(', random init')]} | {acc[0]:.3f} | "
                     f"{acc[1]:.3f} | {acrs[0]:.3f} | {acrs[1]:.3f} | {ahead or 'neither'} |")
    if not lines:
        return ""
    return ("DMAE's claim at every sigma: the same fine-tuning budget from the DMAE encoder "
            "and from a random initialisation.\n\n"
            "| sigma | clean acc., DMAE init | clean acc., random init | ACR, DMAE init | "
            "ACR, random init | DMAE ahead at |\n|---|---|---|---|---|---|\n"
            + "\n".join(lines) + "\n\n")


def reconstruction_summary(recon_dir: str) -> str:
    """Markdown: the newest evaluation's masked-patch MSE against its flat-block baseline (the
    step_<step>.json pretraining writes next to its grid); "" when there is none."""
    found = [f for f in storage.listdir(recon_dir) if f.endswith(".json")]
    if not found:
        return ""
    m = json.loads(storage.read_text(os.path.join(recon_dir, found[-1])))
    flat = ("each masked patch at its own noisy mean, which is what this norm-pix model shows "
            "when it predicts nothing" if m["norm_pix_loss"] else
            "each masked patch at the mean colour of the image's visible noisy patches")
    return (f"Masked patches of {m['images']} test images (step {m['step']}): reconstruction "
            f"MSE {m['masked_mse']:.4f} in [0,1] pixels, "
            f"{m['masked_mse'] / max(m['flat_block_mse'], 1e-12):.2f} x the "
            f"{m['flat_block_mse']:.4f} of flat blocks ({flat}); below 1.00 x the "
            f"reconstruction draws structure flat blocks cannot.\n\n")
