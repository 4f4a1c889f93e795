r"""DMAE-B/16 pretraining on ImageNet-1k, exactly the paper's recipe.

1100 epochs, batch 4096, lr 1.5e-4 * 4096/256 = 2.4e-3, AdamW (0.9, 0.95), wd 0.05, 40
warm-up epochs then per-step cosine, sigma 0.25, mask 75%, norm-pix loss.

TPU v4-64 (32 chips). Not measured; a FLOP estimate: 58 GFLOP per training image (encoder on
50 tokens, 512x8 decoder on 197, x3) x 1.41e9 images = 8.2e19 FLOP, i.e. about 9 h at the MAE
paper's ~29% MFU on 32 v4 chips (275 TFLOP/s bf16 each), 18 h at 15%:
  python -m dmae_jax.main --config=configs/vit_base.py \
      --workdir=gs://BUCKET/dmae_base --config.data.data_dir=gs://BUCKET/tfds
Fewer chips: add --config.accum_steps=K to keep the global batch at 4096.
ImageNet must be prepared first (TFDS manual download; pip install -e ".[prepare]"):
  python -m dmae_jax.prepare --dataset=imagenet2012 --manual_dir=DIR --data_dir=DATA_DIR
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """DMAE-B/16; runlocal: a few-step smoke run."""
    args = config_lib.parse_arg(arg, runlocal=False)
    cfg = defaults.pretrain(dataset="imagenet2012", variant="base")
    # The papers trained under fp16 autocast: bfloat16 compute, float32 parameters, optimizer
    # state and gradient all-reduce. --config.model.dtype=float32 for float32 throughout.
    cfg.model.dtype = "bfloat16"
    cfg.num_epochs = 1100
    cfg.data.worker_count = 16
    cfg.log_every_steps = 100
    cfg.ckpt_every_steps = 2000
    if args.runlocal:
        cfg.batch_size, cfg.total_steps, cfg.data.worker_count = 8, 10, 0
    return cfg
