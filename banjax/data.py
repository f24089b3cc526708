"""Datasets, augmentation views, batch indices and device placement.

Datasets: ``cifar10`` and ``cifar100`` (tensorflow-datasets random-access data sources, no
TensorFlow at run time) and ``digits`` (scikit-learn's bundled 8x8 digits, offline). Each dataset
is held whole in host memory as uint8 images and int32 labels; ``device_put_dataset`` places it,
replicated, on every device, so a jitted train step gathers its own batch on device.

Preparing CIFAR. Reading needs the dataset prepared in the ``array_record`` format. Preparing it
(a ~170 MB download from cs.toronto.edu, then conversion) needs TensorFlow, which banjax does not
otherwise use, and ``importlib_resources``, which tensorflow-datasets 4.9.10 imports on Python 3.11
without declaring it. Run once, in this virtual environment (tensorflow-cpu 2.21 installs here
without changing any pinned package) or in a separate one with ``tensorflow-datasets==4.9.10``::

    pip install tensorflow-cpu importlib_resources
    tfds build cifar100 --file_format=array_record --data_dir ~/tensorflow_datasets
    tfds build cifar10 --file_format=array_record --data_dir ~/tensorflow_datasets

and pass the same directory as ``data_dir`` (``None`` means tfds' default: ``$TFDS_DATA_DIR``, else
``~/tensorflow_datasets``). TensorFlow is not needed afterwards. A dataset already prepared in the
default TFRecord format cannot be read at random: rebuild it with ``--overwrite`` added. When
TensorFlow is importable, ``load`` tries the preparation itself; otherwise, or if that fails, it
raises ``DatasetNotPrepared`` whose message holds the command for the dataset and directory.

Views: a train-time augmentation is one of a finite set of views (crop offset, flip), named by an
integer id; view 0 is always the identity. CIFAR uses the Wide-ResNet recipe that BAN defers to: pad
4 pixels by reflection (as Zagoruyko's WRN code does), random 32x32 crop, random horizontal flip
(9 * 9 * 2 = 162 views). Digits: pad 1 with zeros (black background), 8x8 crop, no flip (9 views).
"""

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn import datasets as sk_datasets
from sklearn import model_selection

DATASETS = ("cifar10", "cifar100", "digits")
MODES = ("reflect", "constant")
DIGITS_TEST = 360  # fixed, stratified, random_state=0
_READ_CHUNK = 5000  # records decoded per data-source call


class DatasetNotPrepared(RuntimeError):
    """A tfds dataset is not prepared in array_record format; the message holds the command."""


