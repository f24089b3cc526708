"""Tests for banjax.losses against an independent float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from banjax import losses

B, C = 8, 10


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_ce(logits, labels, weights=None):
    ce = -np_log_softmax(logits)[np.arange(len(labels)), labels]
    return ce.mean() if weights is None else (np.asarray(weights, np.float64) * ce).sum()


def np_kl(student, teacher, t=1.0):
    lq = np_log_softmax(np.asarray(teacher, np.float64) / t)
    q = np.exp(lq)
    lp = np_log_softmax(np.asarray(student, np.float64) / t)
    return t**2 * (q * (lq - lp)).sum(-1).mean()


def np_kl_probs(student, q, t=1.0):
    q = np.asarray(q, np.float64)
    lp = np_log_softmax(np.asarray(student, np.float64) / t)
    safe = np.where(q > 0, q, 1.0)
    return t**2 * np.where(q > 0, q * (np.log(safe) - lp), 0.0).sum(-1).mean()


def np_cwtm(teacher):
    pmax = np.exp(np_log_softmax(teacher)).max(-1)
    return pmax / pmax.sum()


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    s = (3 * rng.standard_normal((B, C))).astype(np.float32)
    t = (3 * rng.standard_normal((B, C))).astype(np.float32)
    y = rng.integers(0, C, size=B)
    return s, t, y


def test_cross_entropy_mean_and_weighted(batch):
    s, _, y = batch
    np.testing.assert_allclose(losses.cross_entropy(s, y), np_ce(s, y), rtol=1e-5)
    w = np.random.default_rng(1).random(B)
    w /= w.sum()
    np.testing.assert_allclose(losses.cross_entropy(s, y, w), np_ce(s, y, w), rtol=1e-5)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kl_matches_reference(batch, t):
    s, te, _ = batch
    np.testing.assert_allclose(losses.distillation_kl(s, te, t), np_kl(s, te, t), rtol=1e-5)
    q = np.exp(np_log_softmax(te / t))
    np.testing.assert_allclose(losses.distillation_kl_from_probs(s, q, t), np_kl(s, te, t),
                               rtol=1e-4)


def test_kl_zero_for_equal_logits(batch):
    s, _, _ = batch
    assert abs(float(losses.distillation_kl(s, s, 2.0))) < 1e-6


def test_kl_from_probs_handles_zero_teacher_probs(batch):
    s, _, _ = batch
    q = np.zeros((B, C), np.float32)
    q[:, 0], q[:, 3] = 0.25, 0.75
    val = losses.distillation_kl_from_probs(s, q, 2.0)
    assert np.isfinite(val)
    np.testing.assert_allclose(val, np_kl_probs(s, q, 2.0), rtol=1e-5)
    g = jax.grad(losses.distillation_kl_from_probs)(jnp.asarray(s), jnp.asarray(q), 2.0)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kl_gradient_analytic(batch, t):
    s, te, _ = batch
    g = jax.grad(losses.distillation_kl)(jnp.asarray(s), jnp.asarray(te), t)
    p_s = np.exp(np_log_softmax(s / t))
    p_t = np.exp(np_log_softmax(te / t))
    np.testing.assert_allclose(g, t * (p_s - p_t) / B, atol=1e-6)
    # Central finite differences of the float64 reference on one coordinate.
    eps, (i, j) = 1e-5, (2, 5)
    sp, sm = s.astype(np.float64), s.astype(np.float64)
    sp, sm = sp.copy(), sm.copy()
    sp[i, j] += eps
    sm[i, j] -= eps
    fd = (np_kl(sp, te, t) - np_kl(sm, te, t)) / (2 * eps)
    np.testing.assert_allclose(g[i, j], fd, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("mode", losses.MODES)
def test_no_gradient_into_teacher(batch, mode):
    s, te, y = batch
    f = lambda t_: losses.ban_loss(s, y, t_, mode=mode, temperature=2.0,
                                   key=jax.random.key(0))[0]
    np.testing.assert_array_equal(jax.grad(f)(jnp.asarray(te)), 0.0)
    np.testing.assert_array_equal(jax.grad(losses.distillation_kl, 1)(s, jnp.asarray(te)), 0.0)


def test_dkpp_invariants():
    rng = np.random.default_rng(2)
    q = jax.nn.softmax(jnp.asarray(rng.standard_normal((16, C)) * 2, jnp.float32))
    q_np = np.asarray(q)
    am = q_np.argmax(-1)
    out1 = np.asarray(losses.dkpp_permute(jax.random.key(1), q))
    out2 = np.asarray(losses.dkpp_permute(jax.random.key(2), q))
    rows = np.arange(16)
    for out in (out1, out2):
        np.testing.assert_array_equal(out[rows, am], q_np[rows, am])
        np.testing.assert_array_equal(np.sort(out, -1), np.sort(q_np, -1))
        np.testing.assert_array_equal(out.argmax(-1), am)
    assert not np.array_equal(out1, out2)
    # Over many draws every non-argmax entry of a row gets moved away from its slot at least once.
    moved = np.zeros((16, C), bool)
    for k in range(20):
        moved |= np.asarray(losses.dkpp_permute(jax.random.key(100 + k), q)) != q_np
    expect = np.ones((16, C), bool)
    expect[rows, am] = False
    np.testing.assert_array_equal(moved, expect)


def test_dkpp_jits_and_keeps_argmax_first_column():
    q = jnp.asarray([[0.7, 0.1, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]], jnp.float32)
    out = np.asarray(jax.jit(losses.dkpp_permute)(jax.random.key(3), q))
    assert out[0, 0] == np.float32(0.7) and out[1, 3] == np.float32(0.4)
    np.testing.assert_array_equal(np.sort(out, -1), np.sort(np.asarray(q), -1))


def test_cwtm_weights(batch):
    _, te, _ = batch
    w = np.asarray(losses.cwtm_weights(te))
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
    pmax = np.exp(np_log_softmax(te)).max(-1)
    np.testing.assert_allclose(w / pmax, np.full(B, 1 / pmax.sum()), rtol=1e-5)


def test_large_logits_finite():
    rng = np.random.default_rng(3)
    s = jnp.asarray(1e4 * rng.standard_normal((B, C)), jnp.float32)
    te = jnp.asarray(1e4 * rng.standard_normal((B, C)), jnp.float32)
    y = jnp.asarray(rng.integers(0, C, B))
    for mode in losses.MODES:
        f = lambda s_, m=mode: losses.ban_loss(s_, y, te, mode=m, key=jax.random.key(0))[0]
        val, g = jax.value_and_grad(f)(s)
        assert np.isfinite(val) and np.all(np.isfinite(g)), mode
    np.testing.assert_allclose(losses.distillation_kl(s, te), np_kl(s, te), rtol=1e-5)


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_ban_loss_modes_match_reference(batch, t):
    s, te, y = batch
    ce, kl = np_ce(s, y), np_kl(s, te, t)
    kw = dict(temperature=t, label_weight=0.3, kl_weight=2.0)
    loss, m = losses.ban_loss(s, y, te, mode="ban+l", **kw)
    np.testing.assert_allclose(loss, 0.3 * ce + 2.0 * kl, rtol=1e-5)
    np.testing.assert_allclose([m["ce"], m["kl"], m["loss"]], [ce, kl, loss], rtol=1e-5)
    loss, m = losses.ban_loss(s, y, te, mode="ban", **kw)
    np.testing.assert_allclose(loss, 2.0 * kl, rtol=1e-5)
    assert set(m) == {"loss", "ce", "kl"}
    loss, _ = losses.ban_loss(s, y, te, mode="cwtm", **kw)
    np.testing.assert_allclose(loss, 0.3 * np_ce(s, y, np_cwtm(te)), rtol=1e-5)
    key = jax.random.key(7)
    loss, m = losses.ban_loss(s, y, te, mode="dkpp", key=key, **kw)
    q = np.asarray(losses.dkpp_permute(key, jax.nn.softmax(jnp.asarray(te) / t)))
    np.testing.assert_allclose(loss, 2.0 * np_kl_probs(s, q, t), rtol=1e-5)
    np.testing.assert_allclose(m["kl"], kl, rtol=1e-5)


def test_ban_loss_generation_zero(batch):
    s, _, y = batch
    for mode in losses.MODES:
        loss, m = losses.ban_loss(s, y, None, mode=mode, label_weight=0.5)
        np.testing.assert_allclose(loss, np_ce(s, y), rtol=1e-5)
        assert set(m) == {"loss", "ce"}


def test_ban_loss_jit_float16_teacher(batch):
    s, te, y = batch
    te16 = jnp.asarray(te, jnp.float16)
    f = jax.jit(lambda s_, t_: losses.ban_loss(s_, y, t_, mode="ban+l", temperature=4.0))
    loss, m = f(jnp.asarray(s), te16)
    assert loss.dtype == jnp.float32
    ref = np_ce(s, y) + np_kl(s, np.asarray(te16, np.float64), 4.0)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    loss_bf, _ = losses.ban_loss(s, y, jnp.asarray(te, jnp.bfloat16), mode="ban")
    assert loss_bf.dtype == jnp.float32 and np.isfinite(loss_bf)


def test_invalid_arguments(batch):
    s, te, y = batch
    with pytest.raises(ValueError, match="'kd'.*ban\\+l"):
        losses.ban_loss(s, y, te, mode="kd")
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            losses.ban_loss(s, y, te, temperature=t)
        with pytest.raises(ValueError, match="temperature"):
            losses.distillation_kl(s, te, t)
    with pytest.raises(ValueError, match="key"):
        losses.ban_loss(s, y, te, mode="dkpp")
    with pytest.raises(ValueError, match="shape"):
        losses.distillation_kl(s, te[:, :5])
    with pytest.raises(ValueError, match="labels_B"):
        losses.cross_entropy(s, y[:3])
