"""The GPU check runs in a plain JAX + PyTorch image: nothing it imports needs TensorFlow,
TFDS, Grain or CLU (imported here with those blocked), and it builds both training steps."""

import subprocess
import sys

from tests import helpers

CODE = """
import sys
for name in ("tensorflow", "tensorflow_datasets", "grain", "clu"):
    sys.modules[name] = None  # importing any of them now raises ImportError
import benchmarks.gpu_check as g
from dmae_jax import aot
for task in ("pretrain", "finetune"):
    pieces = aot.train_pieces(g._train_config(g.Check(small=True), task))
    assert pieces.flops_per_image > 0 and pieces.labels == (task == "finetune")
print("ok")
"""


def test_gpu_check_imports_and_builds_without_tf_tfds_grain_clu():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=helpers.REPO, env=helpers.env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
