"""tf.data pipelines: normalised, augmented, per-replica batches.

`input_fn(data_cfg, split, training, global_batch_size, ...)` returns a function
of a `tf.distribute.InputContext` for `strategy.distribute_datasets_from_function`:
each input pipeline reads its shard and batches `global_batch_size /
num_replicas_in_sync` images per replica, so the global batch is exact.
Elements are `(images, labels)` or, with `with_index`, `(images, labels, index)`
where `index` is the example's position in the split (pairs images with
per-example data such as teacher logits, through shuffling and sharding).
"""
from __future__ import annotations

import tensorflow as tf

from ekg_tf.data import preprocessing, sources


def _is_imagenet(data_cfg) -> bool:
    return data_cfg.name.startswith("imagenet")


def preprocess_fn(data_cfg, training: bool, views: int = 1, jitter: bool = False):
    """uint8 image -> normalised float32 (views > 1: stacked [views, H, W, 3])."""
    size = int(data_cfg.image_size)
    norm_name = data_cfg.get("normalization") or data_cfg.name

    def one_view(image):
        if _is_imagenet(data_cfg):
            image = (preprocessing.imagenet_train_preprocess(image, size) if training
                     else preprocessing.imagenet_eval_preprocess(image, size))
        elif training:
            image = preprocessing.cifar_augment(image)
        if jitter:
            image = preprocessing.color_jitter(image)
        return preprocessing.normalize(image, norm_name)

    def fn(image):
        if views == 1:
            return one_view(image)
        return tf.stack([one_view(image) for _ in range(views)])

    return fn


def input_fn(data_cfg, split: str, training: bool, global_batch_size: int, views: int = 1,
             jitter: bool = False, with_index: bool = False, shuffle: bool | None = None,
             seed: int | None = None, repeat: bool = False, drop_remainder: bool | None = None,
             indices=None):
    """Builds the dataset function for `distribute_datasets_from_function`."""
    shuffle = training if shuffle is None else shuffle
    drop_remainder = training if drop_remainder is None else drop_remainder
    raw, num_examples = sources.raw_dataset(data_cfg, split)
    if indices is not None:
        raw = None  # subsets are taken from the array form below
    preprocess = preprocess_fn(data_cfg, training, views, jitter)

    def dataset_fn(context: tf.distribute.InputContext | None = None):
        if indices is not None:
            arrays = sources.load_arrays(data_cfg, split)
            ds = tf.data.Dataset.from_tensor_slices(
                (arrays.x[indices], arrays.y[indices], tf.constant(indices, tf.int64)))
        else:
            ds = raw.enumerate().map(lambda i, xy: (xy[0], xy[1], i))
        per_replica = global_batch_size
        if context is not None:
            per_replica = context.get_per_replica_batch_size(global_batch_size)
            if context.num_input_pipelines > 1:
                ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
        if shuffle:
            buffer = int(data_cfg.get("shuffle_buffer", 10_000))
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()

        def map_fn(image, label, index):
            out = (preprocess(image), tf.cast(label, tf.int32))
            return out + (index,) if with_index else out

        ds = ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=seed is not None)
        ds = ds.batch(per_replica, drop_remainder=drop_remainder)
        return ds.prefetch(tf.data.AUTOTUNE)

    n = len(indices) if indices is not None else num_examples
    return dataset_fn, n


def distributed_dataset(strategy, dataset_fn):
    return strategy.distribute_datasets_from_function(dataset_fn)
