"""BANE: evaluate every generation and their ensembles (mean of softmax outputs, as in the paper).

Generations that share an architecture are stacked and run with `jax.vmap` in one pass over the test
set; mixed architectures are grouped by graphdef.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from banjax import data, train


def stack(trees: list):
    """Stack a list of identically structured pytrees along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.cache
def _probs_fn(graphdef, mesh, dtype: str):
    bsh = data.batch_sharding(mesh)

    def run(params_M, rest_M, arrays, idx_B):
        images = arrays["test_images"][jax.lax.with_sharding_constraint(idx_B, bsh)]
        forward = lambda p, r: train.forward(graphdef, p, r, images, arrays, dtype)
        return jax.nn.softmax(jax.vmap(forward)(params_M, rest_M), axis=-1)  # M x B x C

    return jax.jit(run)


def group(members: list) -> list[list[int]]:
    """Positions of `members` (objects with graphdef/params/rest) grouped by architecture."""
    groups: dict = {}
    for i, m in enumerate(members):
        groups.setdefault(train.to_eval(m.graphdef, m.params, m.rest), []).append(i)
    return list(groups.values())


def predict(members: list, arrays, num_test: int, batch: int, mesh, dtype: str = "float32"):
    """M x N x C test-set probabilities of every member, one vmapped pass per architecture."""
    out = [None] * len(members)
    for positions in group(members):
        first = members[positions[0]]
        graphdef = train.to_eval(first.graphdef, first.params, first.rest)
        params_M = stack([members[i].params for i in positions])
        rest_M = stack([members[i].rest for i in positions])
        fn = _probs_fn(graphdef, mesh, dtype)
        batches = data.eval_batches(num_test, batch)
        chunks = jax.device_get([fn(params_M, rest_M, arrays, jnp.asarray(idx)) for idx, _ in batches])
        probs = np.concatenate([c[:, mask] for c, (_, mask) in zip(chunks, batches)], axis=1)
        for j, i in enumerate(positions):
            out[i] = probs[j]
    return np.stack(out)


def scores(probs_NxC: np.ndarray, labels_N: np.ndarray) -> dict:
    """Test error and NLL of a probability table."""
    p_true = probs_NxC[np.arange(len(labels_N)), labels_N]
    return {"test_error": float(np.mean(np.argmax(probs_NxC, -1) != labels_N)),
            "test_nll": float(-np.mean(np.log(np.maximum(p_true, 1e-30))))}


def ensembles(probs_MxNxC: np.ndarray, labels_N: np.ndarray, indices: list[int]) -> list[dict]:
    """Ens*k = mean softmax of students 1..k for k = 2..K, then the ensemble with the teacher."""
    pos = {g: i for i, g in enumerate(indices)}
    students = [g for g in indices if g != 0]
    sets = [students[:k] for k in range(2, len(students) + 1)]
    if 0 in pos and students:
        sets.append([0, *students])
    out = []
    for members in sets:
        mean = probs_MxNxC[[pos[g] for g in members]].mean(0)
        out.append({"members": members, **scores(mean, labels_N)})
    return out


def evaluate(generations: list, arrays, labels_N: np.ndarray, batch: int, mesh,
             dtype: str = "float32") -> tuple[list[dict], list[dict]]:
    """Per-generation scores and ensemble scores for a finished chain."""
    probs = predict(generations, arrays, len(labels_N), batch, mesh, dtype)
    per_gen = [{"index": g.index, **scores(p, labels_N)} for g, p in zip(generations, probs)]
    return per_gen, ensembles(probs, labels_N, [g.index for g in generations])
