"""Image augmentations on uint8 [H, W, 3] arrays, as torchvision applies them to PIL images.

DMAE pretraining (`main_pretrain.py`): RandomResizedCrop(size, scale=(0.2, 1.0), bicubic)
+ RandomHorizontalFlip. Evaluation on ImageNet: Resize(size / 0.875, bicubic) + CenterCrop.
All randomness comes from the `numpy.random.Generator` passed in, so a pipeline that seeds
it from (seed, epoch, record index) is deterministic.
"""

import math

import numpy as np
import PIL.Image

from dmae_jax.errors import ConfigError

RRC_SCALE = (0.2, 1.0)  # DMAE/MAE pretraining; torchvision's default is (0.08, 1.0).
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_CROP_FRACTION = 0.875  # 224 / 256: MAE/DMAE eval resizes to 256 and crops 224.

_BICUBIC = PIL.Image.Resampling.BICUBIC


def rrc_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: crop box (top, left, h, w) of the image.

    Up to 10 tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); if none
    fits, a central crop clamped to the ratio range (the whole image if its ratio is inside).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def rrc_params_single_draw(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = RRC_RATIO,
) -> tuple[int, int, int, int]:
    """MAE's TF-style `util/crop.RandomResizedCrop.get_params` (linear probing): one draw of
    (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)), no retries; the box is
    clipped to the image (w = min(w, W), h = min(h, H)) and placed uniformly."""
    area = height * width
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
    h = min(int(round(math.sqrt(target_area / aspect_ratio))), height)
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return top, left, h, w


def rrc_single_draw_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """MAE linear-probing augmentation: TF-style RandomResizedCrop(size, (0.08, 1), bicubic)
    + horizontal flip."""
    top, left, h, w = rrc_params_single_draw(rng, image.shape[0], image.shape[1])
    crop = PIL.Image.fromarray(image).crop((left, top, left + w, top + h))
    return random_flip(np.asarray(crop.resize((size, size), _BICUBIC)), rng)


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: torchvision RandomResizedCrop, PIL bicubic."""
    top, left, h, w = rrc_params(rng, image.shape[0], image.shape[1], scale, ratio)
    crop = PIL.Image.fromarray(image).crop((left, top, left + w, top + h))
    return np.asarray(crop.resize((size, size), _BICUBIC))


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, C]: mirrored left-right with probability 0.5."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def rrc_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """DMAE pretraining augmentation: RandomResizedCrop(size, (0.2, 1)) + horizontal flip."""
    return random_flip(random_resized_crop(image, size, rng), rng)


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """torchvision `Resize(short_side)` output (h, w): the shorter side becomes `short_side`,
    the longer one `int(short_side * long / short)` (truncated, as torchvision computes it)."""
    if width <= height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision `CenterCrop(size)` offsets (top, left): round((side - size) / 2)."""
    if height < size or width < size:
        raise ValueError(f"center crop of {size} needs an image at least that big, got "
                         f"{height}x{width}")
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def center_crop_resize(
    image: np.ndarray, size: int, crop_fraction: float = EVAL_CROP_FRACTION
) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3]: torchvision Resize(int(size / crop_fraction),
    bicubic) on the shorter side of the PIL image, then CenterCrop(size), as MAE/DMAE
    evaluate and certify ImageNet (`util/datasets.py` eval transform)."""
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    height, width = image.shape[:2]
    new_h, new_w = resized_shape(height, width, int(size / crop_fraction))
    pil = PIL.Image.fromarray(image)
    if (new_h, new_w) != (height, width):  # torchvision returns the image itself then.
        pil = pil.resize((new_w, new_h), _BICUBIC)
    top, left = center_crop_box(new_h, new_w, size)
    return np.asarray(pil.crop((left, top, left + size, top + size)))


# Data sets whose evaluation (and certification) input is Resize(256) + CenterCrop(224) of
# the variable-size image; the others (32x32 CIFAR-10, digits) are used as stored.
RESIZE_CROP_DATASETS = ("imagenet2012",)


def eval_image(image: np.ndarray, dataset: str, image_size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> the official evaluation input of `dataset` (uint8).

    imagenet2012: Resize(image_size / 0.875, bicubic) + CenterCrop(image_size), for every
    image (a 224x224 image is also upsampled to 256 and cropped, as torchvision does).
    Other data sets: the image itself, which must already be image_size x image_size.
    """
    if dataset in RESIZE_CROP_DATASETS:
        return center_crop_resize(image, image_size)
    if image.shape[:2] != (image_size, image_size):
        raise ConfigError(
            f"{dataset} images are used at their stored size, so config.data.image_size must "
            f"be {image.shape[0]}x{image.shape[1]}, got {image_size}")
    return image


def certification_input(image: np.ndarray, dataset: str, image_size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [S, S, 3] in [0, 1]: the image CERTIFY adds noise to.

    As the official certification: the evaluation transform (`eval_image`), then ToTensor's
    division by 255; the noise is then drawn at this resolution (224 for ImageNet, 32 for
    CIFAR-10, which the model upsamples after the noise).
    """
    return eval_image(np.asarray(image, np.uint8), dataset, image_size).astype(
        np.float32) / np.float32(255.0)
