"""Input pipelines: TFDS data sources read through Grain, augmentations, resizing."""

# The training augmentations `config.data.augment` names, here where checking a config finds
# them without importing Grain or PIL. rrc_flip: pretraining (RandomResizedCrop scale
# (0.2, 1) + flip); rrc_flip_randaug: ImageNet fine-tuning (RandomResizedCrop scale
# (0.08, 1) + flip + RandAugment rand-m9-mstd0.5-inc1); rrc_single_flip: linear probing
# (MAE's TF-style RandomResizedCrop, one draw, + flip); flip: flip only (CIFAR-10); none: the
# stored image (resized/cropped to size if it differs).
AUGMENTATIONS = ("rrc_flip", "rrc_flip_randaug", "rrc_single_flip", "flip", "none")
