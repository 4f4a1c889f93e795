r"""The embedded default: the whole DMAE pipeline on real handwritten digits, on 2 CPU cores.

scikit-learn ships 1797 real 8x8 digits; we upscale them to 16x16 RGB (1501 train / 296
test), pretrain DMAE for 60 epochs (sigma 0.25, 50% masking, pixel targets: on 16-patch
images the paper's 75% leaves 4 patches and the masked ones come back as blurs), fine-tune a
smoothed classifier from its encoder for 40 epochs at sigma 0.25, 0.5 and 1.0 (two noisy
copies, consistency regularisation, label smoothing, layer decay: the official CIFAR-10
recipe), certify every second test image (148) at each sigma (N0 = 100, N = 500,
alpha = 0.001) and with the multi-scale cascade, and write workdir/report.md with the plot
and the reconstruction grid. About 11 minutes on 2 idle cores (README: measured time):

  python -m dmae_jax.main --config=configs/digits.py --workdir=runs/digits

Rerunning after a kill resumes each stage instead of starting over. With `:compare` it also
fine-tunes a classifier from a random initialisation at every sigma with the same budget
and certifies it next to the DMAE-initialised one (DMAE's claim at every sigma; one more
fine-tuning and certification per sigma):

  python -m dmae_jax.main --config=configs/digits.py:compare --workdir=runs/digits
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """compare: also the random-init baseline at every sigma; runlocal: a few steps (tests)."""
    args = config_lib.parse_arg(arg, compare=False, runlocal=False)
    cfg = defaults.end_to_end()
    if args.compare:
        cfg.random_init_baseline = True
    if args.runlocal:
        cfg.pretrain.update(total_steps=4, log_every_steps=2, ckpt_every_steps=2,
                            eval_every_steps=4)
        cfg.finetune.update(total_steps=4, log_every_steps=2, ckpt_every_steps=2,
                            eval_every_steps=4)
        cfg.certify.update(n=60, max=12, batch_size=64)
    return cfg
