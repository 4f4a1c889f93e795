"""Specification of the Flax models: embeddings, masking, loss, dtypes, randomness, configs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmae_jax import architectures
from dmae_jax.models import (
    count_params,
    create_classifier,
    create_dmae,
    init_from_dmae,
    resolve_model_config,
    vit,
)
from dmae_jax.models import dmae as dmae_lib
from tests.torch_dmae import sincos_2d

TINY = {
    "variant": "mu", "width": 32, "depth": 2, "num_heads": 4, "img_size": 16,
    "patch_size": 4, "decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2,
}


@functools.partial(nnx.jit, static_argnames=("sigma", "mask_ratio"))
def dmae_forward(model, images, *, sigma, mask_ratio, rng=None, noise=None, ids_shuffle=None):
    """The DMAE forward, jitted: one compilation per model shape instead of eager op-by-op."""
    return model(images, sigma=sigma, mask_ratio=mask_ratio, rng=rng, noise=noise,
                 ids_shuffle=ids_shuffle)


@nnx.jit
def classify(model, images, rng=None):
    """The classifier forward, jitted."""
    return model(images, rng=rng)


def _images(batch: int = 2, size: int = 16, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3))


@pytest.fixture(scope="module")
def tiny_dmae():
    return create_dmae(TINY, rngs=nnx.Rngs(0))


def test_variants_have_the_paper_sizes():
    assert architectures.get_variant("base") == {"width": 768, "depth": 12, "num_heads": 12}
    assert architectures.get_variant("large") == {"width": 1024, "depth": 24, "num_heads": 16}
    assert architectures.get_variant("huge") == {"width": 1280, "depth": 32, "num_heads": 16}
    assert architectures.get_variant("mu") == {"width": 128, "depth": 4, "num_heads": 4}


def test_sincos_first_half_encodes_the_column_and_cls_row_is_zero():
    g, d = 5, 16
    emb = vit.sincos_2d_posemb(g, d)
    assert emb.shape == (1 + g * g, d) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb[0], 0.0)
    grid = emb[1:].reshape(g, g, d)  # [row, col, d]
    # First half: constant down a column (depends on the column only), second half on the row.
    np.testing.assert_array_equal(grid[:, :, : d // 2], np.broadcast_to(grid[:1, :, : d // 2],
                                                                        (g, g, d // 2)))
    np.testing.assert_array_equal(grid[:, :, d // 2:], np.broadcast_to(grid[:, :1, d // 2:],
                                                                       (g, g, d // 2)))
    # Each half is [sin(pos * omega), cos(pos * omega)] with omega_0 = 1.
    np.testing.assert_allclose(grid[0, 3, 0], np.sin(3.0), rtol=1e-6)
    np.testing.assert_allclose(grid[2, 0, d // 2 + d // 4], np.cos(2.0), rtol=1e-6)
    # Same as the official meshgrid(grid_w, grid_h) formulation (reference copy in torch_dmae).
    np.testing.assert_allclose(emb, sincos_2d(g, d), atol=1e-7)


def test_random_masking_keeps_the_right_count_and_ids_restore_inverts():
    b, length, d = 3, 16, 5
    x = jax.random.normal(jax.random.key(0), (b, length, d))
    ids_shuffle = dmae_lib.sample_ids_shuffle(jax.random.key(1), b, length)
    len_keep = architectures.num_kept(length, 0.75)
    assert len_keep == 4
    kept, mask, ids_restore = dmae_lib.random_masking(x, ids_shuffle, len_keep)
    assert kept.shape == (b, len_keep, d)
    np.testing.assert_array_equal(mask.sum(axis=1), length - len_keep)
    # Unshuffling the shuffled sequence gives the original order back.
    shuffled = jnp.take_along_axis(x, ids_shuffle[:, :, None], axis=1)
    np.testing.assert_array_equal(
        jnp.take_along_axis(shuffled, ids_restore[:, :, None], axis=1), x)
    # The kept tokens are exactly the unmasked ones.
    for i in range(b):
        np.testing.assert_array_equal(
            np.sort(np.asarray(ids_shuffle[i, :len_keep])), np.flatnonzero(mask[i] == 0))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 0.99])
def test_mask_ratio_outside_range_or_keeping_nothing_is_rejected(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        architectures.num_kept(16, ratio)


def test_patchify_uses_p_q_c_order_and_unpatchify_inverts():
    images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    patches = dmae_lib.patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is row 0, column 1; inside it, element (p=1, q=2, c=0) sits at (1*4 + 2)*3 + 0.
    assert patches[0, 1, (1 * 4 + 2) * 3] == images[0, 1, 4 + 2, 0]
    np.testing.assert_array_equal(dmae_lib.unpatchify(patches, 4, 3), images)


def test_loss_is_mse_on_all_patches_against_the_clean_target(tiny_dmae):
    images = _images()
    noise = jax.random.normal(jax.random.key(5), images.shape)
    out = dmae_forward(tiny_dmae, images, sigma=0.5, mask_ratio=0.75, noise=noise,
                       rng=jax.random.key(6))
    mean, std = np.array(architectures.IMAGENET_MEAN), np.array(architectures.IMAGENET_STD)
    target = np.asarray(dmae_lib.patchify((np.asarray(images) - mean) / std, 4))
    mu = target.mean(-1, keepdims=True)
    var = target.var(-1, ddof=1, keepdims=True)  # unbiased, as torch.var
    manual = np.mean((np.asarray(out.pred, np.float64) - (target - mu) / np.sqrt(var + 1e-6)) ** 2)
    np.testing.assert_allclose(float(out.loss), manual, rtol=1e-5)
    assert out.mask.shape == (2, 16) and float(out.mask.sum()) == 2 * 12
    # Without norm_pix_loss the target is the normalised clean patch itself.
    pixel_loss = dmae_lib.reconstruction_loss(out.pred, target, norm_pix_loss=False)
    np.testing.assert_allclose(float(pixel_loss), np.mean((np.asarray(out.pred) - target) ** 2),
                               rtol=1e-5)


def test_noise_and_mask_come_from_rng_and_are_reproducible(tiny_dmae):
    images = _images()
    a = dmae_forward(tiny_dmae, images, sigma=0.25, mask_ratio=0.75, rng=jax.random.key(0))
    b = dmae_forward(tiny_dmae, images, sigma=0.25, mask_ratio=0.75, rng=jax.random.key(0))
    c = dmae_forward(tiny_dmae, images, sigma=0.25, mask_ratio=0.75, rng=jax.random.key(1))
    np.testing.assert_array_equal(a.pred, b.pred)
    assert not np.array_equal(a.mask, c.mask)


def test_dmae_without_rng_needs_explicit_noise_and_mask(tiny_dmae):
    images = _images()
    with pytest.raises(ValueError, match="rng"):
        dmae_forward(tiny_dmae, images, sigma=0.25, mask_ratio=0.0)
    with pytest.raises(ValueError, match="rng"):
        dmae_forward(tiny_dmae, images, sigma=0.0, mask_ratio=0.75)
    # Deterministic: no noise, no mask.
    out = dmae_forward(tiny_dmae, images, sigma=0.0, mask_ratio=0.0)
    np.testing.assert_array_equal(out.mask, 0.0)
    with pytest.raises(ValueError, match="sigma must be >= 0, got -0.1"):
        dmae_forward(tiny_dmae, images, sigma=-0.1, mask_ratio=0.0)


def test_unmasked_order_does_not_change_the_prediction(tiny_dmae):
    """Attention is permutation-equivariant and positions are added before shuffling."""
    images = _images()
    ids = jax.random.permutation(jax.random.key(3), 16)[None].repeat(2, axis=0)
    shuffled = dmae_forward(tiny_dmae, images, sigma=0.0, mask_ratio=0.0, ids_shuffle=ids)
    plain = dmae_forward(tiny_dmae, images, sigma=0.0, mask_ratio=0.0)
    np.testing.assert_allclose(shuffled.pred, plain.pred, atol=1e-5)


def test_reconstruct_returns_images_in_unit_range(tiny_dmae):
    images = _images()
    recon = nnx.jit(lambda m, x: m.reconstruct(x))(tiny_dmae, images)
    assert recon.shape == images.shape
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0
    pred = dmae_forward(tiny_dmae, images, sigma=0.0, mask_ratio=0.0).pred
    to_images = nnx.jit(lambda m, p, x: m.pred_to_images(p, x))
    np.testing.assert_allclose(to_images(tiny_dmae, pred, images), recon, atol=1e-6)


def test_fixed_embeddings_are_not_params_but_classifier_pos_embed_is(tiny_dmae):
    params = nnx.state(tiny_dmae, nnx.Param).to_pure_dict()
    assert "pos_embed" not in params and "decoder_pos_embed" not in params
    assert isinstance(tiny_dmae.pos_embed, vit.FixedEmbedding)
    clf = create_classifier(TINY, 10, rngs=nnx.Rngs(0))
    assert "pos_embed" in nnx.state(clf, nnx.Param).to_pure_dict()


def test_parameter_paths_mirror_timm_names(tiny_dmae):
    paths = {tuple(getattr(k, "key", k) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(
                 nnx.state(tiny_dmae, nnx.Param).to_pure_dict())[0]}
    for path in [("blocks", 1, "attn", "qkv", "kernel"), ("blocks", 0, "mlp", "fc2", "bias"),
                 ("patch_embed", "proj", "kernel"), ("decoder_blocks", 0, "norm1", "scale"),
                 ("cls_token",), ("mask_token",), ("decoder_pred", "kernel"), ("norm", "bias")]:
        assert path in paths, path
    clf = nnx.state(create_classifier(TINY, 10, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    assert {"fc_norm", "head", "pos_embed"} <= set(clf) and "norm" not in clf


def test_bfloat16_computes_in_bf16_with_fp32_params_and_outputs(tiny_dmae):
    model = create_dmae(dict(TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(x.dtype == jnp.float32 for x in leaves)
    out = dmae_forward(model, _images(), sigma=0.25, mask_ratio=0.75, rng=jax.random.key(0))
    assert out.loss.dtype == jnp.float32 and out.pred.dtype == jnp.float32
    assert np.isfinite(float(out.loss))
    ref = dmae_forward(tiny_dmae, _images(), sigma=0.25, mask_ratio=0.75,
                       rng=jax.random.key(0))
    np.testing.assert_allclose(out.loss, ref.loss, rtol=0.05)
    clf = create_classifier(dict(TINY, dtype="bfloat16"), 10, rngs=nnx.Rngs(0))
    assert classify(clf, _images()).dtype == jnp.float32


def test_drop_path_is_active_only_with_an_rng():
    clf = create_classifier(dict(TINY, drop_path_rate=0.5), 10, rngs=nnx.Rngs(0))
    # A visible head, so that dropped paths change the logits measurably.
    clf.head.kernel.value = jax.random.normal(jax.random.key(0), clf.head.kernel.shape)
    images = _images(batch=8)
    np.testing.assert_array_equal(classify(clf, images), classify(clf, images))
    a = classify(clf, images, jax.random.key(1))
    np.testing.assert_array_equal(a, classify(clf, images, jax.random.key(1)))
    assert not np.allclose(a, classify(clf, images), atol=1e-4)
    no_drop = create_classifier(TINY, 10, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(classify(no_drop, images, jax.random.key(1)),
                                  classify(no_drop, images))


def test_split_merge_under_plain_jit_and_remat_give_the_same_gradient():
    images = _images()
    grads = []
    for remat in (False, True):
        model = create_dmae(dict(TINY, depth=1, remat=remat), rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        @jax.jit
        def grad(params, rest, images, rng, graphdef=graphdef):
            def loss(params):
                model = nnx.merge(graphdef, params, rest)
                return model(images, sigma=0.25, mask_ratio=0.75, rng=rng).loss
            return jax.grad(loss)(params)

        grads.append(grad(params, rest, images, jax.random.key(0)))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_init_from_dmae_copies_the_encoder_and_keeps_a_fresh_head(tiny_dmae):
    params = nnx.state(tiny_dmae, nnx.Param).to_pure_dict()
    clf = create_classifier(TINY, 10, rngs=nnx.Rngs(1))
    head_before = np.asarray(clf.head.kernel.value)
    init_from_dmae(clf, params)
    np.testing.assert_array_equal(clf.blocks[1].attn.qkv.kernel.value,
                                  params["blocks"][1]["attn"]["qkv"]["kernel"])
    np.testing.assert_array_equal(clf.cls_token.value, params["cls_token"])
    np.testing.assert_array_equal(clf.pos_embed.value, tiny_dmae.pos_embed.value)
    np.testing.assert_array_equal(clf.head.kernel.value, head_before)
    assert float(np.abs(head_before).max()) < 1e-3  # trunc_normal(std=2e-5)
    np.testing.assert_array_equal(clf.head.bias.value, 0.0)


def test_init_from_dmae_interpolates_pos_embed_to_a_new_grid(tiny_dmae):
    params = dict(nnx.state(tiny_dmae, nnx.Param).to_pure_dict(),
                  pos_embed=tiny_dmae.pos_embed.value)
    clf = create_classifier(dict(TINY, img_size=24), 10, rngs=nnx.Rngs(1))
    init_from_dmae(clf, params)
    assert clf.pos_embed.value.shape == (1, 1 + 36, 32)
    np.testing.assert_array_equal(clf.pos_embed.value[0, 0], 0.0)
    with pytest.raises(ValueError, match="blocks"):
        init_from_dmae(create_classifier(dict(TINY, depth=3), 10, rngs=nnx.Rngs(1)), params)


def test_loaded_params_are_checked_entry_by_entry_against_the_model(tiny_dmae):
    from dmae_jax.models import ModelParts

    params = nnx.state(tiny_dmae, nnx.Param).to_pure_dict()
    parts = ModelParts.split(create_dmae(TINY, rngs=nnx.Rngs(3)))
    loaded = parts.with_params(params, where="export")
    np.testing.assert_array_equal(loaded.bind(loaded.params).mask_token.value,
                                  tiny_dmae.mask_token.value)
    bad = dict(params, cls_token=np.zeros((1, 1, 8), np.float32))
    with pytest.raises(ValueError, match=r"export: cls_token has shape \(1, 1, 8\).*\(1, 1, 32\)"):
        parts.with_params(bad, where="export")
    with pytest.raises(ValueError, match="missing.*mask_token"):
        parts.with_params({k: v for k, v in params.items() if k != "mask_token"}, where="export")
    with pytest.raises(ValueError, match="unexpected.*decoder_extra"):
        parts.with_params(dict(params, decoder_extra=np.zeros(3)), where="export")


@pytest.mark.parametrize("field, value, message", [
    ("variant", "gigantic", r"model.variant must be one of .*'base'.*got 'gigantic'"),
    ("img_size", 18, r"model.img_size must be divisible by model.patch_size \(4\), got 18"),
    ("dtype", "float16", r"model.dtype must be one of \['bfloat16', 'float32'\], got 'float16'"),
    ("normalization", "mnist", r"model.normalization must be one of .*got 'mnist'"),
    ("drop_path_rate", 1.5, r"model.drop_path_rate must be in \[0, 1\), got 1.5"),
    ("num_heads", 5, r"model.width must be divisible by 4 .* by model.num_heads \(5\), got 32"),
])
def test_create_rejects_bad_model_configs_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        create_dmae(dict(TINY, **{field: value}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        create_classifier(dict(TINY, **{field: value}), 10, rngs=nnx.Rngs(0))


def test_config_fields_default_and_variant_overrides():
    cfg = resolve_model_config({"variant": "base", "img_size": 224, "patch_size": 16})
    assert (cfg["width"], cfg["depth"], cfg["decoder_width"], cfg["dtype"]) == \
        (768, 12, 512, "float32")
    assert resolve_model_config(TINY)["width"] == 32
    with pytest.raises(ValueError, match="model.img_size is required"):
        resolve_model_config({"variant": "base", "patch_size": 16})


def test_parameter_count_of_the_mu_variant_is_small():
    model = nnx.eval_shape(lambda: create_dmae(
        {"variant": "mu", "img_size": 32, "patch_size": 4, "decoder_width": 128,
         "decoder_depth": 2, "decoder_heads": 4}, rngs=nnx.Rngs(0)))
    assert 0.5e6 < count_params(model, nnx.Param) < 2e6
