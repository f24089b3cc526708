"""Tests for banjax.data against independent NumPy references."""

import itertools
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets
from tensorflow_datasets.testing import mocking as tfds_mocking

from banjax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ref_view(img_HxWxC, dy, dx, f, pad, mode):
    """NumPy reference: pad, crop at (dy, dx) in the padded image, flip horizontally if f."""
    h, w, _ = img_HxWxC.shape
    padded = np.pad(img_HxWxC, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    crop = padded[dy:dy + h, dx:dx + w]
    return crop[:, ::-1] if f else crop


def ref_decode(vid, pad, flip):
    """Reference of the documented id encoding: id = (oy*k + ox)*F + f, shift = (o + pad) % k."""
    k, nf = 2 * pad + 1, 2 if flip else 1
    f, o = vid % nf, vid // nf
    oy, ox = divmod(o, k)
    return (oy + pad) % k, (ox + pad) % k, f


def all_views(img, views):
    batch = np.broadcast_to(img, (views.num_views,) + img.shape)
    ids = np.arange(views.num_views, dtype=np.int32)
    return np.asarray(jax.jit(data.augment, static_argnums=2)(batch, ids, views))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("test tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------- tfds datasets


def _mock_getitems(record_keys, generator, serialized=False):
    """tfds 4.9.10's mock binds its batched reader without `self`; this one takes none."""
    assert not serialized
    return [generator[k] for k in record_keys]


@pytest.mark.parametrize("name,num_classes", [("cifar100", 100), ("cifar10", 10)])
def test_cifar_under_mock(monkeypatch, no_network, name, num_classes):
    monkeypatch.setattr(data, "_has_tensorflow", lambda: True)  # mocked prepare is a no-op
    monkeypatch.setattr(tfds_mocking, "_getitems", _mock_getitems)
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load(name)
    assert ds.train_images.shape == (12, 32, 32, 3) and ds.test_images.shape == (12, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.train_labels.shape == (12,)
    assert ds.test_labels.dtype == np.int32
    assert ds.num_classes == num_classes and ds.image_size == 32
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < num_classes
    assert ds.views.num_views == 162 and ds.views.mode == "reflect" and ds.views.flip
    x = ds.train_images.astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, x.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(ds.std, x.std((0, 1, 2)), rtol=1e-5)
    assert ds.mean.dtype == np.float32 and ds.std.shape == (3,)


def test_not_prepared_without_tensorflow(tmp_path, monkeypatch, no_network):
    def never(*args, **kwargs):
        raise AssertionError("download_and_prepare must not run without TensorFlow")
    monkeypatch.setattr(data, "_has_tensorflow", lambda: False)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", never)
    with pytest.raises(data.DatasetNotPrepared) as err:
        data.load("cifar100", data_dir=str(tmp_path))
    msg = str(err.value)
    assert "tfds build cifar100 --file_format=array_record" in msg
    assert f"--data_dir {tmp_path}" in msg and "pip install tensorflow-cpu" in msg
    assert isinstance(err.value, RuntimeError)


def test_not_prepared_when_preparation_fails(tmp_path, monkeypatch, no_network):
    def fail(*args, **kwargs):
        raise OSError("offline")
    monkeypatch.setattr(data, "_has_tensorflow", lambda: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    with pytest.raises(data.DatasetNotPrepared, match="tfds build cifar10 ") as err:
        data.load("cifar10", data_dir=str(tmp_path))
    assert isinstance(err.value.__cause__, OSError)


def test_wrong_file_format_advises_overwrite(monkeypatch, no_network):
    def no_random_access(*args, **kwargs):
        raise NotImplementedError("tfrecord")
    monkeypatch.setattr(data, "_has_tensorflow", lambda: True)
    with tfds.testing.mock_data(as_data_source_fn=no_random_access):
        with pytest.raises(data.DatasetNotPrepared, match="--overwrite"):
            data.load("cifar10")


def test_unknown_name():
    with pytest.raises(ValueError, match="cifar10, cifar100, digits"):
        data.load("mnist")


# ---------------------------------------------------------------- digits


def test_digits():
    ds = data.load("digits")
    n_tr, n_te = len(ds.train_labels), len(ds.test_labels)
    assert n_tr + n_te == 1797 and n_te == data.DIGITS_TEST
    assert ds.train_images.shape == (n_tr, 8, 8, 1) and ds.test_images.shape == (n_te, 8, 8, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.num_classes == 10 and ds.image_size == 8 and ds.views.num_views == 9
    # Stratified: each class's test count is within 1 of its proportional share.
    all_labels = np.concatenate([ds.train_labels, ds.test_labels])
    for c in range(10):
        share = n_te * np.mean(all_labels == c)
        assert abs(np.sum(ds.test_labels == c) - share) <= 1
    # Same images as sklearn's, converted round(x*255/16), up to order.
    sk = sk_datasets.load_digits()
    ref = np.concatenate([sk.target[:, None], np.round(sk.images * 255 / 16).reshape(-1, 64)], 1)
    got = np.concatenate([all_labels[:, None], np.concatenate(
        [ds.train_images, ds.test_images]).reshape(-1, 64)], 1)
    canon = lambda a: a[np.lexsort(a.T[::-1])]
    np.testing.assert_array_equal(canon(got.astype(np.int64)), canon(ref.astype(np.int64)))
    # Deterministic.
    again = data.load("digits")
    for k in ("train_images", "train_labels", "test_images", "test_labels", "mean", "std"):
        np.testing.assert_array_equal(getattr(ds, k), getattr(again, k))
    x = ds.train_images.astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, x.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(ds.std, x.std((0, 1, 2)), rtol=1e-6)


# ---------------------------------------------------------------- views


@pytest.mark.parametrize("name", ["cifar10", "digits"])
def test_all_views_match_reference(name):
    views = data.views_for(name)
    rng = np.random.default_rng(0)
    s, c = views.size, 3 if name == "cifar10" else 1
    img = rng.integers(0, 256, (s, s, c), dtype=np.uint8)
    out = all_views(img, views)
    assert out.shape == (views.num_views, s, s, c) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], img)  # view 0 is the identity
    assert len({v.tobytes() for v in out}) == views.num_views  # pairwise distinct
    for vid in range(views.num_views):
        dy, dx, f = ref_decode(vid, views.pad, views.flip)
        np.testing.assert_array_equal(out[vid], ref_view(img, dy, dx, f, views.pad, views.mode))
    # Independent of the id encoding: the views are exactly every offset x flip crop.
    flips = (0, 1) if views.flip else (0,)
    k = 2 * views.pad + 1
    expected = {ref_view(img, dy, dx, f, views.pad, views.mode).tobytes()
                for dy, dx, f in itertools.product(range(k), range(k), flips)}
    assert {v.tobytes() for v in out} == expected


def test_view_counts_and_modes():
    cifar, digits = data.views_for("cifar100"), data.views_for("digits")
    assert (cifar.pad, cifar.size, cifar.flip, cifar.mode, cifar.num_views) == (
        4, 32, True, "reflect", 162)
    assert (digits.pad, digits.size, digits.flip, digits.mode, digits.num_views) == (
        1, 8, False, "constant", 9)
    dy, dx, f = cifar.decode(np.arange(162))
    assert (dy[0], dx[0], f[0]) == (4, 4, 0)
    assert len(set(zip(dy.tolist(), dx.tolist(), f.tolist(), strict=True))) == 162
    with pytest.raises(ValueError, match="reflect, constant"):
        data.ViewSet(pad=1, size=8, flip=False, mode="edge")
    with pytest.raises(ValueError, match="pad"):
        data.ViewSet(pad=-1, size=8, flip=False, mode="constant")


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augment_jit_mixed_batch(dtype):
    views = data.views_for("cifar10")
    rng = np.random.default_rng(1)
    ids = np.array([0, 1, 17, 80, 161, 100], np.int32)
    imgs = rng.integers(0, 256, (len(ids), 32, 32, 3)).astype(dtype)
    out = np.asarray(jax.jit(data.augment, static_argnums=2)(imgs, jnp.asarray(ids), views))
    assert out.dtype == dtype and out.shape == imgs.shape
    for i, vid in enumerate(ids):
        dy, dx, f = ref_decode(int(vid), 4, True)
        np.testing.assert_array_equal(out[i], ref_view(imgs[i], dy, dx, f, 4, "reflect"))
    with pytest.raises(ValueError, match="32x32"):
        data.augment(imgs[:, :16], jnp.asarray(ids), views)


def test_normalize():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    mean, std = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3], np.float32)
    ref = (x.astype(np.float64) / 255 - mean) / std
    out = data.normalize(x, mean, std)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    out16 = data.normalize(x, mean, std, jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), ref, rtol=1e-2, atol=1e-2)


