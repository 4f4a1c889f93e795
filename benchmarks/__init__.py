"""Benchmarks, side by side with PyTorch: python -m benchmarks.run."""
