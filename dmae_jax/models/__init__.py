"""Flax NNX models: ViT encoder, DMAE encoder-decoder, classifier, diffusion UNet."""
