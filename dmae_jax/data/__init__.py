"""Input pipelines: TFDS data sources read through Grain, augmentations, resizing."""
