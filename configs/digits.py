r"""The embedded default: the whole DMAE pipeline on real handwritten digits, on 2 CPU cores.

scikit-learn ships 1797 real 8x8 digits; we upscale them to 16x16 RGB (1501 train / 296
test), pretrain DMAE (sigma 0.25, 75% masking), fine-tune a smoothed classifier from its
encoder at sigma 0.25, 0.5 and 1.0 (two noisy copies, consistency regularisation, label
smoothing, layer decay: the official CIFAR-10 recipe), certify every second test image
(148) at each sigma (N0 = 100, N = 500, alpha = 0.001) and with the multi-scale cascade, and
write workdir/report.md with the plot and the reconstruction grid. About 10 minutes on
2 cores:

  python -m dmae_jax.main --config=configs/digits.py --workdir=runs/digits

Rerunning after a kill resumes each stage instead of starting over. With `:compare` it also
fine-tunes the sigma=0.25 classifier from a random initialisation with the same budget and
certifies it next to the DMAE-initialised one (DMAE's claim, in small):

  python -m dmae_jax.main --config=configs/digits.py:compare --workdir=runs/digits
"""

import ml_collections

from dmae_jax import defaults


def get_config(arg=None):
    """The digits pipeline; `arg`: `compare` (random-init baseline), `runlocal` (tests)."""
    cfg = ml_collections.ConfigDict()
    cfg.task = "pipeline"
    cfg.sigmas = (0.25, 0.5, 1.0)
    cfg.p0 = 0.5
    cfg.pretrain = defaults.digits_pretrain()
    cfg.finetune = defaults.digits_finetune()
    cfg.certify = defaults.certify("digits")
    cfg.report_radii = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    cfg.random_init_baseline = 0.25 if arg and "compare" in arg else 0.0
    if arg and "runlocal" in arg:
        cfg.pretrain.update(total_steps=4, log_every_steps=2, ckpt_every_steps=2,
                            eval_every_steps=4)
        cfg.finetune.update(total_steps=4, log_every_steps=2, ckpt_every_steps=2,
                            eval_every_steps=4)
        cfg.certify.update(n=60, max=12, batch_size=64)
    return cfg
