"""Ensemble evaluator: vmapped per-architecture pass equals a Python loop; Ens*k definitions."""

import dataclasses

import numpy as np
from flax import nnx

from banjax import data, ensemble, train
from tests.tiny import TinyNet, device_arrays, digits


@dataclasses.dataclass
class Member:
    index: int
    graphdef: object
    params: object
    rest: object


def members():
    """A teacher of one width and three students of another: two architecture groups."""
    out = []
    for index, width in enumerate((6, 8, 8, 8)):
        model = TinyNet(width=width, rngs=nnx.Rngs(index))
        graphdef, state = train.init_state(model, train.OptConfig(total_steps=1), index)
        out.append(Member(index, graphdef, state.params, state.rest))
    return out


def test_vmapped_predictions_equal_a_python_loop():
    ds = digits()
    mesh = data.make_mesh()
    arrays = device_arrays(ds, mesh)
    ms = members()
    assert sorted(map(sorted, ensemble.group(ms))) == [[0], [1, 2, 3]]
    n = len(ds.test_labels)
    probs = ensemble.predict(ms, arrays, n, 64, mesh)
    assert probs.shape == (4, n, 10)
    for i, m in enumerate(ms):
        loop = train.evaluate(m.graphdef, m.params, m.rest, arrays, n, 64, mesh, with_probs=True)
        np.testing.assert_allclose(probs[i], loop["probs"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ensemble.scores(probs[i], ds.test_labels)["test_error"],
                                   loop["error"])
    assert not np.allclose(probs[1], probs[2])  # different seeds, different models


def test_ensembles_average_softmax_of_students_then_with_teacher():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=(4, 30))
    labels = rng.integers(0, 5, size=30)
    got = ensemble.ensembles(probs, labels, [0, 1, 2, 3])
    assert [e["members"] for e in got] == [[1, 2], [1, 2, 3], [0, 1, 2, 3]]
    for e in got:
        mean = probs[e["members"]].mean(0)
        assert e["test_error"] == np.mean(mean.argmax(1) != labels)
        np.testing.assert_allclose(e["test_nll"], -np.mean(np.log(mean[np.arange(30), labels])))
