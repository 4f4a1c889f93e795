"""Mixup / CutMix as timm 0.5.4 `timm.data.mixup.Mixup`, traceable inside a jitted step.

The random choices (apply or not, mixup or cutmix, lam, the CutMix box) are traced values drawn
from an explicit rng, so one compiled step covers every case; the box is applied as a mask.
Sampling follows timm: lam ~ Beta(alpha, alpha); CutMix box from `rand_bbox` (square-root
side ratio, uniform integer centre, clipped to the image) and, with correct_lam, lam replaced by
1 - box area / image area; the mixing partner of row i is row B-1-i (`flip(0)`).
"""

import jax
import jax.numpy as jnp

_MODES = ("batch", "pair", "elem")


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """timm one-hot targets [B, K]: off = smoothing/K, on = 1 - smoothing + off."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    return jnp.where(
        jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), on_value, off_value
    ).astype(jnp.float32)


def mixup_target(
    labels: jax.Array, num_classes: int, lam: jax.Array, smoothing: float
) -> jax.Array:
    """lam * onehot_smooth(y) + (1 - lam) * onehot_smooth(y.flip(0)); labels [B], lam [] or [B]."""
    y = smooth_one_hot(labels, num_classes, smoothing)
    lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), labels.shape)[:, None]
    return lam * y + (1.0 - lam) * y[::-1]


def rand_bbox(
    rng: jax.Array, lam: jax.Array, *, height: int, width: int, margin: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """timm `rand_bbox`: (yl, yh, xl, xh) int32, each shaped like lam, one box per lam value.

    cut = int(side * sqrt(1 - lam)); the centre is uniform over the integers in
    [margin * cut, side - margin * cut); the box spans centre -/+ cut // 2, clipped to the image.
    """
    lam = jnp.asarray(lam, jnp.float32)
    cut_h, cut_w = _cut_size(lam, height, width)
    margin_y = jnp.floor(margin * cut_h).astype(jnp.int32)
    margin_x = jnp.floor(margin * cut_w).astype(jnp.int32)
    key_y, key_x = jax.random.split(rng)
    cy = jax.random.randint(key_y, lam.shape, margin_y, height - margin_y)
    cx = jax.random.randint(key_x, lam.shape, margin_x, width - margin_x)
    return bbox_from_center(cy, cx, lam, height=height, width=width)


def _cut_size(lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    return (jnp.floor(height * ratio).astype(jnp.int32),
            jnp.floor(width * ratio).astype(jnp.int32))


def bbox_from_center(
    cy: jax.Array, cx: jax.Array, lam: jax.Array, *, height: int, width: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """timm's CutMix box (yl, yh, xl, xh) around centre (cy, cx): side * sqrt(1 - lam)
    (truncated), centre -/+ half of it, clipped to the image."""
    cut_h, cut_w = _cut_size(lam, height, width)
    yl = jnp.clip(cy - cut_h // 2, 0, height)
    yh = jnp.clip(cy + cut_h // 2, 0, height)
    xl = jnp.clip(cx - cut_w // 2, 0, width)
    xh = jnp.clip(cx + cut_w // 2, 0, width)
    return yl, yh, xl, xh


def _check_args(
    images, labels, num_classes, mixup_alpha, cutmix_alpha, prob, switch_prob, mode, label_smoothing
) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be [B] = {images.shape[:1]}, got shape {labels.shape}")
    if images.shape[0] % 2:
        raise ValueError(f"Mixup/CutMix needs an even batch size, got {images.shape[0]}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for field, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if value < 0:
            raise ValueError(f"{field} must be >= 0, got {value}")
    for field, value in (("prob", prob), ("switch_prob", switch_prob)):
        if not 0 <= value <= 1:
            raise ValueError(f"{field} must be in [0, 1], got {value}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def mix(
    images: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
    correct_lam: bool = True,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`mixup_fn` that also returns the per-row lam [B] and CutMix flag [B] (for logs and tests).

    Returns (images [B, H, W, C], soft targets [B, K] float32, lam [B] float32, use_cutmix [B]
    bool). mode "batch" draws one (lam, mixup-or-cutmix, box) for the whole batch; "pair" one
    per pair (i, B-1-i); "elem" one per row.
    """
    _check_args(
        images,
        labels,
        num_classes,
        mixup_alpha,
        cutmix_alpha,
        prob,
        switch_prob,
        mode,
        label_smoothing,
    )
    batch, height, width = images.shape[:3]
    if mixup_alpha == 0 and cutmix_alpha == 0:
        lam = jnp.ones((batch,), jnp.float32)
        targets = mixup_target(labels, num_classes, lam, label_smoothing)
        return images, targets, lam, jnp.zeros((batch,), jnp.bool_)

    n = {"batch": 1, "pair": batch // 2, "elem": batch}[mode]
    key_apply, key_switch, key_mix, key_cut, key_box = jax.random.split(rng, 5)
    apply = jax.random.uniform(key_apply, (n,)) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(key_switch, (n,)) < switch_prob
        lam = jnp.where(
            use_cutmix,
            jax.random.beta(key_cut, cutmix_alpha, cutmix_alpha, (n,)),
            jax.random.beta(key_mix, mixup_alpha, mixup_alpha, (n,)),
        )
    elif mixup_alpha > 0:
        use_cutmix = jnp.zeros((n,), jnp.bool_)
        lam = jax.random.beta(key_mix, mixup_alpha, mixup_alpha, (n,))
    else:
        use_cutmix = jnp.ones((n,), jnp.bool_)
        lam = jax.random.beta(key_cut, cutmix_alpha, cutmix_alpha, (n,))
    lam = jnp.where(apply, lam.astype(jnp.float32), 1.0)
    use_cutmix = use_cutmix & apply

    yl, yh, xl, xh = rand_bbox(key_box, lam, height=height, width=width)
    if correct_lam:
        box_lam = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (height * width)
        lam = jnp.where(use_cutmix, box_lam, lam)

    def per_row(x: jax.Array) -> jax.Array:
        if mode == "batch":
            return jnp.broadcast_to(x, (batch,))
        if mode == "pair":
            # Row B-1-i uses the parameters of row i (same lam, same box).
            return jnp.concatenate([x, x[::-1]])
        return x

    lam, use_cutmix, yl, yh, xl, xh = map(per_row, (lam, use_cutmix, yl, yh, xl, xh))
    mixed = apply_mix(images, lam, use_cutmix, (yl, yh, xl, xh))
    return mixed, mixup_target(labels, num_classes, lam, label_smoothing), lam, use_cutmix


def apply_mix(
    images: jax.Array, lam: jax.Array, use_cutmix: jax.Array,
    box: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
) -> jax.Array:
    """Rows of images [B, H, W, C] mixed with their partner row B-1-i, with given parameters
    per row: lam [B], use_cutmix [B] (paste the partner's box instead of blending) and
    box = (yl, yh, xl, xh), each [B], as timm's `_mix_batch` does for one (lam, box)."""
    height, width = images.shape[1:3]
    yl, yh, xl, xh = box
    partner = images[::-1]
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    in_box = (
        (rows >= yl[:, None, None])
        & (rows < yh[:, None, None])
        & (cols >= xl[:, None, None])
        & (cols < xh[:, None, None])
    )  # [B, H, W]
    lam_img = lam.astype(images.dtype)[:, None, None, None]
    blended = images * lam_img + partner * (1 - lam_img)
    pasted = jnp.where(in_box[..., None], partner, images)
    return jnp.where(use_cutmix[:, None, None, None], pasted, blended)


def mixup_fn(
    images: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
    correct_lam: bool = True,
    label_smoothing: float = 0.1,
    group_size: int = 0,
    copies: int = 1,
    blocks: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """timm Mixup/CutMix of images [N, H, W, C] with labels [N] -> (images, soft targets [N, K]).

    With mixup_alpha = cutmix_alpha = 0 the images are returned unchanged with label-smoothed
    one-hot targets.

    The batch is `copies` blocks of B images, [x + e1; x + e2; ...] (N = copies * B): DMAE
    fine-tuning mixes the NOISY repeated batch, after the noise. group_size = 0 mixes the whole
    batch at once: one (lam, mixup-or-cutmix, box) and partner row N-1-i, so copy 0 of image j
    is mixed with copy 1 of image B-1-j and copy 1 of image j with copy 0 of image B-1-j.
    group_size = g > 0 is the official granularity: every block of g consecutive images (one
    GPU's micro-batch in the official run, 32 images) is repeated, noised and mixed on its
    own, as `[x_g + e1; x_g + e2]` with its own (lam, mode, box) and partners inside the group;
    the result is laid out again as copies blocks of B. Both copies of an image get the same
    lam, box and target, so the consistency term compares the same mixed clean image under
    independent noises. A Mixup (not CutMix) batch lowers the effective noise std to
    sigma * sqrt(lam^2 + (1 - lam)^2); CutMix keeps sigma. Mixing before the noise, or each copy
    separately, would change the objective.

    `blocks` > 1 (only with group_size > 0) takes the rows laid out as `blocks` consecutive
    blocks, each the copies of one slice of the images ([x_1 + e1; x_1 + e2; x_2 + e1; ...],
    fine-tuning's layout for a batch split over devices); every group must lie inside a
    block, and group j of images gets the same draws as in the one-block layout.
    """
    kwargs = dict(num_classes=num_classes, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                  prob=prob, switch_prob=switch_prob, mode=mode, correct_lam=correct_lam,
                  label_smoothing=label_smoothing)
    if group_size == 0:
        if blocks != 1:
            raise ValueError(f"whole-batch mixing (group_size 0) needs blocks = 1, got {blocks}")
        mixed, targets, _, _ = mix(images, labels, rng, **kwargs)
        return mixed, targets
    n = images.shape[0]
    if copies < 1 or blocks < 1 or n % (copies * blocks):
        raise ValueError(f"copies ({copies}) times blocks ({blocks}) must divide the batch "
                         f"({n})")
    per_block = n // (copies * blocks)
    if group_size < 0 or per_block % group_size:
        raise ValueError(f"group_size must be 0 or divide the {per_block} images of each copy "
                         f"in a block, got {group_size}")
    groups = per_block // group_size  # per block

    def to_groups(x):  # [blocks * copies * b, ...] -> [blocks * G, copies * g, ...]
        x = x.reshape(blocks, copies, groups, group_size, *x.shape[1:])
        return jnp.swapaxes(x, 1, 2).reshape(blocks * groups, copies * group_size,
                                             *x.shape[4:])

    def from_groups(x):  # inverse of to_groups
        x = x.reshape(blocks, groups, copies, group_size, *x.shape[2:])
        return jnp.swapaxes(x, 1, 2).reshape(n, *x.shape[4:])

    keys = jax.random.split(rng, blocks * groups)
    mixed, targets, _, _ = jax.vmap(lambda x, y, k: mix(x, y, k, **kwargs))(
        to_groups(images), to_groups(labels), keys)
    return from_groups(mixed), from_groups(targets)
