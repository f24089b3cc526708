"""The logit bank: a generation's logits on every training image under every (or K sampled) view.

A pad-and-crop + flip augmentation has a finite view set, so storing the teacher's logits per
(image, view) and drawing (image, view) pairs uniformly makes stored-logit distillation exact; a fixed
sample of K views per image is the cheap approximation. Files in a generation directory:
`bank_logits.npy` (N x K x C, float16/float32, or bfloat16 stored as its uint16 bits),
`bank_views.npy` (N x K int16 view ids) and `bank.json` (dtype, shapes, checksum, build time).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from banjax import data, train

DTYPES = ("float16", "float32", "bfloat16")


def check_dtype(dtype: str) -> None:
    """ValueError unless `dtype` is a bank dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"bank dtype {dtype!r}; valid: {DTYPES}")


def view_table(key, num_train: int, views: data.ViewSet, num_views: int) -> np.ndarray:
    """N x K view ids: all views in order (num_views 0 or the full set) or K distinct ones per image."""
    total = views.num_views
    if num_views < 0 or num_views > total:
        raise ValueError(f"bank_views={num_views} must be 0 (all) or in 1..{total}, the size of "
                         f"this dataset's view set")
    if num_views in (0, total):
        return np.broadcast_to(np.arange(total, dtype=np.int16), (num_train, total)).copy()
    keys = jax.random.split(key, num_train)
    pick = jax.vmap(lambda k: jax.random.permutation(k, total)[:num_views])(keys)
    return np.asarray(pick, np.int16)


@functools.cache
def _logits_fn(graphdef, mesh, dtype: str, views: data.ViewSet):
    bsh = data.batch_sharding(mesh)

    def run(params, rest, arrays, idx_B, view_B):
        idx_B = jax.lax.with_sharding_constraint(idx_B, bsh)
        x = data.augment(arrays["train_images"][idx_B], view_B, views)
        return train.forward(graphdef, params, rest, x, arrays, dtype)

    return jax.jit(run)


def _store_dtype(dtype: str):
    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


def build(graphdef, params, rest, arrays, view_ids_NxK: np.ndarray, views: data.ViewSet, mesh, *,
          batch: int, dtype: str = "float16", compute_dtype: str = "float32") -> dict:
    """Inference-mode logits for every (image, slot) pair of `view_ids_NxK`; returns the bank dict."""
    check_dtype(dtype)
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    fn = _logits_fn(nnx.split(model, nnx.Param, ...)[0], mesh, compute_dtype, views)
    n, k = view_ids_NxK.shape
    flat_views = view_ids_NxK.reshape(-1).astype(np.int32)
    out = None
    t0 = time.perf_counter()

    def store(logits, pair_idx, mask):
        nonlocal out
        logits = np.asarray(logits)[mask].astype(_store_dtype(dtype))
        if out is None:
            out = np.empty((n * k, logits.shape[-1]), logits.dtype)
        out[pair_idx[mask]] = logits

    pending = None
    for pair_idx, mask in data.eval_batches(n * k, batch):
        logits = fn(params, rest, arrays, jnp.asarray(pair_idx // k),
                    jnp.asarray(flat_views[pair_idx]))
        if pending is not None:
            store(*pending)  # copy the previous batch out while the device computes this one
        pending = (logits, pair_idx, mask)
    store(*pending)
    seconds = time.perf_counter() - t0
    return {"logits": out.reshape(n, k, -1), "view_ids": view_ids_NxK.astype(np.int16),
            "dtype": dtype, "build_seconds": seconds}


def nbytes(bank: dict) -> int:
    """Bytes of the stored logits and view ids."""
    return int(bank["logits"].nbytes + bank["view_ids"].nbytes)


def _atomic_save(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def checksum(bank: dict) -> str:
    """sha256 over the logits' and view ids' bytes."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(bank["logits"]).view(np.uint8).reshape(-1).data)
    h.update(np.ascontiguousarray(bank["view_ids"]).view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def save(directory: str, bank: dict) -> dict:
    """Write the bank files (each atomically, metadata last) and return the metadata."""
    logits = bank["logits"]
    stored = logits.view(np.uint16) if bank["dtype"] == "bfloat16" else logits
    _atomic_save(os.path.join(directory, "bank_logits.npy"), stored)
    _atomic_save(os.path.join(directory, "bank_views.npy"), bank["view_ids"])
    meta = {"dtype": bank["dtype"], "shape": list(logits.shape), "bytes": nbytes(bank),
            "checksum": checksum(bank), "build_seconds": bank.get("build_seconds")}
    tmp = os.path.join(directory, "bank.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(directory, "bank.json"))
    return meta


def exists(directory: str) -> bool:
    """Whether a complete bank (its metadata is written last) is in `directory`."""
    return os.path.exists(os.path.join(directory, "bank.json"))


def read_meta(directory: str) -> dict:
    """The bank's metadata (dtype, shape, bytes, checksum) without reading the logits."""
    with open(os.path.join(directory, "bank.json")) as f:
        return json.load(f)


def load(directory: str, verify: bool = True) -> dict:
    """Read a bank written by `save`; with `verify`, fail if its checksum does not match."""
    meta = read_meta(directory)
    logits = np.load(os.path.join(directory, "bank_logits.npy"))
    if meta["dtype"] == "bfloat16":
        logits = logits.view(ml_dtypes.bfloat16)
    bank = {"logits": logits, "view_ids": np.load(os.path.join(directory, "bank_views.npy")),
            "dtype": meta["dtype"], "build_seconds": meta.get("build_seconds")}
    if verify and checksum(bank) != meta["checksum"]:
        raise RuntimeError(f"logit bank in {directory} is corrupt: checksum mismatch; delete its "
                           "bank_* files to rebuild it from the generation's checkpoint")
    bank["checksum"] = meta["checksum"]
    return bank


def to_device(bank: dict, mesh) -> dict:
    """The arrays a train step gathers from, replicated on the mesh."""
    rep = data.replicated(mesh)
    return {"logits": jax.device_put(jnp.asarray(bank["logits"]), rep),
            "view_ids": jax.device_put(jnp.asarray(bank["view_ids"]), rep)}
