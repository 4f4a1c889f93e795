r"""DMAE-L/16 pretraining on ImageNet-1k, exactly the paper's recipe.

1600 epochs, batch 4096, lr 1.5e-4 * 4096/256 = 2.4e-3, AdamW (0.9, 0.95), wd 0.05, 40
warm-up epochs then per-step cosine, sigma 0.25, mask 75%, norm-pix loss.

TPU v4-128 (64 chips), see launch/tpu_pod.sh:
  python -m dmae_jax.main --config=configs/vit_large.py \
      --workdir=gs://BUCKET/dmae_large --config.data.data_dir=gs://BUCKET/tfds
Add --config.model.remat=True when activations do not fit, --config.mesh.fsdp=N to shard
parameters and optimizer state over N chips, --config.accum_steps=K on fewer chips.
"""

from dmae_jax import config as config_lib
from dmae_jax import defaults


def get_config(arg=None):
    """DMAE-L/16; runlocal: a few-step smoke run."""
    args = config_lib.parse_arg(arg, runlocal=False)
    cfg = defaults.pretrain(dataset="imagenet2012", variant="large")
    # The papers trained under fp16 autocast: bfloat16 compute, float32 parameters, optimizer
    # state and gradient all-reduce. --config.model.dtype=float32 for float32 throughout.
    cfg.model.dtype = "bfloat16"
    cfg.num_epochs = 1600
    cfg.data.worker_count = 16
    cfg.log_every_steps = 100
    cfg.ckpt_every_steps = 2000
    if args.runlocal:
        cfg.batch_size, cfg.total_steps, cfg.data.worker_count = 8, 10, 0
    return cfg
