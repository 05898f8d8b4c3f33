"""Input pipelines for the examples and benchmarks (TFDS, with an offline route
for Fashion-MNIST).

Every pipeline is ``tfds.load(..., as_supervised=True) -> map -> batch ->
prefetch``. Images become float32, normalised per channel; labels int32.

Data routes:
    * cifar10, cifar100, imagenet2012: TFDS only, from prepared data in
      ``data_dir``, or prepared from original archives in ``manual_dir``
      (cifar-10-binary.tar.gz, ILSVRC2012_img_{train,val}.tar), or downloaded
      with ``download=True``.
    * fashion_mnist: TFDS if the data is prepared in ``data_dir``; else the four
      original IDX files (``train-images-idx3-ubyte.gz``, ...) of a local copy:
      ``data_dir`` itself, ``data_dir/fashion-mnist``, Debian's
      ``dataset-fashion-mnist`` package (/usr/share/datasets/fashion-mnist) or
      Keras' cache (~/.keras/datasets/fashion-mnist); the environment variable
      ``KERAS_BLPA_IDX_DIRS`` (os.pathsep-separated) replaces the last two;
      else TFDS download with ``download=True``; else a FileNotFoundError
      naming both routes.

TensorFlow and TensorFlow Datasets are imported on first use, so the module
imports on any backend; reading the IDX files into numpy arrays needs neither.
Install them with the extras, e.g. ``pip install "keras_blpa[examples,tensorflow-cpu]"``;
a missing one raises an ImportError naming its extra.
"""

import gzip
import importlib
import os

import numpy as np

from keras_blpa import validation

__all__ = [
    "DATASETS",
    "TEST_SPLITS",
    "check_dataset",
    "cifar_augment",
    "fashion_mnist_source",
    "find_idx_dir",
    "load_fashion_mnist",
    "make_dataset",
    "ten_crop_accuracy",
    "ten_crops",
]

DATASETS = {
    "cifar10": dict(num_classes=10, input_shape=(32, 32, 3)),
    "cifar100": dict(num_classes=100, input_shape=(32, 32, 3)),
    "fashion_mnist": dict(num_classes=10, input_shape=(28, 28, 1)),
    "imagenet2012": dict(num_classes=1000, input_shape=(224, 224, 3)),
}
TEST_SPLITS = {
    "cifar10": "test",
    "cifar100": "test",
    "fashion_mnist": "test",
    "imagenet2012": "validation",
}
# Per-channel statistics of the training sets (0-255 scale).
_MEANS = {
    "cifar10": (125.3, 123.0, 113.9),
    "cifar100": (129.3, 124.1, 112.4),
    "fashion_mnist": (72.9,),
    "imagenet2012": (123.7, 116.3, 103.5),
}
_STDS = {
    "cifar10": (63.0, 62.1, 66.7),
    "cifar100": (68.2, 65.4, 70.4),
    "fashion_mnist": (90.0,),
    "imagenet2012": (58.4, 57.1, 57.4),
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_DEFAULT_IDX_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    os.path.join(os.path.expanduser("~"), ".keras", "datasets", "fashion-mnist"),
)
_CIFAR_PAD = 4
_IMAGENET_SCALE = 256


class _LazyModule:
    """A module imported on first attribute access; if missing, an ImportError naming the extra."""

    def __init__(self, name, install):
        self._name, self._install = name, install

    def __getattr__(self, attr):
        try:
            module = importlib.import_module(self._name)
        except ImportError as error:
            raise ImportError(
                f"keras_blpa.datasets needs {self._name}: pip install {self._install}"
            ) from error
        return getattr(module, attr)


tf = _LazyModule(
    "tensorflow", '"keras_blpa[tensorflow-cpu]" (or "keras_blpa[tensorflow]", the full wheel)'
)
tfds = _LazyModule("tensorflow_datasets", '"keras_blpa[examples]"')


def check_dataset(name):
    """Raises ValueError naming `name` unless it is a supported dataset."""
    return DATASETS[validation.check_choice(name, "dataset", tuple(DATASETS))]


def _normalize(image, name):
    """uint8 image -> float32, per-channel standardised."""
    image = tf.cast(image, tf.float32)
    return (image - tf.constant(_MEANS[name])) / tf.constant(_STDS[name])


def cifar_augment(image):
    """Random translation by up to 4 px (zero padding + random crop) and flip."""
    shape = tf.shape(image)
    padded = tf.pad(image, [[_CIFAR_PAD, _CIFAR_PAD], [_CIFAR_PAD, _CIFAR_PAD], [0, 0]])
    image = tf.image.random_crop(padded, shape)
    return tf.image.random_flip_left_right(image)


def _resize_shorter(image, scale):
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    factor = scale / tf.reduce_min(shape)
    size = tf.cast(tf.math.ceil(shape * factor), tf.int32)
    return tf.image.resize(image, tf.maximum(size, scale))