def test_sample_views_uniform():
    views = data.views_for("cifar10")
    draws = np.asarray(data.sample_views(jax.random.key(0), 162 * 200, views))
    assert draws.dtype == np.int32 and draws.shape == (162 * 200,)
    counts = np.bincount(draws, minlength=162)
    assert len(counts) == 162 and counts.min() > 0
    chi2 = np.sum((counts - 200.0) ** 2 / 200.0)  # 161 dof: mean 161, sd ~18
    assert chi2 < 161 + 6 * 18


# ---------------------------------------------------------------- batching


def test_eval_batches_odd():
    batches = data.eval_batches(37, 8)
    assert len(batches) == 5
    for idx, mask in batches:
        assert idx.shape == (8,) and idx.dtype == np.int32 and mask.dtype == bool
        assert np.all(idx[~mask] == 0)
    seen = np.concatenate([idx[mask] for idx, mask in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(37))
    assert len(seen) == 37
    assert batches[-1][1].tolist() == [True] * 5 + [False] * 3
    with pytest.raises(ValueError, match="batch"):
        data.eval_batches(37, 0)


def test_epoch_permutation_and_train_indices():
    key, n, batch = jax.random.key(3), 37, 8
    p0 = np.asarray(data.epoch_permutation(key, 0, n))
    assert p0.dtype == np.int32
    np.testing.assert_array_equal(np.sort(p0), np.arange(n))
    np.testing.assert_array_equal(p0, np.asarray(data.epoch_permutation(key, 0, n)))
    p1 = np.asarray(data.epoch_permutation(key, 1, n))
    assert not np.array_equal(p0, p1)
    steps = [np.asarray(data.train_indices(key, s, batch, n)) for s in range(4)]
    assert all(s.shape == (batch,) and s.dtype == np.int32 for s in steps)
    flat = np.concatenate(steps)
    assert len(np.unique(flat)) == 4 * batch  # disjoint within the epoch
    np.testing.assert_array_equal(flat, p0[:4 * batch])  # last partial batch dropped
    np.testing.assert_array_equal(np.asarray(data.train_indices(key, 4, batch, n)), p1[:batch])
    jitted = jax.jit(data.train_indices, static_argnums=(2, 3))
    for s in (0, 3, 4, 9):
        np.testing.assert_array_equal(np.asarray(jitted(key, jnp.int32(s), batch, n)),
                                      np.asarray(data.train_indices(key, s, batch, n)))
    with pytest.raises(ValueError, match="batch"):
        data.train_indices(key, 0, 40, n)


# ---------------------------------------------------------------- devices


def test_mesh_single_process():
    mesh = data.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    data.check_batch(8 * jax.device_count(), mesh)
    with pytest.raises(ValueError, match="device count"):
        data.check_batch(0, mesh)
    with pytest.raises(ValueError, match="at least one device"):
        data.make_mesh([])


def test_mesh_eight_fake_devices():
    script = textwrap.dedent("""
        import jax, numpy as np
        from banjax import data
        mesh = data.make_mesh()
        assert mesh.devices.shape == (8,) and mesh.axis_names == ('data',)
        data.check_batch(16, mesh)
        for bad in (12, 4, 0):
            try:
                data.check_batch(bad, mesh)
                raise SystemExit(f'no error for {bad}')
            except ValueError as e:
                assert str(bad) in str(e) and '8' in str(e)
        x = jax.device_put(np.arange(16 * 3).reshape(16, 3), data.batch_sharding(mesh))
        assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
        ds = data.load('digits')
        arrs = data.device_put_dataset(ds, mesh)
        assert sorted(arrs) == ['test_images', 'test_labels', 'train_images', 'train_labels']
        for k, v in arrs.items():
            assert v.sharding.is_fully_replicated and len(v.addressable_shards) == 8
            np.testing.assert_array_equal(np.asarray(v), getattr(ds, k))
        sub = data.make_mesh(jax.devices()[:2])
        assert sub.devices.size == 2
        print('OK')
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
