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

import numpy as np
import tensorflow as tf

NORMALIZATION = {
    "cifar10": ((113.9, 123.0, 125.3), (66.7, 62.1, 63.0)),
    "cifar100": ((112.0, 124.0, 129.0), (70.0, 65.0, 68.0)),
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "imagenet2012": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    # Generated images of the quickstart / tests share CIFAR's statistics.
    "synthetic": ((113.9, 123.0, 125.3), (66.7, 62.1, 63.0)),
}


def normalization_for(name: str):
    try:
        mean, std = NORMALIZATION[name]
    except KeyError:
        raise ValueError(f"no normalisation known for dataset {name!r}; "
                         f"known: {sorted(NORMALIZATION)}") from None
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def normalize(images, name: str):
    """uint8 (or float 0..255) RGB -> normalised float32."""
    mean, std = normalization_for(name)
    return (tf.cast(images, tf.float32) - mean) / std


def cifar_augment(image, seed):
    """Random flip + random crop of the 4-pixel reflect-padded image (stateless, `seed` [2])."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
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
