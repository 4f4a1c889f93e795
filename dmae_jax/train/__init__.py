"""What the trainers (`dmae_jax/tasks/`) call: step, restore, lock, optimizers, losses, Mixup."""
