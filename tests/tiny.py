"""Test-only helpers: a tiny CNN with the model interface, and the cached digits dataset."""

import functools

import jax.numpy as jnp
from flax import nnx

from banjax import data


class TinyNet(nnx.Module):
    """Test-only CNN: conv stem, BatchNorm, dropout, linear head."""

    def __init__(self, channels=1, classes=10, width=8, *, rngs, dtype=jnp.float32, dropout=0.0):
        self.stem = nnx.Conv(channels, width, (3, 3), use_bias=False, rngs=rngs, dtype=dtype)
        self.bn = nnx.BatchNorm(width, rngs=rngs, dtype=dtype)
        self.drop = nnx.Dropout(dropout)
        self.head = nnx.Linear(width, classes, rngs=rngs, dtype=dtype)

    def __call__(self, x, *, rngs=None):
        x = nnx.relu(self.bn(self.stem(x)))
        x = self.drop(x.mean((1, 2)), rngs=rngs)
        return self.head(x).astype(jnp.float32)


@functools.cache
def digits() -> data.Dataset:
    return data.load("digits")


def device_arrays(ds, mesh) -> dict:
    arrays = data.device_put_dataset(ds, mesh)
    arrays["mean"], arrays["std"] = jnp.asarray(ds.mean), jnp.asarray(ds.std)
    return arrays
