"""The importer: PyTorch (official architecture, timm names) -> Flax gives the same outputs."""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dmae_jax import architectures, convert, exports, pth
from dmae_jax.models import (
    count_params,
    create_classifier,
    create_dmae,
    init_from_dmae,
    vit,
)
from tests.helpers import set_params
from tests.torch_dmae import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    TorchDMAE,
    TorchViTClassifier,
    count_parameters,
    randomize_,
)

TOL = 1e-4
CFG = {
    "variant": "mu", "width": 64, "depth": 2, "num_heads": 4, "img_size": 32, "patch_size": 8,
    "decoder_width": 32, "decoder_depth": 2, "decoder_heads": 4,
}
TORCH_ARCH = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}
TORCH_DECODER = {"decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 4}


@functools.partial(nnx.jit, static_argnames=("sigma", "mask_ratio"))
def dmae_forward(model, images, noise, ids_shuffle, *, sigma, mask_ratio):
    """Jitted DMAE forward with explicit noise and patch order."""
    return model(images, sigma=sigma, mask_ratio=mask_ratio, noise=noise,
                 ids_shuffle=ids_shuffle)


@nnx.jit
def classify(model, images):
    """Jitted (features, logits) of a classifier."""
    return model.features(images), model(images)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def torch_dmae(seed: int = 0, **kwargs) -> TorchDMAE:
    return randomize_(TorchDMAE(**{**TORCH_ARCH, **TORCH_DECODER, **kwargs}), seed).eval()


def torch_classifier(seed: int = 1, **kwargs) -> TorchViTClassifier:
    return randomize_(TorchViTClassifier(**{**TORCH_ARCH, "num_classes": 10, **kwargs}),
                      seed).eval()


def flax_dmae(state_dict, cfg=CFG):
    model = create_dmae(cfg, rngs=nnx.Rngs(0))
    set_params(model, convert.convert_state_dict(state_dict, "dmae", cfg))
    return model


@pytest.fixture(scope="module")
def dmae_pair():
    reference = torch_dmae()
    return reference, flax_dmae(reference.state_dict())


@pytest.fixture(scope="module")
def batch():
    rs = np.random.RandomState(0)
    images = rs.rand(3, 32, 32, 3).astype(np.float32)
    noise = rs.randn(3, 32, 32, 3).astype(np.float32)
    ids_shuffle = np.stack([rs.permutation(16) for _ in range(3)]).astype(np.int32)
    return images, noise, ids_shuffle


# ------------------------------------------------------------------ Parity with PyTorch.


def test_dmae_reconstruction_matches_pytorch_without_noise_or_mask(dmae_pair, batch):
    reference, model = dmae_pair
    images, noise, _ = batch
    identity = np.tile(np.arange(16, dtype=np.int32), (3, 1))
    with torch.no_grad():
        loss, pred, _ = reference(nchw(images), mask_ratio=0.0, sigma=0.0,
                                  noise=nchw(noise), ids_shuffle=torch.from_numpy(identity))
    out = dmae_forward(model, images, noise, identity, sigma=0.0, mask_ratio=0.0)
    assert max_diff(out.pred, pred) <= TOL
    assert abs(float(out.loss) - loss.item()) <= TOL


def test_dmae_matches_pytorch_with_the_same_noise_and_mask(dmae_pair, batch):
    reference, model = dmae_pair
    images, noise, ids_shuffle = batch
    with torch.no_grad():
        loss, pred, mask = reference(nchw(images), mask_ratio=0.75, sigma=0.25,
                                     noise=nchw(noise), ids_shuffle=torch.from_numpy(ids_shuffle))
        mean = torch.tensor(architectures.IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(architectures.IMAGENET_STD)[:, None, None]
        x = (nchw(images + 0.25 * noise) - mean) / std
        latent, _, _ = reference.forward_encoder(x, 0.75, torch.from_numpy(ids_shuffle))
    out = dmae_forward(model, images, noise, ids_shuffle, sigma=0.25, mask_ratio=0.75)
    assert max_diff(out.pred, pred) <= TOL
    np.testing.assert_array_equal(out.mask, mask.numpy())
    assert abs(float(out.loss) - loss.item()) <= TOL

    encode = nnx.jit(lambda m, x, ids: m.forward_encoder(m.preprocess(x), ids, 4)[0])
    assert max_diff(encode(model, images + 0.25 * noise, ids_shuffle), latent) <= TOL


def test_dmae_upsamples_after_the_noise_like_pytorch():
    """CIFAR-style: noise at the input size, then bicubic to img_size, CIFAR-10 statistics."""
    reference = torch_dmae(seed=3, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    model = flax_dmae(reference.state_dict(), dict(CFG, normalization="cifar10"))
    rs = np.random.RandomState(1)
    images = rs.rand(2, 16, 16, 3).astype(np.float32)
    noise = rs.randn(2, 16, 16, 3).astype(np.float32)
    ids_shuffle = np.stack([rs.permutation(16) for _ in range(2)]).astype(np.int32)
    with torch.no_grad():
        loss, pred, _ = reference(nchw(images), mask_ratio=0.75, sigma=0.5, noise=nchw(noise),
                                  ids_shuffle=torch.from_numpy(ids_shuffle))
    out = dmae_forward(model, images, noise, ids_shuffle, sigma=0.5, mask_ratio=0.75)
    assert max_diff(out.pred, pred) <= TOL
    assert abs(float(out.loss) - loss.item()) <= TOL


@pytest.mark.parametrize("global_pool", [True, False])
def test_classifier_features_and_logits_match_pytorch(global_pool, batch):
    reference = torch_classifier(global_pool=global_pool)
    cfg = dict(CFG, global_pool=global_pool)
    params = convert.convert_state_dict(reference.state_dict(), "classifier", cfg)
    model = create_classifier(cfg, 10, rngs=nnx.Rngs(0))
    set_params(model, params)
    images = batch[0]
    with torch.no_grad():
        features = reference.forward_features(nchw(images))
        logits = reference(nchw(images))
    ours_features, ours_logits = classify(model, images)
    assert ours_logits.dtype == jnp.float32
    assert max_diff(ours_features, features) <= TOL
    assert max_diff(ours_logits, logits) <= TOL


def test_init_from_converted_dmae_matches_the_official_finetuning_load(dmae_pair, batch):
    """Official: load_state_dict(dmae_sd, strict=False) misses exactly fc_norm.* and head.*."""
    reference_dmae, dmae = dmae_pair
    reference = torch_classifier(seed=7)
    result = reference.load_state_dict(reference_dmae.state_dict(), strict=False)
    assert set(result.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight",
                                        "head.bias"}
    model = create_classifier(CFG, 10, rngs=nnx.Rngs(0))
    init_from_dmae(model, nnx.state(dmae, nnx.Param).to_pure_dict())
    head = convert.convert_state_dict(reference.state_dict(), "classifier", CFG)
    model.head.kernel.value = jnp.asarray(head["head"]["kernel"])
    model.head.bias.value = jnp.asarray(head["head"]["bias"])
    model.fc_norm.scale.value = jnp.asarray(head["fc_norm"]["scale"])
    model.fc_norm.bias.value = jnp.asarray(head["fc_norm"]["bias"])
    with torch.no_grad():
        logits = reference(nchw(batch[0]))
    assert max_diff(classify(model, batch[0])[1], logits) <= TOL


@pytest.mark.parametrize("variant, dmae_count, classifier_count", [
    ("base", 111_907_840, 86_567_656),
    ("large", 329_541_888, 304_326_632),
])
def test_parameter_counts_match_pytorch(variant, dmae_count, classifier_count):
    """The official models' sizes: DMAE-B 111.91M (incl. fixed pos embeds), ViT-B 86.57M;
    L: 329.54M / 304.33M."""
    arch = architectures.get_variant(variant)
    with torch.device("meta"):
        torch_counts = (
            count_parameters(TorchDMAE(embed_dim=arch["width"], depth=arch["depth"],
                                       num_heads=arch["num_heads"])),
            count_parameters(TorchViTClassifier(embed_dim=arch["width"], depth=arch["depth"],
                                                num_heads=arch["num_heads"])),
        )
    cfg = {"variant": variant, "img_size": 224, "patch_size": 16}
    ours = (
        count_params(nnx.eval_shape(lambda: create_dmae(cfg, rngs=nnx.Rngs(0)))),
        count_params(nnx.eval_shape(lambda: create_classifier(cfg, 1000, rngs=nnx.Rngs(0)))),
    )
    assert ours == torch_counts == (dmae_count, classifier_count)


def test_a_dmae_converted_for_another_image_size_gets_the_sin_cos_of_its_grid(dmae_pair):
    params = convert.convert_state_dict(dmae_pair[0].state_dict(), "dmae",
                                        dict(CFG, img_size=48))
    model = create_dmae(dict(CFG, img_size=48), rngs=nnx.Rngs(0))
    set_params(model, params)
    np.testing.assert_array_equal(model.pos_embed.value[0], vit.sincos_2d_posemb(6, 64))


# ------------------------------------------------------------------ Errors.


def test_an_unknown_key_is_an_error_naming_it(dmae_pair):
    state_dict = dict(dmae_pair[0].state_dict(), **{"blocks.0.attn.extra": torch.zeros(3)})
    with pytest.raises(convert.ConvertError, match=r"unknown key.*'blocks.0.attn.extra' \(3,\)"):
        convert.convert_state_dict(state_dict, "dmae", CFG)


def test_a_missing_key_is_an_error_naming_it_and_its_shape(dmae_pair):
    state_dict = dict(dmae_pair[0].state_dict())
    del state_dict["decoder_blocks.1.mlp.fc2.bias"]
    with pytest.raises(convert.ConvertError,
                       match=r"missing.*'decoder_blocks.1.mlp.fc2.bias' \(model \(32,\)\)"):
        convert.convert_state_dict(state_dict, "dmae", CFG)


def test_a_shape_mismatch_names_the_key_and_both_shapes(dmae_pair):
    with pytest.raises(convert.ConvertError,
                       match=r"'cls_token': checkpoint \(1, 1, 64\), model \(1, 1, 128\)"):
        convert.convert_state_dict(dmae_pair[0].state_dict(), "dmae", dict(CFG, width=128))


def test_a_dmae_pos_embed_that_is_not_sin_cos_is_rejected(dmae_pair):
    state_dict = dict(dmae_pair[0].state_dict())
    state_dict["pos_embed"] = state_dict["pos_embed"] + 0.1
    with pytest.raises(convert.ConvertError, match="'pos_embed' is not the fixed 2-D sin-cos"):
        convert.convert_state_dict(state_dict, "dmae", CFG)


def test_kind_is_detected_from_the_keys(dmae_pair):
    assert convert.detect_kind(dmae_pair[0].state_dict()) == "dmae"
    assert convert.detect_kind(torch_classifier().state_dict()) == "classifier"
    with pytest.raises(convert.ConvertError, match="neither a DMAE"):
        convert.detect_kind({"cls_token": torch.zeros(1, 1, 8)})


def test_a_training_checkpoint_is_read_without_torch_and_only_its_model_is_used(tmp_path):
    # MAE's save_model: model, optimizer state, AMP scaler, epoch and the argparse args.
    model = {"cls_token": torch.randn(1, 1, 8), "head.weight": torch.randn(3, 8)}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 0.95))
    path = tmp_path / "checkpoint-0.pth"
    torch.save({"model": model, "optimizer": optimizer.state_dict(), "epoch": 3,
                "scaler": {"scale": 65536.0, "_growth_tracker": 0},
                "args": argparse.Namespace(lr=1.0, model="mae_vit_base_patch16")}, path)
    state_dict = convert.read_checkpoint(path)
    assert sorted(state_dict) == ["cls_token", "head.weight"]
    np.testing.assert_array_equal(state_dict["cls_token"], model["cls_token"].numpy())
    assert pth.load(path)["args"].model == "mae_vit_base_patch16"


class _RunsCode:
    """Unpickling this calls os.system: what a weights-only reader must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_nothing_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = _RunsCode(marker)
    obj = payload if where == "top" else {"model": {"cls_token": torch.zeros(1, 1, 8)},
                                          "x": [payload]}
    path = tmp_path / "evil.pth"
    torch.save(obj, path)  # a genuine torch zip file whose data.pkl calls os.system
    with pytest.raises(convert.ConvertError, match=r"besides tensors.*\.system"):
        convert.read_checkpoint(path)
    with pytest.raises(pth.UnsafeCheckpointError):
        pth.load(path)
    assert not marker.exists()


def test_the_reader_without_torch_equals_torch_load_for_every_dtype_and_layout(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4), "f64": torch.randn(2, 2, dtype=torch.float64),
        "f16": torch.randn(5).half(), "bf16": torch.randn(6).bfloat16(),
        "i64": torch.arange(7), "u8": torch.arange(4, dtype=torch.uint8),
        "bool": torch.tensor([True, False]), "transposed": torch.randn(4, 3).t(),
        "slice": torch.randn(10)[2:7:2], "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
    }
    shared = torch.randn(8)
    obj = {"model": {**tensors, "view_a": shared[:4], "view_b": shared[4:]},
           "param": torch.nn.Parameter(torch.ones(2)), "epoch": 3, "names": ("a", "b")}
    path = tmp_path / "all.pth"
    torch.save(obj, path)
    ours, ref = pth.load(path), torch.load(path, weights_only=True)
    assert ours["epoch"] == 3 and ours["names"] == ("a", "b")
    for key, value in ref["model"].items():
        assert ours["model"][key].shape == tuple(value.shape), key
        np.testing.assert_array_equal(np.asarray(ours["model"][key], np.float64),
                                      value.double().numpy(), err_msg=key)
    np.testing.assert_array_equal(ours["param"], np.ones(2, np.float32))


def test_a_file_that_is_not_a_checkpoint_fails_with_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    result = subprocess.run(
        [sys.executable, "-m", "dmae_jax.convert", f"--checkpoint={path}", "--model=base",
         f"--out={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a PyTorch checkpoint" in lines[0], result.stderr


# ------------------------------------------------------------------ Command line.


def test_cli_converts_a_wrapped_dmae_checkpoint_that_then_matches_pytorch(tmp_path, batch):
    reference = randomize_(TorchDMAE(img_size=32, patch_size=8, embed_dim=128, depth=4,
                                     num_heads=4, **TORCH_DECODER), seed=5).eval()
    path = tmp_path / "dmae_mu.pth"
    torch.save({"model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    convert.main([f"--checkpoint={path}", "--model=mu", f"--out={tmp_path / 'out'}",
                  "--img_size=32", "--patch_size=8", "--decoder_heads=4"])
    params, meta = exports.load(tmp_path / "out")
    assert meta["kind"] == "dmae" and meta["num_classes"] is None
    assert meta["model"]["decoder_width"] == 32 and meta["model"]["decoder_depth"] == 2
    model = create_dmae(meta["model"], rngs=nnx.Rngs(0))
    set_params(model, params)
    images, noise, ids_shuffle = batch
    with torch.no_grad():
        _, pred, _ = reference(nchw(images), mask_ratio=0.75, sigma=0.25, noise=nchw(noise),
                               ids_shuffle=torch.from_numpy(ids_shuffle))
    out = dmae_forward(model, images, noise, ids_shuffle, sigma=0.25, mask_ratio=0.75)
    assert max_diff(out.pred, pred) <= TOL


def test_cli_resizes_a_classifier_pos_embed_to_a_new_image_size(tmp_path):
    reference = randomize_(TorchViTClassifier(img_size=32, patch_size=8, embed_dim=128,
                                              depth=4, num_heads=4, num_classes=7), seed=2)
    path = tmp_path / "vit_mu.pth"
    torch.save(reference.state_dict(), path)
    convert.main([f"--checkpoint={path}", "--model=mu", f"--out={tmp_path / 'out'}",
                  "--img_size=48", "--patch_size=8"])
    params, meta = exports.load(tmp_path / "out")
    assert meta["kind"] == "classifier" and meta["num_classes"] == 7
    assert meta["model"]["img_size"] == 48 and meta["model"]["global_pool"] is True
    old = reference.pos_embed.detach().numpy()
    assert params["pos_embed"].shape == (1, 1 + 6 * 6, 128)
    np.testing.assert_array_equal(params["pos_embed"][:, 0], old[:, 0])
    # MAE's interpolate_pos_embed: PyTorch bicubic (align_corners=False) on the 4x4 grid.
    grid = torch.from_numpy(old[:, 1:]).reshape(1, 4, 4, 128).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic",
                                           align_corners=False)
    np.testing.assert_allclose(params["pos_embed"][:, 1:],
                               grid.permute(0, 2, 3, 1).reshape(1, 36, 128).numpy(), atol=1e-5)
    np.testing.assert_allclose(params["pos_embed"], vit.interpolate_pos_embed(old, 6),
                               atol=1e-6)
    set_params(create_classifier(meta["model"], 7, rngs=nnx.Rngs(0)), params)