def _imagenet_train_transform(image, image_size=224):
    """Shorter side to 256, random image_size crop, random flip."""
    image = _resize_shorter(tf.cast(image, tf.float32), _IMAGENET_SCALE * image_size // 224)
    image = tf.image.random_crop(image, [image_size, image_size, 3])
    return tf.image.random_flip_left_right(image)


def ten_crops(image, image_size=224):
    """The 10-crop evaluation at scale 256: 4 corners + centre, and their flips.

    Returns a [10, image_size, image_size, 3] float32 tensor.
    """
    scale = _IMAGENET_SCALE * image_size // 224
    image = _resize_shorter(tf.cast(image, tf.float32), scale)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    s = image_size
    offsets = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), ((h - s) // 2, (w - s) // 2)]
    crops = tf.stack(
        [tf.image.crop_to_bounding_box(image, y, x, s, s) for y, x in offsets]
    )
    return tf.concat([crops, tf.image.flip_left_right(crops)], axis=0)


def _download_config(manual_dir):
    if manual_dir is None:
        return {}
    return {"download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}


def _tfds_load(name, split, data_dir=None, manual_dir=None, download=False, **kwargs):
    """tfds.load(..., as_supervised=True), preparing from manual_dir if given."""
    prepare = download or manual_dir is not None
    return tfds.load(
        name,
        split=split,
        as_supervised=True,
        data_dir=data_dir,
        download=prepare,
        download_and_prepare_kwargs=_download_config(manual_dir) if prepare else None,
        **kwargs,
    )


def _idx_dirs(data_dir):
    dirs = []
    if data_dir:
        dirs += [data_dir, os.path.join(data_dir, "fashion-mnist")]
    env = os.environ.get("KERAS_BLPA_IDX_DIRS")
    dirs += env.split(os.pathsep) if env is not None else list(_DEFAULT_IDX_DIRS)
    return [d for d in dirs if d]


def find_idx_dir(data_dir=None):
    """The first folder holding the four Fashion-MNIST IDX .gz files, or None."""
    names = _IDX_FILES["train"] + _IDX_FILES["test"]
    for folder in _idx_dirs(data_dir):
        if all(os.path.isfile(os.path.join(folder, n)) for n in names):
            return folder
    return None


def _read_idx(path):
    """Reads a (gzipped) IDX file into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise ValueError(
            f"Cannot read the IDX file {path} ({type(e).__name__}: {e}): the file is "
            "truncated or damaged; reinstall or re-download it"
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"Not an unsigned-byte IDX file: {path}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"Truncated IDX file: {path} (expected shape {dims})")
    return array.reshape(dims)


def _fashion_from_idx(folder, split):
    images_file, labels_file = _IDX_FILES[split]
    images = _read_idx(os.path.join(folder, images_file))[..., None]
    labels = _read_idx(os.path.join(folder, labels_file)).astype(np.int64)
    return images, labels


def _no_route_error(data_dir):
    return FileNotFoundError(
        "No Fashion-MNIST data found. Route 1 (TFDS, the [examples] extra): prepare "
        "it with tensorflow_datasets in data_dir (or pass download=True / --download "
        "where the network is reachable). Route 2 (local IDX files): put "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in data_dir, "
        "or install Debian's dataset-fashion-mnist package "
        "(apt-get install dataset-fashion-mnist), or copy them to "
        "~/.keras/datasets/fashion-mnist. Searched: "
        f"data_dir={data_dir!r}, IDX folders={_idx_dirs(data_dir)}"
    )


def fashion_mnist_source(data_dir=None, download=False):
    """Which route `load_fashion_mnist` would take: ("tfds", None) or ("idx", folder).

    Raises:
        FileNotFoundError: naming both routes when neither has the data.
    """
    try:
        tfds.load("fashion_mnist", split="test[:1]", data_dir=data_dir, download=False)
        return "tfds", None
    except Exception:  # Not prepared (DatasetNotFoundError, AssertionError...) or no TFDS.
        pass
    folder = find_idx_dir(data_dir)
    if folder is not None:
        return "idx", folder
    if download:
        return "tfds", None
    raise _no_route_error(data_dir)


def load_fashion_mnist(data_dir=None, download=False, as_numpy=True):
    """Fashion-MNIST through TFDS or, offline, from local IDX files.

    Args:
        data_dir: TFDS data dir, also searched for the IDX files.
        download: let TFDS download and prepare the data if no local route works.
        as_numpy: if True return numpy arrays, else unbatched tf.data datasets of
            ``(uint8 image [28, 28, 1], int64 label)``.

    Returns:
        ``((x_train, y_train), (x_test, y_test))`` with x uint8 of shape
        (N, 28, 28, 1) and y int64 of shape (N,) (60000 / 10000 examples for the
        real data); or ``(train_ds, test_ds)`` with ``as_numpy=False``.

    Raises:
        FileNotFoundError: if neither route has the data (the message names both).

    Example:
    >>> (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    """
    route, folder = fashion_mnist_source(data_dir, download)
    if route == "idx":
        splits = [_fashion_from_idx(folder, s) for s in ("train", "test")]
        if as_numpy:
            return tuple(splits)
        return tuple(tf.data.Dataset.from_tensor_slices(s) for s in splits)
    out = []
    for split in ("train", "test"):
        ds = _tfds_load("fashion_mnist", split, data_dir, download=download)
        if as_numpy:
            ds = ds.batch(4096)
            parts = list(tfds.as_numpy(ds))
            images = np.concatenate([p[0] for p in parts]).astype(np.uint8)
            labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
            out.append((images, labels))
        else:
            out.append(ds)
    return tuple(out)


def _raw_dataset(name, split, data_dir, manual_dir, download, shuffle_files):
    """Unbatched (image, label) dataset of one split."""
    if name == "fashion_mnist":
        validation.check_choice(split, "split", ("train", "test"))
        route, folder = fashion_mnist_source(data_dir, download)
        if route == "idx":
            return tf.data.Dataset.from_tensor_slices(_fashion_from_idx(folder, split))
    try:
        return _tfds_load(
            name,
            split,
            data_dir,
            manual_dir,
            download,
            shuffle_files=shuffle_files,
        )
    except ImportError:  # a missing package, not missing data
        raise
    except Exception as error:  # TFDS raises several types for missing data.
        if isinstance(error, (ValueError, TypeError)) and "split" in str(error).lower():
            raise
        raise FileNotFoundError(
            f"Could not load {name!r} split {split!r} with TFDS: {error}. Prepare it "
            "in data_dir (--data_dir), put the original archives in manual_dir "
            "(--manual_dir) or allow the download (--download)."
        ) from error


def make_dataset(
    name,
    split,
    batch_size,
    training=False,
    data_dir=None,
    manual_dir=None,
    download=False,
    image_size=224,
    shuffle_buffer=10000,
    ten_crop=False,
    take=None,
    seed=None,
):
    """A batched, prefetched tf.data pipeline for one split.

    Args:
        name: "cifar10", "cifar100", "fashion_mnist" or "imagenet2012".
        split: TFDS split name ("train", "test", "validation", "train[:10%]").
        batch_size: global batch size.
        training: shuffle, augment (CIFAR: translation by up to 4 px + flip;
            ImageNet: random crop + flip) and repeat, dropping the last
            partial batch.
        data_dir, manual_dir, download: data routes (module docstring).
        image_size: ImageNet crop size.
        ten_crop: ImageNet evaluation with 10 crops at scale 256; images come
            as [10, size, size, 3] (see `ten_crop_accuracy`).
        take: keep only the first `take` examples (smoke runs).
        seed: shuffle / augmentation seed.

    Returns:
        A tf.data.Dataset of (images float32, labels int32).
    """
    check_dataset(name)
    ds = _raw_dataset(name, split, data_dir, manual_dir, download, training)
    if take is not None:
        ds = ds.take(take)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed).repeat()

    def transform(image, label):
        if name == "imagenet2012":
            if training:
                image = _imagenet_train_transform(image, image_size)
            elif ten_crop:
                image = ten_crops(image, image_size)
            else:
                image = tf.image.resize_with_crop_or_pad(
                    _resize_shorter(tf.cast(image, tf.float32), _IMAGENET_SCALE * image_size // 224),
                    image_size,
                    image_size,
                )
        elif training and name in ("cifar10", "cifar100"):
            image = cifar_augment(image)
        return _normalize(image, name), tf.cast(label, tf.int32)

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training)
    return ds.prefetch(tf.data.AUTOTUNE)


def ten_crop_accuracy(model, dataset):
    """Top-1 accuracy averaging the predictions of the 10 crops of each image.

    Args:
        model: a classifier taking [N, size, size, 3].
        dataset: batches of ([B, 10, size, size, 3], [B]) from
            ``make_dataset(..., ten_crop=True)``.
    """
    correct, total = 0, 0
    for images, labels in dataset:
        b = tf.shape(images)[0]
        flat = tf.reshape(images, tf.concat([[-1], tf.shape(images)[2:]], 0))
        probs = model(flat, training=False)
        probs = tf.reduce_mean(tf.reshape(probs, [b, 10, -1]), axis=1)
        predicted = tf.cast(tf.argmax(probs, axis=-1), tf.int32)
        correct += int(tf.reduce_sum(tf.cast(predicted == labels, tf.int32)))
        total += int(b)
    return correct / max(total, 1)
