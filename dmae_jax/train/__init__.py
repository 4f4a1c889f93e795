"""Training: optimizers, losses and the pretraining / fine-tuning loops."""
