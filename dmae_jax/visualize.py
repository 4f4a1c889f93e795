"""PNG grids and plots: people look at reconstructions before they look at numbers."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def image_grid(rows: list[np.ndarray], *, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Stacks equally long lists of images [N, H, W, C] in [0,1] into one uint8 grid image."""
    n, h, w, c = rows[0].shape
    grid = np.ones((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), np.float32)
    for r, images in enumerate(rows):
        images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        for i, img in enumerate(images):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            grid[y:y + h, x:x + w] = img
    grid = (grid * 255).round().astype(np.uint8)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] image, creating the directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)


def masked_view(noisy: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """The noisy images with masked patches greyed out: what the encoder sees. [N,H,W,C]."""
    n, h, w, _ = noisy.shape
    gh, gw = h // patch_size, w // patch_size
    m = np.asarray(mask, np.float32).reshape(n, gh, gw)
    m = m.repeat(patch_size, axis=1).repeat(patch_size, axis=2)[..., None]
    return np.where(m > 0.5, 0.5, noisy)
