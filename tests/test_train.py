"""Training engine: optimiser, compile-once steps, exact resume, NaN stop, eval, bf16."""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from banjax import data, train
from tests.tiny import TinyNet, device_arrays, digits


@pytest.fixture(scope="module")
def setup():
    ds = digits()
    mesh = data.make_mesh()
    return ds, mesh, device_arrays(ds, mesh)


def make(seed=0, total=20, teacher="none", steps=1, dtype="float32", lr=0.1, dropout=0.0):
    ds = digits()
    model = TinyNet(rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype), dropout=dropout)
    opt = train.OptConfig(total_steps=total, lr=lr)
    graphdef, state = train.init_state(model, opt, seed)
    cfg = train.StepConfig(batch=32, num_train=len(ds.train_labels), views=ds.views, opt=opt,
                           teacher=teacher, dtype=dtype, steps=steps)
    return graphdef, state, cfg


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_piecewise_schedule_follows_wrn_recipe():
    lr = train.learning_rate(train.OptConfig(total_steps=1000))
    got = [float(lr(s)) for s in (0, 299, 300, 599, 600, 799, 800, 999)]
    want = [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    cos = train.learning_rate(train.OptConfig(total_steps=100, schedule="cosine"))
    np.testing.assert_allclose(float(cos(50)), 0.05, rtol=1e-5)
    with pytest.raises(ValueError, match="linear"):
        train.learning_rate(train.OptConfig(total_steps=10, schedule="linear"))


def test_optimizer_matches_pytorch_sgd_nesterov_with_l2_on_kernels_only():
    opt = train.OptConfig(total_steps=100, lr=0.1, weight_decay=0.01)
    tx = train.make_optimizer(opt)
    params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    grads = [{"kernel": jnp.full((2, 2), g), "scale": jnp.full((2,), g)} for g in (0.5, -0.25)]
    state = tx.init(params)
    p = params
    for g in grads:
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
    # PyTorch SGD(nesterov, weight_decay) reference: d = g + wd*w; b = mu*b + d; w -= lr*(d + mu*b)
    for name, wd in (("kernel", 0.01), ("scale", 0.0)):
        w, b = 1.0, 0.0
        for g in (0.5, -0.25):
            d = g + wd * w
            b = 0.9 * b + d
            w -= 0.1 * (d + 0.9 * b)
        np.testing.assert_allclose(np.asarray(p[name]), w, rtol=1e-6)


def test_fit_compiles_once_per_architecture_across_generations(setup, tmp_path):
    ds, mesh, arrays = setup
    train.TRACES.clear()
    n = len(ds.train_labels)
    bank = {"logits": jnp.zeros((n, 2, 10), jnp.float16),
            "view_ids": jnp.asarray(np.tile([0, 3], (n, 1)), jnp.int16)}
    for gen in range(3):  # three "generations" of the same architecture, fresh models each time
        graphdef, state, cfg = make(seed=gen, teacher="bank", total=4)
        train.fit(graphdef, state, cfg, arrays, mesh, total_steps=4, teacher=bank)
    assert train.TRACES[("train", "bank", 1)] == 1


def test_fused_steps_equal_single_steps(setup):
    ds, mesh, arrays = setup
    g1, s1, c1 = make(total=8)
    g8, s8, c8 = make(total=8, steps=4)
    s1 = train.fit(g1, s1, c1, arrays, mesh, total_steps=8)
    s8 = train.fit(g8, s8, c8, arrays, mesh, total_steps=8)
    assert int(s8.step) == 8
    for a, b in zip(leaves(s1.params), leaves(s8.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resume_is_bitwise_exact(setup, tmp_path):
    ds, mesh, arrays = setup
    graphdef, state, cfg = make(total=12, dropout=0.3)
    straight = train.fit(graphdef, state, cfg, arrays, mesh, total_steps=12)

    graphdef, state, cfg = make(total=12, dropout=0.3)
    mngr = train.checkpoint_manager(str(tmp_path / "ckpt"))
    train.fit(graphdef, state, cfg, arrays, mesh, total_steps=6, mngr=mngr)
    graphdef, fresh, cfg = make(total=12, dropout=0.3)  # a new process would start from scratch
    restored = train.restore(train.checkpoint_manager(str(tmp_path / "ckpt")), fresh, mesh)
    assert int(restored.step) == 6
    resumed = train.fit(graphdef, restored, cfg, arrays, mesh, total_steps=12)
    for a, b in zip(leaves(straight), leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path):
    ds, mesh, arrays = setup
    graphdef, state, cfg = make(total=40, lr=1e30)
    mngr = train.checkpoint_manager(str(tmp_path / "ckpt"))
    train.save(mngr, state)
    with pytest.raises(train.NonFiniteLoss, match=r"generation 3.*step \d+"):
        train.fit(graphdef, state, cfg, arrays, mesh, total_steps=40, mngr=mngr,
                  checkpoint_every=1, name="generation 3")
    good = train.restore(train.checkpoint_manager(str(tmp_path / "ckpt")), make()[1], mesh)
    assert all(np.isfinite(x).all() for x in leaves(good.params))


def test_online_teacher_is_frozen_and_changes_the_loss(setup):
    ds, mesh, arrays = setup
    t_graphdef, t_state, _ = make(seed=7)
    teacher = {"params": t_state.params, "rest": t_state.rest}
    before = leaves(teacher)
    t_eval = train.to_eval(t_graphdef, t_state.params, t_state.rest)
    graphdef, state, cfg = make(teacher="online", total=3)
    out = train.fit(graphdef, state, cfg, arrays, mesh, total_steps=3, teacher=teacher,
                    teacher_graphdef=t_eval)
    assert int(out.step) == 3
    for a, b in zip(before, leaves(teacher)):
        np.testing.assert_array_equal(a, b)


def test_evaluate_scores_every_test_example(setup):
    ds, mesh, arrays = setup
    graphdef, state, _ = make()
    got = train.evaluate(graphdef, state.params, state.rest, arrays, len(ds.test_labels), 64, mesh,
                         with_probs=True)
    model = nnx.merge(graphdef, state.params, state.rest)
    model.eval()
    x = (ds.test_images.astype(np.float32) / 255 - ds.mean) / ds.std
    logits = np.asarray(model(jnp.asarray(x)), np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    y = ds.test_labels
    assert len(y) % 64 != 0  # the tail batch is padded and masked
    assert got["probs"].shape == (len(y), 10)
    np.testing.assert_allclose(got["error"], np.mean(logits.argmax(1) != y), atol=1e-9)
    np.testing.assert_allclose(got["nll"], -np.mean(logp[np.arange(len(y)), y]), rtol=1e-4)


def test_bfloat16_compute_trains_with_float32_params_and_tracks_float32(setup):
    ds, mesh, arrays = setup
    runs = {}
    for dtype in ("float32", "bfloat16"):
        graphdef, state, cfg = make(dtype=dtype, total=5)
        runs[dtype] = (graphdef, train.fit(graphdef, state, cfg, arrays, mesh, total_steps=5))
    out = runs["bfloat16"][1]
    assert all(x.dtype == np.float32 for x in leaves(out.params))
    for a, b in zip(leaves(runs["float32"][1].params), leaves(out.params)):
        assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(a) + 1e-3
    scores = {d: train.evaluate(g, s.params, s.rest, arrays, len(ds.test_labels), 64, mesh,
                                dtype=d) for d, (g, s) in runs.items()}
    assert abs(scores["float32"]["error"] - scores["bfloat16"]["error"]) < 0.05
    np.testing.assert_allclose(scores["float32"]["nll"], scores["bfloat16"]["nll"], rtol=0.05)


def test_data_parallel_on_8_devices_matches_1_device():
    code = textwrap.dedent("""
        import jax, numpy as np
        from tests.test_train import make, leaves
        from tests.tiny import device_arrays, digits
        from banjax import data, train
        assert jax.device_count() == 8
        ds = digits()
        out = []
        for devices in (jax.devices()[:1], jax.devices()):
            mesh = data.make_mesh(devices)
            arrays = device_arrays(ds, mesh)
            graphdef, state, cfg = make(total=4)
            state = jax.device_put(state, data.replicated(mesh))
            out.append(train.fit(graphdef, state, cfg, arrays, mesh, total_steps=4))
        assert len(out[1].params["stem"]["kernel"].value.sharding.device_set) == 8
        for a, b in zip(leaves(out[0]), leaves(out[1])):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_step_config_rejects_unknown_teacher_signal(setup):
    ds, mesh, _ = setup
    graphdef, _, cfg = make()
    with pytest.raises(ValueError, match="valid"):
        train.train_step_fn(graphdef, dataclasses.replace(cfg, teacher="oracle"), mesh)


def test_sigint_mid_training_saves_a_checkpoint_and_says_how_to_resume(setup, tmp_path):
    ds, mesh, arrays = setup

    class SignalAt:  # a progress hook that delivers SIGINT to this process at step 3
        def update(self, step, metrics, images):
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    graphdef, state, cfg = make(total=50)
    mngr = train.checkpoint_manager(str(tmp_path / "ckpt"))
    with pytest.raises(train.Interrupted) as info:
        train.fit(graphdef, state, cfg, arrays, mesh, total_steps=50, mngr=mngr,
                  progress=SignalAt(), resume_hint="python main.py --workdir w")
    assert info.value.signum == signal.SIGINT
    assert "Resume with: python main.py --workdir w" in str(info.value)
    saved = mngr.latest_step()
    assert saved is not None and 3 <= saved < 50
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
