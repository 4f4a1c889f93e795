"""The Flax ADM UNet and its checkpoint importer agree with a PyTorch ADM UNet.

Tiny configurations that still use every feature of the two official checkpoints:
attention at some resolutions, scale-shift norm, resblock up/down on and off, num_heads and
num_head_channels, learned variance, and both qkv channel orders.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dmae_jax import exports
from dmae_jax.architectures import UNET_PRESETS, UNetConfig
from dmae_jax.diffusion import convert
from dmae_jax.models import unet as unet_lib
from dmae_jax.models.unet import UNet, timestep_embedding
from tests.helpers import set_params
from tests.torch_unet import TorchUNet, sinusoidal

IMPROVED = UNetConfig(  # improved-diffusion CIFAR-10 style: num_heads, conv resampling.
    image_size=8, in_channels=3, model_channels=32, num_res_blocks=2, channel_mult=(1, 2),
    attention_ds=(2,), dropout=0.3, num_heads=2, use_scale_shift_norm=True,
    resblock_updown=False, learn_sigma=True, attention_order="legacy",
)
GUIDED = UNetConfig(  # guided-diffusion ImageNet style: head channels, resblock up/down.
    image_size=16, in_channels=3, model_channels=32, num_res_blocks=1, channel_mult=(1, 1, 2),
    attention_ds=(2, 4), num_head_channels=16, use_scale_shift_norm=True,
    resblock_updown=True, learn_sigma=True, attention_order="legacy",
)
VARIANT = UNetConfig(  # the options neither checkpoint uses: plain emb add, new qkv order.
    image_size=8, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
    attention_ds=(1,), num_heads=4, use_scale_shift_norm=False, resblock_updown=False,
    learn_sigma=False, attention_order="new",
)
CONFIGS = {"improved": IMPROVED, "guided": GUIDED, "variant": VARIANT}


def torch_unet(cfg: UNetConfig, seed: int = 0) -> TorchUNet:
    """A PyTorch UNet of `cfg` with random, non-zero weights everywhere (eval mode)."""
    torch.manual_seed(seed)
    model = TorchUNet(
        in_channels=cfg.in_channels, model_channels=cfg.model_channels,
        num_res_blocks=cfg.num_res_blocks, channel_mult=cfg.channel_mult,
        attention_ds=cfg.attention_ds, heads=cfg.num_heads,
        heads_channels=cfg.num_head_channels, dropout=cfg.dropout,
        scale_shift=cfg.use_scale_shift_norm, updown=cfg.resblock_updown,
        learn_sigma=cfg.learn_sigma, legacy_attention=cfg.attention_order == "legacy",
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                fan_in = math.prod(p.shape[1:])
                p.normal_(0.0, 1.0 / math.sqrt(fan_in))
            elif "norm" in name or name.endswith(("layers.0.weight", "out.0.weight")):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def flax_unet(cfg: UNetConfig, state_dict, dtype=jnp.float32) -> UNet:
    # Built abstractly: every parameter comes from the checkpoint, none is initialised.
    unet = nnx.eval_shape(lambda: UNet(cfg, dtype=dtype, rngs=nnx.Rngs(1)))
    set_params(unet, convert.convert_unet_state_dict(state_dict, cfg))
    return unet


@jax.jit
def _forward(graphdef, params, x, t, rng):
    return nnx.merge(graphdef, params)(x, t, rng=rng)


def run(unet: UNet, x, t, rng=None) -> jax.Array:
    """unet(x, t, rng=rng), compiled once per configuration (eager dispatch is slow)."""
    graphdef, params = nnx.split(unet)
    return _forward(graphdef, params, jnp.asarray(x), jnp.asarray(t), rng)


def inputs(cfg: UNetConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, cfg.image_size, cfg.image_size, cfg.in_channels)).astype(np.float32)
    t = np.array([3.0, 517.25], np.float32)  # fractional, as rescaled timesteps are
    return x, t


def torch_forward(model: TorchUNet, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t))
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_weights_reproduce_pytorch_outputs(name):
    cfg = CONFIGS[name]
    model = torch_unet(cfg)
    x, t = inputs(cfg)
    expected = torch_forward(model, x, t)
    got = np.asarray(run(flax_unet(cfg, model.state_dict()), x, t))
    assert got.shape == expected.shape == x.shape[:3] + (cfg.out_channels,)
    assert expected.std() > 0.1  # the comparison is not between two near-zero tensors
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_every_checkpoint_key_becomes_exactly_one_parameter():
    for cfg in CONFIGS.values():
        sd = torch_unet(cfg).state_dict()
        shapes = convert.expected_param_shapes(cfg)
        assert sorted(convert.torch_key(p) for p in shapes) == sorted(sd)


def test_attention_order_matters_with_several_heads():
    legacy = dataclasses.replace(VARIANT, attention_order="legacy")
    model = torch_unet(VARIANT)
    x, t = inputs(VARIANT)
    new_out = run(flax_unet(VARIANT, model.state_dict()), x, t)
    legacy_out = run(flax_unet(legacy, model.state_dict()), x, t)
    assert float(jnp.abs(new_out - legacy_out).max()) > 1e-2


def test_timestep_embedding_matches_pytorch_including_odd_width():
    t = np.array([0.0, 1.5, 999.0], np.float32)
    for dim in (32, 33):
        np.testing.assert_allclose(
            np.asarray(timestep_embedding(jnp.asarray(t), dim)),
            sinusoidal(torch.from_numpy(t), dim).numpy(),
            atol=1e-5,  # float32 exp differs by an ulp between libraries
        )


def test_missing_key_is_an_error_naming_it():
    sd = torch_unet(IMPROVED).state_dict()
    del sd["input_blocks.4.1.qkv.weight"]
    with pytest.raises(convert.ConversionError, match=r"input_blocks\.4\.1\.qkv\.weight"):
        convert.convert_unet_state_dict(sd, IMPROVED)


def test_unknown_key_is_an_error_naming_it():
    sd = torch_unet(IMPROVED).state_dict()
    sd["label_emb.weight"] = torch.zeros(10, 128)
    with pytest.raises(convert.ConversionError, match=r"label_emb\.weight \(10, 128\)"):
        convert.convert_unet_state_dict(sd, IMPROVED)


def test_shape_mismatch_names_the_key_and_both_shapes():
    sd = torch_unet(IMPROVED).state_dict()
    sd["out.2.weight"] = torch.zeros(3, 32, 3, 3)  # learn_sigma wants 6 output channels
    shapes = r"out\.2\.weight.*\(3, 3, 32, 3\).*\(3, 3, 32, 6\)"
    with pytest.raises(convert.ConversionError, match=shapes):
        convert.convert_unet_state_dict(sd, IMPROVED)


def test_wrong_preset_fails_loudly():
    with pytest.raises(convert.ConversionError, match="missing|shape mismatch|does not use"):
        convert.convert_unet_state_dict(torch_unet(IMPROVED).state_dict(), GUIDED)


def test_cli_writes_an_export_that_reproduces_pytorch(tmp_path):
    cfg = UNET_PRESETS["digits"]
    model = torch_unet(cfg)
    ckpt = tmp_path / "digits.pt"
    torch.save(model.state_dict(), ckpt)
    convert.main([f"--checkpoint={ckpt}", "--preset=digits", f"--out={tmp_path / 'export'}"])
    _, meta = exports.load(tmp_path / "export")
    assert meta == {"kind": "unet", "preset": "digits", "config": cfg.to_dict()}
    parts, _, _ = unet_lib.from_export(str(tmp_path / "export"), field="export")
    unet = parts.bind(jax.tree.map(jnp.asarray, parts.params))
    x, t = inputs(cfg)
    np.testing.assert_allclose(
        np.asarray(run(unet, x, t)), torch_forward(model, x, t), atol=1e-4
    )


def test_cli_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        convert.main([f"--checkpoint={bad}", "--preset=digits", f"--out={tmp_path / 'o'}"])
    message = capsys.readouterr().err
    assert e.value.code == 2 and message.startswith("error:")
    assert "not a PyTorch checkpoint" in message and message.count("\n") == 1


def test_cli_rejects_a_checkpoint_that_is_not_a_state_dict(tmp_path, capsys):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(SystemExit):
        convert.main([f"--checkpoint={path}", "--preset=digits", f"--out={tmp_path / 'o'}"])
    assert "expected a UNet state_dict" in capsys.readouterr().err


def test_dropout_only_with_an_rng():
    model = flax_unet(IMPROVED, torch_unet(IMPROVED).state_dict())
    x, t = inputs(IMPROVED)
    plain = run(model, x, t)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(run(model, x, t)))
    a = run(model, x, t, rng=jax.random.key(0))
    b = run(model, x, t, rng=jax.random.key(1))
    assert float(jnp.abs(a - plain).max()) > 1e-3
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
    sd = torch_unet(GUIDED).state_dict()
    x, t = inputs(GUIDED)
    ref = run(flax_unet(GUIDED, sd), x, t)
    bf16 = flax_unet(GUIDED, sd, dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    out = run(bf16, x, t)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_presets_have_the_published_sizes():
    def count(cfg):
        abstract = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
        return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

    # improved-diffusion's CIFAR-10 model is the "50M"; guided-diffusion's 256px is ~552M.
    assert 50e6 < count(UNET_PRESETS["cifar10_uncond_50M_500K"]) < 55e6
    assert 550e6 < count(UNET_PRESETS["256x256_diffusion_uncond"]) < 556e6


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="attention_order"):
        UNet(dataclasses.replace(IMPROVED, attention_order="flash"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="GroupNorm32"):
        UNet(dataclasses.replace(IMPROVED, model_channels=48), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiples of 2"):
        UNet(IMPROVED, rngs=nnx.Rngs(0))(jnp.zeros((1, 7, 7, 3)), jnp.zeros((1,)))
