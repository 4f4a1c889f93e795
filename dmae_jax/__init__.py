"""dmae_jax: DMAE pretraining, smoothed-classifier fine-tuning and certification in JAX."""

__version__ = "0.1.0"

import os as _os

# gs:// through the clients tested against the GCS emulator (dmae_jax/storage.py, DESIGN),
# set before anything of ours can touch a gs:// path: etils' gcsfs backend rather than
# tf.io.gfile when TensorFlow is installed, and gcsfs without its experimental bucket-layout
# lookups. The environment can override both.
_os.environ.setdefault("EPATH_USE_TF", "false")
_os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
