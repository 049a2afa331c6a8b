"""Data sources: `npz` arrays, TFDS builders, class-per-folder images, synthetic images.

Every source yields uint8 RGB images with integer labels; `ekg_tf.data.pipeline`
turns them into normalised, augmented, per-replica batches.

- `npz`: a file with arrays `x` (uint8 [N,H,W,3]) and `y` ([N]), as in ../shared/data.
- `tfds`: the real TFDS builders (`cifar10`, `cifar100`, `imagenet2012` with a
  manual dir holding the ILSVRC tars). Needs network access or a prepared
  `data.tfds_data_dir`.
- `folder`: `<path>/<class_name>/*.{png,jpg,jpeg}`; classes sorted by name.
- `digits`: scikit-learn's bundled handwritten digits (1,797 real 8x8 greyscale scans,
  10 classes, installed with scikit-learn: no download), scaled to 0..255, resized to
  `data.image_size` and repeated over 3 channels; a fixed stratified split, 20% of each
  class for the test split (359 images), the rest for training (1,438). The quickstart's
  real data.
- `synthetic`: deterministic generated images (class-dependent colour blobs and
  stripes plus noise). Only for fast tests; not real data.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from ekg_tf.errors import UserError

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000, "imagenet": 1000,
               "synthetic": 10, "digits": 10}
SOURCES = ("npz", "tfds", "folder", "digits", "synthetic")
DIGITS_TEST_FRACTION = 0.2
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")


class DataError(UserError):
    """A data configuration or file problem, with what to do about it."""


@dataclasses.dataclass
class ArraySplit:
    """An in-memory split: uint8 images [N,H,W,3] and int64 labels [N]."""
    x: np.ndarray
    y: np.ndarray

    def __len__(self):
        return len(self.y)

    def subset(self, indices) -> "ArraySplit":
        return ArraySplit(self.x[indices], self.y[indices])


def num_classes_for(data_cfg) -> int:
    if data_cfg.get("num_classes"):
        return int(data_cfg.num_classes)
    try:
        return NUM_CLASSES[data_cfg.name]
    except KeyError:
        raise DataError(f"unknown dataset name {data_cfg.name!r}: set data.num_classes") from None


def _check_source(data_cfg):
    if data_cfg.source not in SOURCES:
        raise DataError(f"unknown data.source {data_cfg.source!r}; choose one of {SOURCES}")


def split_path(data_cfg, split: str) -> str:
    path = data_cfg.train_path if split == "train" else data_cfg.test_path
    if not path:
        raise DataError(f"data.{split}_path is not set (data.source={data_cfg.source!r} "
                        "needs a file or folder for each split)")
    if not os.path.exists(path):
        raise DataError(f"data.{split}_path {path!r} does not exist")
    return path


def load_npz(path: str) -> ArraySplit:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files or "y" not in f.files:
                raise DataError(f"{path}: an npz data file needs arrays 'x' and 'y', "
                                f"found {f.files}")
            x, y = f["x"], f["y"]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise DataError(f"{path}: 'x' must be uint8 [N,H,W,3], got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],):
        raise DataError(f"{path}: 'y' must have shape ({x.shape[0]},), got {y.shape}")
    return ArraySplit(x, y.astype(np.int64))


def synthetic_split(num_examples: int, num_classes: int = 10, image_size: int = 32,
                    seed: int = 0) -> ArraySplit:
    """Deterministic, learnable generated images: class k = a colour and stripe pattern."""
    rng = np.random.default_rng(seed)
    y = np.arange(num_examples) % num_classes
    rng.shuffle(y)
    class_rng = np.random.default_rng(12345)
    colors = class_rng.uniform(40, 215, size=(num_classes, 3))
    freqs = class_rng.integers(1, 5, size=(num_classes, 2))
    yy, xx = np.meshgrid(np.arange(image_size), np.arange(image_size), indexing="ij")
    x = np.empty((num_examples, image_size, image_size, 3), np.uint8)
    for i, k in enumerate(y):
        phase = rng.uniform(0, 2 * np.pi)
        stripes = np.sin(2 * np.pi * (freqs[k, 0] * xx + freqs[k, 1] * yy) / image_size + phase)
        img = colors[k][None, None, :] + 40 * stripes[..., None]
        img += rng.normal(0, 20, size=img.shape)
        x[i] = np.clip(img, 0, 255).astype(np.uint8)
    return ArraySplit(x, y.astype(np.int64))


def digits_split(split: str, image_size: int = 32) -> ArraySplit:
    """scikit-learn's handwritten digits as uint8 RGB [N, size, size, 3] (see the module
    docstring); the same split every time (20% of each class, seed 0, for testing)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data.source=digits needs scikit-learn (pip install scikit-learn)") \
            from None
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), bool)
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        test[idx[:int(round(DIGITS_TEST_FRACTION * len(idx)))]] = True
    pick = np.flatnonzero(test if split == "test" else ~test)
    pixels = np.round(digits.images[pick] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    size = int(image_size)
    if pixels.shape[1] != size:
        pixels = tf.cast(tf.round(tf.image.resize(pixels, [size, size], method="bilinear")),
                         tf.uint8).numpy()
    return ArraySplit(np.repeat(pixels, 3, axis=-1), labels[pick])


def load_folder(path: str, image_size: int | None = None) -> ArraySplit:
    """Reads `<path>/<class>/*.png|jpg` into memory (for small, CIFAR-sized sets)."""
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise DataError(f"{path}: no class sub-folders found (expected <path>/<class>/<images>)")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for fname in sorted(os.listdir(os.path.join(path, cls))):
            if not fname.lower().endswith(_IMAGE_EXTS):
                continue
            data = tf.io.read_file(os.path.join(path, cls, fname))
            img = tf.io.decode_image(data, channels=3, expand_animations=False)
            if image_size:
                img = tf.cast(tf.image.resize(img, [image_size, image_size]), tf.uint8)
            images.append(img.numpy())
            labels.append(label)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(_IMAGE_EXTS)}) in its class folders")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"{path}: images have different sizes {sorted(shapes)[:3]}; "
                        "set data.image_size to resize them")
    return ArraySplit(np.stack(images), np.asarray(labels, np.int64))


