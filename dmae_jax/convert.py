"""Imports official PyTorch DMAE checkpoints (timm 0.5.4 key names) as dmae_jax parameters.

    python -m dmae_jax.convert --checkpoint=dmae_base_sigma_0.25_mask_0.75_1100e.pth \
        --model=base --out=/tmp/dmae_base

Reads a bare state_dict (the released DMAE files), a `{'model': state_dict, ...}` wrapper
(MAE-style training checkpoints, whose `args`, `optimizer`, `epoch` are ignored), or a
fine-tuned classifier state_dict (with `fc_norm`/`head`, or `norm`/`head` for cls-token
pooling) with `dmae_jax.pth`, a weights-only unpickler that needs no PyTorch: a file whose
pickle asks for anything but tensors, containers and an `args` namespace is refused before
any of it runs.
Every key must be used: an unknown or missing key, or a shape mismatch, is an error naming
the key and both shapes. The result is a parameter export (`dmae_jax.exports.save`)
holding `nnx.state(model, nnx.Param).to_pure_dict()` and meta
`{"kind", "model", "num_classes", "source"}`.

Mapping: Linear `weight` (out, in) -> `kernel` (in, out); Conv `weight` (D, C, p, p) ->
`kernel` (p, p, C, D); LayerNorm `weight` -> `scale`; everything else as is. The DMAE's fixed
sin-cos `pos_embed` / `decoder_pos_embed` are not parameters: they are checked against the
sin-cos embedding of the checkpoint's grid and then regenerated for the requested img_size.
A classifier's trainable `pos_embed` is interpolated bicubically (MAE's
`interpolate_pos_embed`, PyTorch's bicubic map computed in JAX) when the grid differs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from dmae_jax import architectures, errors, exports, pth
from dmae_jax.errors import ConfigError, UserError
from dmae_jax.models import create_classifier, create_dmae, resolve_model_config, vit

KINDS = ("dmae", "classifier")
_FIXED_EMBEDDINGS = ("pos_embed", "decoder_pos_embed")
_SINCOS_TOLERANCE = 1e-4


class ConvertError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message names the key and shapes."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a .pth file as {timm key: float32 array}, unwrapping {'model': ...} and 'module.'."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConvertError(f"--checkpoint {path} is a directory, not a .pth file")
    if not os.path.isfile(path):
        raise ConvertError(f"checkpoint file not found: {path}")
    try:
        obj = pth.load(path)
    except pth.UnsafeCheckpointError as e:
        raise ConvertError(
            f"{path} holds Python objects besides tensors, which we never unpickle ({e}). "
            "If the file is trusted, re-save only the weights with PyTorch: "
            "torch.save(torch.load(f, weights_only=False)['model'], 'model.pth')") from None
    except pth.CheckpointFormatError as e:
        raise ConvertError(f"{path} is not a PyTorch checkpoint ({e})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise ConvertError(f"{path} does not hold a state_dict (got {type(obj).__name__})")
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise ConvertError(
                f"{path} is not a state_dict: entry {key!r} is a {type(value).__name__}, "
                "not a tensor"
            )
        name = key[len("module."):] if key.startswith("module.") else key
        state_dict[name] = value.astype(np.float32)
    return state_dict


def detect_kind(state_dict: Mapping[str, Any]) -> str:
    """'dmae' for a pretraining state_dict (decoder keys), 'classifier' for one with a head."""
    is_dmae = any(k == "mask_token" or k.startswith("decoder_") for k in state_dict)
    is_classifier = "head.weight" in state_dict
    if is_dmae and is_classifier:
        raise ConvertError("the state_dict has both decoder keys and 'head.weight'")
    if is_dmae:
        return "dmae"
    if is_classifier:
        return "classifier"
    raise ConvertError(
        "neither a DMAE pretraining state_dict (no 'mask_token'/'decoder_*' keys) nor a "
        "fine-tuned classifier (no 'head.weight'); encoder-only exports are not supported"
    )


def _torch_key(path: tuple) -> str:
    """('blocks', 3, 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight'."""
    *parents, leaf = [str(k) for k in path]
    return ".".join(parents + ["weight" if leaf in ("kernel", "scale") else leaf])


def _to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax layout for one tensor."""
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


def _torch_shape(leaf: str, shape: tuple) -> tuple:
    """Flax shape -> the torch shape the checkpoint must have."""
    if leaf == "kernel" and len(shape) == 2:
        return tuple(reversed(shape))
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _grid_of(key: str, shape: tuple) -> int:
    """Side of the square patch grid of a [1, 1 + g*g, D] pos embed."""
    g = int(round((shape[1] - 1) ** 0.5)) if len(shape) == 3 and shape[1] > 1 else 0
    if len(shape) != 3 or shape[0] != 1 or g * g != shape[1] - 1:
        raise ConvertError(f"{key!r} has shape {tuple(shape)}, expected (1, 1 + g*g, D)")
    return g


def _resize_pos_embed(value: np.ndarray, grid_size: int) -> np.ndarray:
    """MAE `interpolate_pos_embed`: torch bicubic (align_corners=False) on the grid, cls kept."""
    _grid_of("pos_embed", value.shape)
    return np.asarray(vit.interpolate_pos_embed(value, grid_size), np.float32)


def _check_sincos(key: str, value: np.ndarray) -> None:
    """The DMAE keeps its pos embeds fixed: the checkpoint's must be the sin-cos embedding."""
    grid = _grid_of(key, value.shape)
    expected = vit.sincos_2d_posemb(grid, value.shape[2])[None]
    diff = float(np.max(np.abs(value - expected)))
    if diff > _SINCOS_TOLERANCE:
        raise ConvertError(
            f"{key!r} is not the fixed 2-D sin-cos embedding of a {grid}x{grid} grid (max abs "
            f"diff {diff:.3g}); DMAE pretraining checkpoints keep it fixed"
        )


def _abstract_params(kind: str, model_cfg: Mapping[str, Any], num_classes: int | None) -> dict:
    """Shapes of the target model's Params as a pure dict, without allocating them."""
    if kind == "dmae":
        model = nnx.eval_shape(lambda: create_dmae(model_cfg, rngs=nnx.Rngs(0)))
    else:
        model = nnx.eval_shape(
            lambda: create_classifier(model_cfg, num_classes, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param).to_pure_dict()


def _nest(flat: dict[tuple, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _list_keys(items: Sequence[str]) -> str:
    shown = ", ".join(items[:4])
    return shown + (f" and {len(items) - 4} more" if len(items) > 4 else "")


def convert_state_dict(state_dict: Mapping[str, Any], kind: str, model_cfg: Mapping[str, Any],
                       num_classes: int | None = None) -> dict:
    """timm-named state_dict {key: array} -> pure-dict Params of our DMAE or Classifier.

    `kind` is "dmae" or "classifier"; `model_cfg` is a `model` config (see
    `dmae_jax.models`); `num_classes` is needed for a classifier and inferred from
    `head.weight` when None. Raises ConvertError naming the key and both shapes on any
    mismatch.
    """
    if kind not in KINDS:
        raise ConvertError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    state_dict = {k[len("module."):] if k.startswith("module.") else k: np.asarray(v, np.float32)
                  for k, v in state_dict.items()}
    cfg = resolve_model_config(model_cfg)
    if kind == "classifier" and num_classes is None:
        if "head.weight" not in state_dict:
            raise ConvertError("missing key 'head.weight' (needed to infer num_classes)")
        num_classes = int(state_dict["head.weight"].shape[0])

    expected = {path: leaf for path, leaf in _flat(_abstract_params(kind, cfg, num_classes))}
    by_torch_key = {_torch_key(path): path for path in expected}
    fixed = _FIXED_EMBEDDINGS if kind == "dmae" else ()

    unknown = sorted(k for k in state_dict if k not in by_torch_key and k not in fixed)
    missing = sorted(k for k in list(by_torch_key) + list(fixed) if k not in state_dict)
    converted: dict[tuple, np.ndarray] = {}
    mismatched = []
    for key, value in state_dict.items():  # checkpoint order: errors name the first keys
        if key not in by_torch_key:
            continue
        path = by_torch_key[key]
        want = _torch_shape(str(path[-1]), expected[path].shape)
        if key == "pos_embed" and value.shape != want and len(value.shape) == 3 \
                and value.shape[2] == want[2]:
            value = _resize_pos_embed(value, _grid_of(key, want))
        if value.shape != want:
            mismatched.append(f"{key!r}: checkpoint {tuple(value.shape)}, model {want}")
            continue
        converted[path] = _to_flax(str(path[-1]), value)

    if mismatched:
        raise ConvertError(
            f"shape mismatch ({cfg['variant']} {kind}, img_size {cfg['img_size']}, patch_size "
            f"{cfg['patch_size']}): {_list_keys(mismatched)}"
        )
    if missing:
        shapes = [f"{k!r} (model {_expected_torch_shape(k, by_torch_key, expected)})"
                  for k in missing]
        raise ConvertError(f"missing key(s) in the checkpoint: {_list_keys(shapes)}")
    if unknown:
        shapes = [f"{k!r} {tuple(state_dict[k].shape)}" for k in unknown]
        raise ConvertError(
            f"unknown key(s) for a {cfg['variant']} {kind} (depth {cfg['depth']}): "
            f"{_list_keys(shapes)}"
        )
    for key in fixed:
        _check_sincos(key, state_dict[key])
    return _nest(converted)


def _expected_torch_shape(key: str, by_torch_key: dict, expected: dict) -> str:
    if key not in by_torch_key:
        return "(1, 1 + g*g, D), fixed sin-cos"
    path = by_torch_key[key]
    return str(_torch_shape(str(path[-1]), expected[path].shape))


def _flat(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _decoder_layout(state_dict: Mapping[str, Any]) -> dict:
    """decoder_width / decoder_depth as stored in a DMAE state_dict (defaults when absent)."""
    layout = {}
    if "decoder_embed.weight" in state_dict:
        layout["decoder_width"] = int(state_dict["decoder_embed.weight"].shape[0])
    depths = [int(m.group(1)) for k in state_dict
              if (m := re.match(r"decoder_blocks\.(\d+)\.", k))]
    if depths:
        layout["decoder_depth"] = max(depths) + 1
    return layout


def _parse_args(argv: Sequence[str] | None):
    parser = errors.ArgumentParser(
        prog="python -m dmae_jax.convert",
        description="Import an official PyTorch DMAE or fine-tuned ViT checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="the .pth file")
    parser.add_argument("--model", required=True, choices=sorted(architectures.VARIANTS),
                        help="ViT variant of the checkpoint")
    parser.add_argument("--out", required=True, help="directory for the parameter export")
    parser.add_argument("--img_size", type=int, default=224,
                        help="image size of the converted model (pos embeds are resized)")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--num_classes", type=int, default=None,
                        help="classifier only; inferred from head.weight when omitted")
    parser.add_argument("--normalization", default="imagenet",
                        choices=sorted(architectures.NORMALIZATIONS))
    parser.add_argument("--decoder_heads", type=int, default=16)
    parser.add_argument("--norm_pix_loss", default="true", choices=["true", "false"],
                        help="DMAE only: false for pixel-target checkpoints (the visualiser)")
    return parser.parse_args(argv)


def save_export(out: str, params: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """`exports.save` to `--out`; a path that cannot be written is one line naming it."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out={out} is a file, not a directory")
    try:
        exports.save(out, params, meta)
    except OSError as e:
        if errors.one_line(e) is not None:
            raise  # a full disk says so itself
        raise ConfigError(f"--out={out}: cannot write the export there ({e.strerror or e})") \
            from e


@errors.reporting
def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; a bad input is one `error:` line and exit status 2."""
    args = _parse_args(argv)
    state_dict = read_checkpoint(args.checkpoint)
    kind = detect_kind(state_dict)
    model_cfg = {
        "variant": args.model, "img_size": args.img_size, "patch_size": args.patch_size,
        "decoder_heads": args.decoder_heads, "norm_pix_loss": args.norm_pix_loss == "true",
        "normalization": args.normalization,
        # A classifier pooled with its cls token keeps timm's `norm` instead of `fc_norm`.
        "global_pool": kind == "dmae" or "norm.weight" not in state_dict,
    }
    if kind == "dmae":
        model_cfg.update(_decoder_layout(state_dict))
    try:
        resolve_model_config(model_cfg)
    except ConfigError as e:  # the model names its fields model.x; here they are flags
        raise ConfigError(f"{e} (--img_size, --patch_size, --decoder_heads or the "
                          "checkpoint's decoder)") from None
    params = convert_state_dict(state_dict, kind, model_cfg, args.num_classes)
    num_classes = (int(params["head"]["kernel"].shape[1]) if kind == "classifier" else None)
    meta = {"kind": kind, "model": resolve_model_config(model_cfg),
            "num_classes": num_classes, "source": os.path.abspath(args.checkpoint)}
    save_export(args.out, params, meta)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"converted {kind} ({args.model}, {total / 1e6:.2f}M params) from "
          f"{args.checkpoint} to {args.out}")


if __name__ == "__main__":
    main()
