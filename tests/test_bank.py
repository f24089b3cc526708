"""Logit bank: view tables, build/save/load, and exactness against the online teacher."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from banjax import bank, data, train
from tests.tiny import TinyNet, device_arrays, digits


@pytest.fixture(scope="module")
def teacher():
    ds = digits()
    mesh = data.make_mesh()
    arrays = device_arrays(ds, mesh)
    model = TinyNet(rngs=nnx.Rngs(3))
    opt = train.OptConfig(total_steps=30)
    graphdef, state = train.init_state(model, opt, 3)
    cfg = train.StepConfig(batch=64, num_train=len(ds.train_labels), views=ds.views, opt=opt)
    state = train.fit(graphdef, state, cfg, arrays, mesh, total_steps=30)  # BN stats are non-trivial
    return ds, mesh, arrays, graphdef, state


def test_view_table_all_and_sampled():
    views = data.ViewSet(pad=4, size=32, flip=True, mode="reflect")
    full = bank.view_table(jax.random.PRNGKey(0), 5, views, 0)
    assert full.shape == (5, 162) and (full == np.arange(162)).all()
    some = bank.view_table(jax.random.PRNGKey(0), 50, views, 7)
    assert some.shape == (50, 7) and some.dtype == np.int16
    assert all(len(set(row)) == 7 for row in some)  # distinct views per image
    assert some.min() >= 0 and some.max() < 162
    assert len({tuple(r) for r in some}) > 1  # not the same sample for every image
    with pytest.raises(ValueError, match="bank_views=163.*162"):
        bank.view_table(jax.random.PRNGKey(0), 5, views, 163)


def test_bank_matches_reference_forward_and_round_trips(teacher, tmp_path):
    ds, mesh, arrays, graphdef, state = teacher
    n = 37  # odd: the last batch is padded and masked
    table = bank.view_table(jax.random.PRNGKey(1), len(ds.train_labels), ds.views, 4)
    b = bank.build(graphdef, state.params, state.rest, arrays, table, ds.views, mesh, batch=32,
                   dtype="float32")
    assert b["logits"].shape == (len(ds.train_labels), 4, 10)
    model = nnx.merge(graphdef, state.params, state.rest)
    model.eval()
    for slot in range(4):
        x = data.augment(jnp.asarray(ds.train_images[:n]), jnp.asarray(table[:n, slot], jnp.int32),
                         ds.views)
        want = model(data.normalize(x, ds.mean, ds.std))
        np.testing.assert_allclose(b["logits"][:n, slot], np.asarray(want), rtol=1e-5, atol=1e-5)
    for dtype, np_dtype in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        small = {**b, "logits": b["logits"].astype(np_dtype), "dtype": dtype}
        d = tmp_path / dtype
        d.mkdir()
        meta = bank.save(str(d), small)
        assert bank.exists(str(d)) and meta["bytes"] == bank.nbytes(small)
        back = bank.load(str(d))
        assert back["logits"].dtype == np_dtype and back["checksum"] == meta["checksum"]
        np.testing.assert_array_equal(back["logits"], small["logits"])
        np.testing.assert_array_equal(back["view_ids"], table)


def test_corrupt_bank_is_detected(teacher, tmp_path):
    logits = np.random.default_rng(0).normal(size=(6, 2, 3)).astype(np.float16)
    b = {"logits": logits, "view_ids": np.zeros((6, 2), np.int16), "dtype": "float16"}
    bank.save(str(tmp_path), b)
    bad = logits.copy()
    bad[0, 0, 0] += 1
    np.save(tmp_path / "bank_logits.npy", bad)
    with pytest.raises(RuntimeError, match="checksum"):
        bank.load(str(tmp_path))
    with pytest.raises(ValueError, match="float64"):
        bank.check_dtype("float64")


def test_full_bank_step_equals_online_teacher_step(teacher):
    """With every view stored, distilling from the bank is the online teacher, to float16 precision."""
    ds, mesh, arrays, t_graphdef, t_state = teacher
    table = bank.view_table(None, len(ds.train_labels), ds.views, 0)
    b = bank.build(t_graphdef, t_state.params, t_state.rest, arrays, table, ds.views, mesh, batch=256)
    assert b["logits"].dtype == np.float16
    t_eval = train.to_eval(t_graphdef, t_state.params, t_state.rest)
    online = {"params": t_state.params, "rest": t_state.rest}
    out = {}
    for signal, payload, tg in (("bank", bank.to_device(b, mesh), None), ("online", online, t_eval)):
        model = TinyNet(rngs=nnx.Rngs(11))
        opt = train.OptConfig(total_steps=10)
        graphdef, state = train.init_state(model, opt, 5)
        cfg = train.StepConfig(batch=64, num_train=len(ds.train_labels), views=ds.views, opt=opt,
                               teacher=signal)
        fn = train.train_step_fn(graphdef, cfg, mesh, tg)
        out[signal] = fn(state, arrays, payload)
    (s_bank, m_bank), (s_online, m_online) = out["bank"], out["online"]
    assert float(m_online["kl"]) > 1e-4  # a real teacher signal, not a trivial zero
    np.testing.assert_allclose(float(m_bank["kl"]), float(m_online["kl"]), rtol=2e-3)
    np.testing.assert_allclose(float(m_bank["loss"]), float(m_online["loss"]), rtol=1e-3)
    np.testing.assert_array_equal(float(m_bank["ce"]), float(m_online["ce"]))  # same batch exactly
    for a, c in zip(jax.tree.leaves(s_bank.params), jax.tree.leaves(s_online.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-3, atol=1e-5)
