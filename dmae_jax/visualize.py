"""PNG grids and plots: people look at reconstructions before they look at numbers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def image_grid(rows: list[np.ndarray], *, pad: int = 2, scale: int = 1,
               labels: Sequence[str] | None = None) -> np.ndarray:
    """Stacks equally long lists of images [N, H, W, C] in [0,1] into one uint8 grid image.

    `labels` (one per row) are written in black to the left of their rows, after scaling.
    """
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"labels must have one entry per row ({len(rows)}), got {labels}")
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
    if labels:
        grid = _label_rows(grid, labels, row_height=(h + pad) * scale, top=pad * scale)
    return grid


def _label_rows(grid: np.ndarray, labels: Sequence[str], *, row_height: int,
                top: int) -> np.ndarray:
    """The grid with a white margin on the left holding each row's label, vertically centred."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), text, font=font) for text in labels]
    margin = max(box[2] - box[0] for box in boxes) + 8
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, (text, box) in enumerate(zip(labels, boxes, strict=True)):
        y = top + r * row_height + (row_height - (box[3] - box[1])) // 2 - box[1]
        draw.text((4, y), text, fill="black", font=font)
    return np.asarray(canvas)


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] image (a local path or gs://), atomically."""
    from dmae_jax import storage

    storage.write_atomic(path, storage.png_bytes(image))


def masked_view(noisy: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """The noisy images with masked patches greyed out: what the encoder sees. [N,H,W,C]."""
    n, h, w, _ = noisy.shape
    gh, gw = h // patch_size, w // patch_size
    m = np.asarray(mask, np.float32).reshape(n, gh, gw)
    m = m.repeat(patch_size, axis=1).repeat(patch_size, axis=2)[..., None]
    return np.where(m > 0.5, 0.5, noisy)