@dataclasses.dataclass(frozen=True)
class ViewSet:
    """Finite set of augmentation views: crop offsets in [0, 2*pad] per axis, optional h-flip."""

    pad: int
    size: int
    flip: bool
    mode: str  # 'reflect' or 'constant' (zero) padding

    def __post_init__(self):
        if self.pad < 0:
            raise ValueError(f"ViewSet pad must be >= 0, got {self.pad}")
        if self.size < 1:
            raise ValueError(f"ViewSet size must be >= 1, got {self.size}")
        if self.mode not in MODES:
            raise ValueError(f"ViewSet mode {self.mode!r} is unknown; valid: {', '.join(MODES)}")
        if self.mode == "reflect" and self.pad >= self.size:
            raise ValueError(
                f"reflect padding needs pad < size, got pad={self.pad} size={self.size}")

    @property
    def num_views(self) -> int:
        """Number of distinct views: (2*pad+1)**2 offsets times 2 if flipping."""
        return (2 * self.pad + 1) ** 2 * (2 if self.flip else 1)

    def decode(self, view_ids):
        """View ids -> (dy, dx, f): crop start in the padded image, flip flag; 0 -> (p, p, 0)."""
        k, nf = 2 * self.pad + 1, 2 if self.flip else 1
        f = view_ids % nf
        o = view_ids // nf
        dy = (o // k + self.pad) % k
        dx = (o % k + self.pad) % k
        return dy, dx, f


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A whole dataset in host memory: uint8 NxHxWxC images, int32 labels, train statistics."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: np.ndarray  # float32 (C,), train split, [0, 1] units
    std: np.ndarray  # float32 (C,)
    views: ViewSet

    @property
    def image_size(self) -> int:
        """Side of the (square) images."""
        return int(self.train_images.shape[1])


def views_for(name: str) -> ViewSet:
    """The augmentation view set of a dataset."""
    _check_name(name)
    if name == "digits":
        return ViewSet(pad=1, size=8, flip=False, mode="constant")
    return ViewSet(pad=4, size=32, flip=True, mode="reflect")


def load(name: str, data_dir: str | None = None) -> Dataset:
    """Loads a dataset by name into host memory (data_dir: tfds data dir, ignored for digits)."""
    _check_name(name)
    if name == "digits":
        (xtr, ytr), (xte, yte), num_classes = _load_digits()
    else:
        (xtr, ytr), (xte, yte), num_classes = _load_tfds(name, data_dir)
    mean, std = channel_stats(xtr)
    return Dataset(name=name, train_images=xtr, train_labels=ytr, test_images=xte,
                   test_labels=yte, num_classes=num_classes, mean=mean, std=std,
                   views=views_for(name))


def channel_stats(images_NxHxWxC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std in [0, 1] units, accumulated in float64."""
    n_chan = images_NxHxWxC.shape[-1]
    s, s2 = np.zeros(n_chan), np.zeros(n_chan)
    for i in range(0, len(images_NxHxWxC), 4096):
        x = images_NxHxWxC[i:i + 4096].reshape(-1, n_chan).astype(np.float64) / 255.0
        s += x.sum(0)
        s2 += (x * x).sum(0)
    count = images_NxHxWxC.size // n_chan
    mean = s / count
    std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is unknown; valid: {', '.join(DATASETS)}")


def _load_digits():
    """sklearn digits as uint8 Nx8x8x1 (round(x*255/16)), fixed stratified 360-image test split."""
    d = sk_datasets.load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    tr, te = model_selection.train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST, stratify=labels, random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    return (images[tr], labels[tr]), (images[te], labels[te]), 10


def _has_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def build_command(name: str, data_dir: str) -> str:
    """The shell command that prepares a tfds dataset for `load`."""
    return (f"pip install tensorflow-cpu importlib_resources && "
            f"tfds build {name} --file_format=array_record --data_dir {data_dir}")


def _load_tfds(name: str, data_dir: str | None):
    """Reads both splits of a prepared tfds image dataset (array_record) into arrays."""
    builder = tfds.builder(name, data_dir=data_dir)
    root = os.fspath(builder.data_dir_root)
    if not builder.is_prepared():
        _prepare(builder, name, root)
    try:
        train_src = builder.as_data_source(split="train")
        test_src = builder.as_data_source(split="test")
    except NotImplementedError as e:
        raise DatasetNotPrepared(
            f"{name} in {root} is prepared in a format without random access; rebuild it with:\n"
            f"  {build_command(name, root)} --overwrite") from e
    num_classes = builder.info.features["label"].num_classes
    return _read_split(train_src), _read_split(test_src), num_classes


def _prepare(builder, name: str, root: str) -> None:
    """Runs tfds preparation when TensorFlow is importable; else raises DatasetNotPrepared."""
    msg = (f"dataset {name} is not prepared (array_record) in {root}. Preparing it needs "
           f"TensorFlow and network access; run:\n  {build_command(name, root)}")
    if not _has_tensorflow():
        raise DatasetNotPrepared(msg)
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # any failure (network, missing package) -> the same clear advice
        raise DatasetNotPrepared(f"{msg}\n(automatic preparation failed: {e!r})") from e


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
    """All records of a random-access source -> (uint8 images NxHxWxC, int32 labels N)."""
    n = len(source)
    images, labels = [], np.empty((n,), np.int32)
    for start in range(0, n, _READ_CHUNK):
        keys = list(range(start, min(start + _READ_CHUNK, n)))
        examples = source.__getitems__(keys)
        images.append(np.stack([np.asarray(e["image"], np.uint8) for e in examples]))
        labels[keys[0]:keys[-1] + 1] = [int(e["label"]) for e in examples]
    return np.concatenate(images), labels


def augment(images_BxHxWxC, view_ids_B, views: ViewSet):
    """Applies one view per image (pad, crop, flip); jittable, keeps shape and dtype."""
    _, h, w, _ = images_BxHxWxC.shape
    if h != views.size or w != views.size:
        raise ValueError(f"images are {h}x{w} but the view set expects {views.size}x{views.size}")
    p = views.pad
    padded = jnp.pad(images_BxHxWxC, ((0, 0), (p, p), (p, p), (0, 0)), mode=views.mode)
    dy_B, dx_B, f_B = views.decode(jnp.asarray(view_ids_B, jnp.int32))

    def one(img_HxWxC, dy, dx, f):
        crop = lax.dynamic_slice(img_HxWxC, (dy, dx, 0), (h, w, img_HxWxC.shape[-1]))
        return jnp.where(f == 1, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, dy_B, dx_B, f_B)


def normalize(images_uint8, mean, std, dtype=jnp.float32):
    """(x/255 - mean)/std per channel, computed in float32 and cast to dtype."""
    x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((x - mean) / std).astype(dtype)


def sample_views(key, n: int, views: ViewSet):
    """n view ids drawn uniformly from the view set, int32 (n,)."""
    return jax.random.randint(key, (n,), 0, views.num_views, dtype=jnp.int32)


def epoch_permutation(key, epoch, n: int):
    """Permutation of range(n) for an epoch: fold_in(key, epoch); epoch may be traced."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), n).astype(jnp.int32)


def train_indices(key, step, batch: int, n: int):
    """Example indices of global train step `step` (may be traced); drops each epoch's remainder."""
    if batch < 1 or batch > n:
        raise ValueError(f"train batch must be in [1, n={n}], got {batch}")
    if isinstance(step, int) and step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    steps_per_epoch = n // batch
    epoch, pos = step // steps_per_epoch, step % steps_per_epoch
    perm = epoch_permutation(key, epoch, n)
    return lax.dynamic_slice(perm, (pos * batch,), (batch,))


def eval_batches(n: int, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(indices int32 (batch,), mask bool (batch,)) covering 0..n-1 once; pad is index 0, False."""
    if n < 1 or batch < 1:
        raise ValueError(f"eval_batches needs n >= 1 and batch >= 1, got n={n} batch={batch}")
    out = []
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch, dtype=np.int32)
        mask = idx < n
        out.append((np.where(mask, idx, 0).astype(np.int32), mask))
    return out


def make_mesh(devices=None) -> Mesh:
    """1-D mesh over `devices` (all by default) with axis 'data'."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device, got none")
    return Mesh(np.array(devices), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the 'data' axis."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """Full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def device_put_dataset(ds: Dataset, mesh: Mesh) -> dict:
    """Images and labels of both splits as jax arrays replicated over the mesh."""
    rep = replicated(mesh)
    names = ("train_images", "train_labels", "test_images", "test_labels")
    return {k: jax.device_put(getattr(ds, k), rep) for k in names}


def check_batch(batch: int, mesh: Mesh) -> None:
    """Raises ValueError unless the global batch is positive and divisible by the device count."""
    n_dev = mesh.devices.size
    if batch < 1 or batch % n_dev:
        raise ValueError(f"global batch {batch} must be a positive multiple of the device count "
                         f"{n_dev}")
