"""banjax: Born Again Neural Networks in JAX/Flax NNX."""