_DOWNLOAD_HOSTS = {"cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu"}


def _host_resolves(host: str, timeout: float = 5.0) -> bool:
    import concurrent.futures
    import socket
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout)
        return True
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def tfds_builder(data_cfg):
    """The real TFDS builder, prepared (downloads unless data is already in tfds_data_dir)."""
    import tensorflow_datasets as tfds
    kwargs = {}
    if data_cfg.get("tfds_data_dir"):
        kwargs["data_dir"] = data_cfg.tfds_data_dir
    try:
        builder = tfds.builder(data_cfg.name, **kwargs)
    except Exception as e:
        raise DataError(f"TFDS has no dataset {data_cfg.name!r} ({e})") from None
    download_config = None
    if data_cfg.get("tfds_manual_dir"):
        download_config = tfds.download.DownloadConfig(manual_dir=data_cfg.tfds_manual_dir)
    try:
        if not builder.is_prepared():
            host = _DOWNLOAD_HOSTS.get(data_cfg.name)
            # Without network, TFDS retries name resolution for minutes; fail fast instead.
            if host and not _host_resolves(host):
                raise ConnectionError(f"cannot resolve {host}, where TFDS downloads "
                                      f"{data_cfg.name!r} from")
        builder.download_and_prepare(download_config=download_config)
    except Exception as e:
        raise DataError(
            f"could not prepare TFDS dataset {data_cfg.name!r}: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}\n"
            "  This machine may have no network access. Options: use "
            "--config.data.source=npz with --config.data.train_path/--config.data.test_path "
            "pointing at .npz files (arrays x uint8 [N,H,W,3], y [N]); or "
            "--config.data.source=folder with class-per-subfolder images; or point "
            "--config.data.tfds_data_dir at an already prepared TFDS directory "
            "(for imagenet2012 also --config.data.tfds_manual_dir at the ILSVRC tars)."
        ) from None
    return builder


def tfds_split_name(data_cfg, split: str) -> str:
    if split == "train":
        return "train"
    return "validation" if data_cfg.name.startswith("imagenet") else "test"


def raw_dataset(data_cfg, split: str, shuffle_files: bool = False):
    """(uint8 image, int64 label) pairs of a split, plus the number of examples."""
    _check_source(data_cfg)
    if data_cfg.source == "tfds":
        builder = tfds_builder(data_cfg)
        name = tfds_split_name(data_cfg, split)
        ds = builder.as_dataset(split=name, shuffle_files=shuffle_files, as_supervised=True)
        ds = ds.map(lambda x, y: (x, tf.cast(y, tf.int64)))
        return ds, builder.info.splits[name].num_examples
    arrays = load_arrays(data_cfg, split)
    return tf.data.Dataset.from_tensor_slices((arrays.x, arrays.y)), len(arrays)


def load_arrays(data_cfg, split: str) -> ArraySplit:
    """A whole split in memory (npz, digits, synthetic, folder; tfds for CIFAR-sized sets)."""
    _check_source(data_cfg)
    if data_cfg.source == "npz":
        arrays = load_npz(split_path(data_cfg, split))
    elif data_cfg.source == "synthetic":
        n = data_cfg.synthetic_train_size if split == "train" else data_cfg.synthetic_test_size
        arrays = synthetic_split(n, num_classes_for(data_cfg), data_cfg.image_size,
                                 seed=0 if split == "train" else 1)
    elif data_cfg.source == "folder":
        arrays = load_folder(split_path(data_cfg, split), data_cfg.get("image_size"))
    elif data_cfg.source == "digits":
        arrays = digits_split(split, data_cfg.image_size)
    else:
        if data_cfg.name.startswith("imagenet"):
            raise DataError("imagenet2012 is too large to load into memory; "
                            "use the streaming pipeline")
        import tensorflow_datasets as tfds
        builder = tfds_builder(data_cfg)
        x, y = tfds.as_numpy(builder.as_dataset(split=tfds_split_name(data_cfg, split),
                                                batch_size=-1, as_supervised=True))
        arrays = ArraySplit(np.asarray(x, np.uint8), np.asarray(y, np.int64))
    n_cls = num_classes_for(data_cfg)
    if len(arrays) == 0:
        raise DataError(f"the {split} split of {data_cfg.source}:{data_cfg.name} is empty")
    if arrays.y.min() < 0 or arrays.y.max() >= n_cls:
        raise DataError(f"{split} labels range {arrays.y.min()}..{arrays.y.max()} does not fit "
                        f"{n_cls} classes of {data_cfg.name!r}")
    return arrays


def reference_split_indices(labels: np.ndarray, per_class: int, from_end: bool):
    """Indices of the first (or last) `per_class` images of each class, in data order.

    The reference takes the last 32 of each class (validation) and the first 256
    of each class (adaptation pass) from the training split.
    """
    labels = np.asarray(labels)
    out = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        out.append(idx[-per_class:] if from_end else idx[:per_class])
    return np.sort(np.concatenate(out))
