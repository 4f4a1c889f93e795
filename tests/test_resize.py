"""Specification of resize_bicubic_torch: it is PyTorch's bicubic F.interpolate, in JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmae_jax.data.resize import bicubic_matrix, resize_bicubic_torch

torch = pytest.importorskip("torch")


def torch_resize(x: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """PyTorch's F.interpolate(bicubic, align_corners=False) on NHWC NumPy."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(
        t, size=size, mode="bicubic", align_corners=False, antialias=antialias
    )
    return out.permute(0, 2, 3, 1).numpy()


CASES = [
    ((32, 32), (224, 224)),  # CIFAR-10 into a 224 ViT (DMAE fine-tuning and certification)
    ((224, 224), (32, 32)),  # downsampling
    ((37, 23), (11, 50)),  # non-square, down in one axis and up in the other
    ((8, 8), (9, 7)),
]


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("in_size,out_size", CASES)
def test_matches_torch_interpolate_bicubic(in_size, out_size, antialias):
    x = np.random.default_rng(0).random((2, *in_size, 3), dtype=np.float32)
    resize = jax.jit(resize_bicubic_torch, static_argnums=(1, 2))
    ours = np.asarray(resize(jnp.asarray(x), out_size, antialias))
    np.testing.assert_allclose(ours, torch_resize(x, out_size, antialias), rtol=0, atol=1e-5)


def test_overshoots_like_torch_instead_of_clipping():
    x = np.zeros((1, 8, 8, 1), np.float32)
    x[:, :, 4:] = 1.0  # a sharp edge rings under cubic interpolation with A = -0.75
    ours = np.asarray(resize_bicubic_torch(jnp.asarray(x), (32, 32)))
    assert ours.min() < -0.05 and ours.max() > 1.05
    np.testing.assert_allclose(ours, torch_resize(x, (32, 32), False), atol=1e-5)


def test_gradient_matches_torch_autograd():
    rng = np.random.default_rng(1)
    x = rng.random((1, 16, 16, 3), dtype=np.float32)
    weights = rng.random((1, 40, 40, 3), dtype=np.float32)

    def loss(images):
        return jnp.sum(resize_bicubic_torch(images, (40, 40)) * weights)

    ours = np.asarray(jax.grad(loss)(jnp.asarray(x)))
    t = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    out = torch.nn.functional.interpolate(t, size=(40, 40), mode="bicubic", align_corners=False)
    (out * torch.from_numpy(weights).permute(0, 3, 1, 2)).sum().backward()
    np.testing.assert_allclose(ours, t.grad.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_same_size_is_the_identity_and_rows_sum_to_one():
    x = jnp.asarray(np.random.default_rng(2).random((1, 5, 5, 3), dtype=np.float32))
    assert resize_bicubic_torch(x, (5, 5)) is x
    for antialias in (False, True):
        np.testing.assert_allclose(bicubic_matrix(32, 224, antialias).sum(1), 1.0, atol=1e-6)
        np.testing.assert_allclose(bicubic_matrix(224, 32, antialias).sum(1), 1.0, atol=1e-6)
