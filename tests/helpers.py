"""Running `python -m dmae_jax.main` in subprocesses, as a user or a pod launcher would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss=([-\d.eE+naif]+)", re.M)


def main_command(config: str, workdir: str, *overrides: str) -> list[str]:
    """The argv of one `dmae_jax.main` invocation."""
    return [sys.executable, "-m", "dmae_jax.main", f"--config={config}",
            f"--workdir={workdir}", *overrides]


def env(num_devices: int = 1, **extra: str) -> dict[str, str]:
    """A child environment with `num_devices` CPU devices and quiet TensorFlow."""
    e = dict(os.environ)
    e.update(JAX_NUM_CPU_DEVICES=str(num_devices), TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    e.update(extra)
    return e


def run(cmd: list[str], *, num_devices: int = 1, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    """Runs to completion; fails the test with the child's output if it fails."""
    proc = subprocess.run(cmd, cwd=REPO, env=env(num_devices), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}"
                             f"\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def losses(stdout: str) -> dict[int, float]:
    """{step: loss} from the progress lines."""
    return {int(m.group(1)): float(m.group(3)) for m in STEP_LINE.finditer(stdout)}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Polls `predicate` until true; fails if it times out or `proc` exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def checkpoint_steps(workdir: str) -> list[int]:
    """Finished checkpoint steps under workdir/checkpoints."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def set_params(module, params) -> None:
    """Loads a pure-dict parameter tree (e.g. a converted checkpoint) into `module` in place.

    Every Param must be present with its shape (`exports.match_tree` checks); parameters
    become float32, as exports hold them.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dmae_jax.exports import match_tree

    state = nnx.state(module, nnx.Param)
    checked = match_tree(state.to_pure_dict(), dict(params), where="params")
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), checked))
    nnx.update(module, state)


def tiny_digits_classifiers(root, sigmas):
    """Randomly initialised 16x16 digits classifier exports, one "fine-tuned" at each sigma.

    Prepares the digits test split under `root/tfds`; returns (data_dir, {sigma: export}).
    """
    from flax import nnx

    from dmae_jax import defaults, exports
    from dmae_jax.data import datasets
    from dmae_jax.models import create_classifier

    data_dir = str(root / "tfds")
    datasets.load_source("digits", "test", data_dir=data_dir, image_size=16)
    model_cfg = defaults.model("mu", img_size=16, patch_size=4)
    paths = {}
    for seed, sigma in enumerate(sigmas):
        model = create_classifier(model_cfg, 10, rngs=nnx.Rngs(seed))
        paths[sigma] = str(root / f"ft_{sigma}" / "export")
        exports.save(paths[sigma], nnx.state(model, nnx.Param).to_pure_dict(),
                     {"kind": "classifier", "model": model_cfg.to_dict(), "num_classes": 10,
                      "sigma": sigma})
    return data_dir, paths
