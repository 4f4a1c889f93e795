"""RandAugment as timm 0.5.4 applies `rand-m9-mstd0.5-inc1` in the official fine-tuning.

The DMAE/MAE ImageNet fine-tuning transform is timm's `create_transform(is_training=True,
auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic')`, of which the official code
keeps the primary part (RandomResizedCrop(224, scale (0.08, 1), ratio (3/4, 4/3), bicubic)
+ horizontal flip 0.5) and the secondary part (RandAugment), then ToTensor; the final part
(Normalize, RandomErasing) is discarded, so `--reprob 0.25` has no effect there and no
random erasing is applied here either.

RandAugment, per image: 2 ops drawn uniformly with replacement from the 15 "increasing"
ops; each op is applied with probability 0.5 with magnitude ~ N(9, 0.5) clipped to [0, 10];
signed ops (rotate, shear, translate, the enhancements) flip the sign of their argument with
probability 0.5. Geometric ops resample bicubically and fill with the ImageNet mean pixel
(124, 116, 104). The ops run on PIL images with the same PIL calls and arguments as timm, so
an op with fixed arguments gives the same pixels; the random draws come from the NumPy
`Generator` passed in (seeded per (seed, epoch, record) by the pipeline) instead of Python's
global `random`, so the draws are equal in distribution, not draw for draw.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
from PIL import ImageEnhance, ImageOps

from dmae_jax.data import augment as aug

MAX_LEVEL = 10.0  # timm's magnitude scale: level / 10 is the fraction of each op's range.
# round(255 * ImageNet mean): timm's fill colour for rotate/shear/translate.
FILL = (124, 116, 104)
TRANSLATE_PCT = 0.45  # relative translation at level 10 (timm's default translate_pct)
FINETUNE_RRC_SCALE = (0.08, 1.0)  # timm / torchvision default, as the official fine-tuning

# timm's `_RAND_INCREASING_TRANSFORMS` (the `inc1` variant), in timm's order.
OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)
SIGNED_OPS = frozenset({
    "Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
})
_BICUBIC = PIL.Image.Resampling.BICUBIC
_ENHANCERS = {
    "ColorIncreasing": ImageEnhance.Color,
    "ContrastIncreasing": ImageEnhance.Contrast,
    "BrightnessIncreasing": ImageEnhance.Brightness,
    "SharpnessIncreasing": ImageEnhance.Sharpness,
}


def op_argument(name: str, magnitude: float, negate: bool = False) -> float | int | None:
    """The argument timm passes to op `name` at `magnitude` (already clipped to [0, 10]).

    `negate` is the outcome of timm's random sign flip (used by SIGNED_OPS only). None for the
    ops without an argument.
    """
    frac = magnitude / MAX_LEVEL
    sign = -1.0 if negate else 1.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return sign * frac * 30.0
    if name == "PosterizeIncreasing":
        return 4 - int(frac * 4)
    if name == "SolarizeIncreasing":
        return 256 - int(frac * 256)
    if name == "SolarizeAdd":
        return int(frac * 110)
    if name in _ENHANCERS:
        return max(0.1, 1.0 + sign * frac * 0.9)
    if name in ("ShearX", "ShearY"):
        return sign * frac * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * frac * TRANSLATE_PCT
    raise ValueError(f"RandAugment op must be one of {list(OPS)}, got {name!r}")


def apply_op(img: PIL.Image.Image, name: str, arg, fill: tuple[int, ...] = FILL) -> PIL.Image.Image:
    """PIL RGB image -> op `name` applied with argument `arg` (from `op_argument`)."""
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(arg, resample=_BICUBIC, fillcolor=fill)
    if name == "PosterizeIncreasing":
        # Keep the `arg` high bits. At magnitude 10 (about 2% of draws) arg is 0: Pillow of
        # the papers' era gave a black image, Pillow >= 10 raises; the mask gives the former.
        mask = ~(2 ** (8 - arg) - 1) & 0xFF if arg < 8 else 0xFF
        return img.point([i & mask for i in range(256)] * len(img.getbands()))
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, arg)
    if name == "SolarizeAdd":
        lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
        return img.point(lut * len(img.getbands()))
    if name in _ENHANCERS:
        return _ENHANCERS[name](img).enhance(arg)
    if name in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        width, height = img.size
        coeffs = {
            "ShearX": (1, arg, 0, 0, 1, 0),
            "ShearY": (1, 0, 0, arg, 1, 0),
            "TranslateXRel": (1, 0, arg * width, 0, 1, 0),
            "TranslateYRel": (1, 0, 0, 0, 1, arg * height),
        }[name]
        return img.transform(img.size, PIL.Image.Transform.AFFINE, coeffs, resample=_BICUBIC,
                             fillcolor=fill)
    raise ValueError(f"RandAugment op must be one of {list(OPS)}, got {name!r}")


class RandAugment:
    """timm RandAugment(rand-m{magnitude}-mstd{magnitude_std}-inc1), num_layers ops per image."""

    def __init__(self, magnitude: float = 9.0, magnitude_std: float = 0.5, num_layers: int = 2,
                 prob: float = 0.5, fill: tuple[int, ...] = FILL):
        if not 0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f"magnitude must be in [0, {MAX_LEVEL}], got {magnitude}")
        if magnitude_std < 0:
            raise ValueError(f"magnitude_std must be >= 0, got {magnitude_std}")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.num_layers = num_layers
        self.prob = prob
        self.fill = fill

    def draw(self, rng: np.random.Generator) -> list[tuple[str, float | int | None]]:
        """The (op, argument) pairs applied to one image, in order (skipped ops left out).

        Draws as timm: the op choices first, then per op its coin (skip if u > prob), its
        magnitude (always drawn, as timm does, even for ops without argument), its sign.
        """
        chosen = rng.integers(0, len(OPS), self.num_layers)
        plan = []
        for index in chosen:
            name = OPS[int(index)]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude = rng.normal(self.magnitude, self.magnitude_std)
            magnitude = max(0.0, min(float(magnitude), MAX_LEVEL))
            negate = bool(rng.random() > 0.5) if name in SIGNED_OPS else False
            plan.append((name, op_argument(name, magnitude, negate)))
        return plan

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8 [H, W, 3] with this image's random ops applied."""
        plan = self.draw(rng)
        if not plan:
            return image
        img = PIL.Image.fromarray(image)
        for name, arg in plan:
            img = apply_op(img, name, arg, self.fill)
        return np.asarray(img)


RAND_M9_MSTD05_INC1 = RandAugment(magnitude=9.0, magnitude_std=0.5)


def finetune_train_transform(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The official ImageNet fine-tuning input: RandomResizedCrop(size, (0.08, 1), bicubic),
    horizontal flip 0.5, then RandAugment rand-m9-mstd0.5-inc1 (uint8 in and out)."""
    image = aug.random_resized_crop(image, size, rng, scale=FINETUNE_RRC_SCALE)
    image = aug.random_flip(image, rng)
    return RAND_M9_MSTD05_INC1(np.ascontiguousarray(image), rng)
