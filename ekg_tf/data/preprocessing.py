"""Normalisation and augmentation, as the reference does them.

CIFAR-10 ("reference" normalisation): `(x - [113.9, 123.0, 125.3]) / [66.7, 62.1, 63.0]`
on uint8 RGB in stored order; CIFAR-100: `[112, 124, 129] / [70, 65, 68]`.
Training augmentation: random horizontal flip + random 32x32 crop of the
4-pixel reflect-padded image; distillation views also jitter brightness (0.2),
contrast and saturation (0.8-1.2). ImageNet: the usual Inception-style random
resized crop + flip for training, resize 256 + centre crop 224 for evaluation,
mean/std normalisation in RGB.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from ekg_tf.config import APPLICATIONS_PREFIX
from ekg_tf.errors import UserError

NORMALIZATION = {
    "cifar10": ((113.9, 123.0, 125.3), (66.7, 62.1, 63.0)),
    "cifar100": ((112.0, 124.0, 129.0), (70.0, 65.0, 68.0)),
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "imagenet2012": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    # scikit-learn's digits (0..255 greyscale on 3 channels), training-split statistics.
    "digits": ((77.9, 77.9, 77.9), (82.5, 82.5, 82.5)),
    # Generated images of the tests share CIFAR's statistics.
    "synthetic": ((113.9, 123.0, 125.3), (66.7, 62.1, 63.0)),
}


@dataclasses.dataclass(frozen=True)
class Normalization:
    """`(x[..., order] - mean) / std` per channel on RGB pixels 0..255; `bgr` reverses the
    channel order first (the 'caffe' preprocessing of keras.applications ResNet/VGG)."""
    mean: tuple
    std: tuple
    bgr: bool = False

    def __call__(self, images):
        x = tf.cast(images, tf.float32)
        if self.bgr:
            x = x[..., ::-1]
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def numpy(self, images) -> np.ndarray:
        x = np.asarray(images, np.float32)
        if self.bgr:
            x = x[..., ::-1]
        return ((x - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)


def application_normalization(name: str) -> Normalization:
    """The preprocessing of a keras.applications model ('keras.applications.MobileNetV2' or
    its module 'keras.applications.mobilenet_v2'), read off its `preprocess_input` (which
    is a per-channel affine map, possibly after reversing the channel order)."""
    import keras
    attr = name[len(APPLICATIONS_PREFIX):] if name.startswith(APPLICATIONS_PREFIX) else name
    target = getattr(keras.applications, attr, None)
    if callable(target) and not hasattr(target, "preprocess_input"):  # a model constructor
        target = getattr(keras.applications, target.__module__.rsplit(".", 1)[-1], None)
    if target is None or not hasattr(target, "preprocess_input"):
        raise UserError(f"no preprocessing known for {name!r}: keras.applications has no "
                         f"model or module {attr!r} with a preprocess_input")
    probe = np.zeros((4, 1, 1, 3), np.float32)
    for c in range(3):
        probe[c + 1, 0, 0, c] = 100.0
    out = np.asarray(target.preprocess_input(probe.copy()), np.float64).reshape(4, 3)
    base, moves = out[0], out[1:] - out[0]  # moves[i, j]: input channel i -> output j
    order = np.argmax(np.abs(moves), axis=1)
    bgr = order.tolist() == [2, 1, 0]
    if not (bgr or order.tolist() == [0, 1, 2]):
        raise UserError(f"{name}: preprocess_input is not a per-channel affine map")
    std = 100.0 / np.array([moves[order.tolist().index(j), j] for j in range(3)])
    mean = -base * std
    # preprocess_input computes in float32: round off its rounding (127.4999979 -> 127.5)
    return Normalization(tuple(round(float(m), 4) + 0.0 for m in mean),
                         tuple(round(float(v), 4) for v in std), bgr)


def normalization_for(name: str) -> Normalization:
    """A dataset's normalisation (`cifar10`, ...), `keras.applications.<Model or module>`
    (the application's own preprocessing) or `none` (pixels as they are, 0..255)."""
    if name in ("none", "identity"):
        return Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    if name.startswith(APPLICATIONS_PREFIX):
        return application_normalization(name)
    try:
        mean, std = NORMALIZATION[name]
    except KeyError:
        raise UserError(f"no normalisation known for {name!r}; known: {sorted(NORMALIZATION)}"
                         f", 'none', or '{APPLICATIONS_PREFIX}<Model>'") from None
    return Normalization(tuple(float(m) for m in mean), tuple(float(s) for s in std))


def normalize(images, name: str):
    """uint8 (or float 0..255) RGB -> normalised float32."""
    return normalization_for(name)(images)


def cifar_augment(image, seed, flip: bool = True):
    """Random flip (unless `flip` is off: digits are not mirror-symmetric) + random crop of
    the 4-pixel reflect-padded image (stateless, `seed` [2])."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode="REFLECT")
    return tf.image.stateless_random_crop(padded, tf.shape(image), seeds[1])


def color_jitter(image, seed):
    """Brightness +-0.2 (of the 0..1 range), contrast and saturation x0.8-1.2; 0..255 floats."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    image = tf.cast(image, tf.float32) / 255.0
    image = tf.image.stateless_random_brightness(image, 0.2, seeds[0])
    image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seeds[1])
    image = tf.image.stateless_random_saturation(image, 0.8, 1.2, seeds[2])
    return tf.clip_by_value(image, 0.0, 1.0) * 255.0


def imagenet_train_preprocess(image, seed, size=224):
    """Random-resized crop (area 8-100%, aspect 3/4-4/3) + flip; returns float 0..255."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=bbox, seed=seeds[0], min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
    image = tf.image.resize(image, [size, size], method="bilinear")
    return tf.image.stateless_random_flip_left_right(image, seeds[1])
def imagenet_eval_preprocess(image, size=224):
    """Resize the short side to size/0.875 and centre-crop `size`; returns float 0..255."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / 0.875) / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new, method="bilinear")
    return tf.image.resize_with_crop_or_pad(image, size, size)
