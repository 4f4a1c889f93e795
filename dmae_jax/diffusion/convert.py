"""Imports the official improved-diffusion / guided-diffusion UNet checkpoints into our UNet.

    python -m dmae_jax.diffusion.convert --checkpoint=cifar10_uncond_50M_500K.pt \\
        --preset=cifar10_uncond_50M_500K --out=/path/to/unet_cifar10
    python -m dmae_jax.diffusion.convert --checkpoint=256x256_diffusion_uncond.pt \\
        --preset=256x256_diffusion_uncond --out=/path/to/unet_imagenet

Checkpoints are read without PyTorch by `dmae_jax.pth` (weights only: no pickled code runs). Every
parameter of our model must come from exactly one checkpoint key and every key must be
used; a missing or unknown key or a shape mismatch is an error naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx, traverse_util

from dmae_jax import errors, pth
from dmae_jax.architectures import UNET_PRESETS, UNetConfig
from dmae_jax.convert import save_export
from dmae_jax.errors import UserError
from dmae_jax.models.unet import UNet, export_meta


class ConversionError(UserError, ValueError):
    """The checkpoint does not match the UNet configuration."""


# Our layer attribute -> the PyTorch submodule holding the same weights.
_TORCH_MODULE = {
    "in_norm": "in_layers.0",
    "in_conv": "in_layers.2",
    "emb_proj": "emb_layers.1",
    "out_norm": "out_layers.0",
    "out_conv": "out_layers.3",
    "skip": "skip_connection",
    "norm": "norm",
    "qkv": "qkv",
    "proj_out": "proj_out",
    "op": "op",
    "conv": "conv",
}
_TOP_LEVEL = {
    "time_embed_in": "time_embed.0",
    "time_embed_out": "time_embed.2",
    "out_norm": "out.0",
    "out_conv": "out.2",
}
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_key(path: tuple) -> str:
    """The state_dict key of one of our parameters, e.g.
    ("input_blocks", 1, 0, "in_conv", "kernel") -> "input_blocks.1.0.in_layers.2.weight"."""
    *modules, leaf = path
    head = modules[0]
    if head in _TOP_LEVEL and len(modules) == 1:
        prefix = _TOP_LEVEL[head]
    elif head in ("input_blocks", "output_blocks"):
        prefix = f"{head}.{modules[1]}.{modules[2]}"
        if len(modules) == 4:
            prefix += "." + _TORCH_MODULE[modules[3]]
    elif head == "middle_block":
        prefix = f"middle_block.{modules[1]}." + _TORCH_MODULE[modules[2]]
    else:
        raise ConversionError(f"no PyTorch counterpart for parameter {'/'.join(map(str, path))}")
    return f"{prefix}.{_TORCH_LEAF[leaf]}"


def _to_flax(key: str, value: np.ndarray, leaf: str, expected: tuple[int, ...]) -> np.ndarray:
    """PyTorch layout -> ours: conv OIHW -> HWIO, conv1d OI1 and linear OI -> IO."""
    if leaf == "kernel":
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 3 and value.shape[-1] == 1:
            value = value[:, :, 0].T
        elif value.ndim == 2:
            value = value.T
    if value.shape != tuple(expected):
        raise ConversionError(
            f"shape mismatch for {key}: checkpoint has {tuple(value.shape)} "
            f"(as {leaf}), the model expects {tuple(expected)}"
        )
    return value


def expected_param_shapes(config: UNetConfig) -> dict[tuple, tuple[int, ...]]:
    """Flattened {path: shape} of `nnx.state(UNet(config), nnx.Param)` (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
    flat = traverse_util.flatten_dict(nnx.state(abstract, nnx.Param).to_pure_dict())
    return {path: tuple(v.shape) for path, v in flat.items()}


def convert_unet_state_dict(state_dict: Mapping[str, Any], config: UNetConfig) -> dict:
    """Official UNet state_dict -> pure nested dict for `nnx.update` (float32 numpy arrays)."""
    converted, used = {}, set()
    for path, shape in expected_param_shapes(config).items():
        key = torch_key(path)
        if key not in state_dict:
            raise ConversionError(
                f"checkpoint is missing {key} (shape {shape} in our layout, for "
                f"{'/'.join(map(str, path))}); is --preset right?"
            )
        value = np.asarray(_as_numpy(state_dict[key]), dtype=np.float32)
        converted[path] = _to_flax(key, value, path[-1], shape)
        used.add(key)
    unknown = [k for k in state_dict if k not in used]
    if unknown:
        shapes = ", ".join(f"{k} {tuple(np.shape(_as_numpy(state_dict[k])))}" for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ConversionError(
            f"checkpoint has {len(unknown)} key(s) the model does not use: {shapes}{more}; "
            "is --preset right?"
        )
    return traverse_util.unflatten_dict(converted)


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor; fp16 checkpoints are upcast exactly.
        return value.detach().cpu().float().numpy()
    return np.asarray(value)


def load_torch_state_dict(path: str) -> dict[str, Any]:
    """Reads a plain state_dict file without PyTorch (`dmae_jax.pth`); clear error otherwise."""
    if os.path.isdir(path):
        raise ConversionError(f"--checkpoint {path!r} is a directory, not a .pt file")
    try:
        obj = pth.load(path)
    except FileNotFoundError:
        raise ConversionError(f"--checkpoint {path!r} does not exist") from None
    except pth.CheckpointFormatError as e:  # includes a pickle that asks for code to run
        reason = str(e).strip().splitlines()[0]
        raise ConversionError(
            f"--checkpoint {path!r} is not a PyTorch checkpoint of weights only "
            f"({reason[:200]})"
        ) from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise ConversionError(
            f"--checkpoint {path!r} holds a {type(obj).__name__}, expected a UNet state_dict "
            "(a mapping of parameter names to tensors, as the official .pt files are)"
        )
    return dict(obj)


@errors.reporting
def main(argv: list[str] | None = None) -> None:
    """CLI: convert one official checkpoint to a dmae_jax parameter export; a bad input is one
    `error:` line and exit status 2."""
    parser = errors.ArgumentParser(
        prog="python -m dmae_jax.diffusion.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="official .pt state_dict")
    parser.add_argument("--preset", required=True, choices=sorted(UNET_PRESETS))
    parser.add_argument("--out", required=True, help="directory for the parameter export")
    args = parser.parse_args(argv)

    config = UNET_PRESETS[args.preset]
    params = convert_unet_state_dict(load_torch_state_dict(args.checkpoint), config)
    save_export(args.out, params, export_meta(config, args.preset))
    n = sum(int(np.prod(v.shape)) for v in traverse_util.flatten_dict(params).values())
    print(f"wrote {n:,} parameters of {args.preset} to {args.out}")


if __name__ == "__main__":
    main()
