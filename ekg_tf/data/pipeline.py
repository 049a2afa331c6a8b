"""tf.data pipelines: normalised, augmented, per-replica batches, exactly resumable.

`input_fn(data_cfg, split, training, global_batch_size, ...)` returns a function
of a `tf.distribute.InputContext` for `strategy.distribute_datasets_from_function`:
each input pipeline reads its shard and batches `global_batch_size /
num_replicas_in_sync` images per replica, so the global batch is exact.

Randomness is stateless and keyed by (seed, epoch, example index): the shuffle
order and every augmentation of epoch `e` are the same whenever epoch `e` is
produced, so a resumed run (`start_epoch`, `skip_batches`) sees exactly the
batches an uninterrupted run would.

Elements are `(images, labels)` or, with `with_index`, `(images, labels, index)`
where `index` is the example's position in the split (pairs images with
per-example data such as teacher logits, through shuffling and sharding).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ekg_tf.data import preprocessing, sources


def _is_imagenet(data_cfg) -> bool:
    return data_cfg.name.startswith("imagenet")


def preprocess_fn(data_cfg, training: bool, views: int = 1, jitter: bool = False):
    """(uint8 image, seed [2]) -> normalised float32 (views > 1: stacked [views, H, W, 3])."""
    size = int(data_cfg.image_size)
    norm_name = data_cfg.get("normalization") or data_cfg.name

    def one_view(image, seed):
        aug_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if _is_imagenet(data_cfg):
            image = (preprocessing.imagenet_train_preprocess(image, aug_seed, size) if training
                     else preprocessing.imagenet_eval_preprocess(image, size))
        elif training:
            image = preprocessing.cifar_augment(image, aug_seed,
                                                flip=bool(data_cfg.get("random_flip", True)))
        if jitter:
            image = preprocessing.color_jitter(image, jitter_seed)
        return preprocessing.normalize(image, norm_name)

    def fn(image, seed):
        if views == 1:
            return one_view(image, seed)
        view_seeds = tf.random.experimental.stateless_split(seed, views)
        return tf.stack([one_view(image, view_seeds[v]) for v in range(views)])

    return fn


def input_fn(data_cfg, split: str, training: bool, global_batch_size: int, views: int = 1,
             jitter: bool = False, with_index: bool = False, shuffle: bool | None = None,
             seed: int = 0, epochs: int = 1, start_epoch: int = 0, skip_batches: int = 0,
             drop_remainder: bool | None = None, indices=None, arrays=None):
    """Builds the dataset function for `distribute_datasets_from_function`.

    Produces epochs `start_epoch .. epochs-1` (each reshuffled by its epoch
    number), skipping the first `skip_batches` batches. Returns
    `(dataset_fn, examples_per_epoch)`.
    """
    shuffle = training if shuffle is None else shuffle
    drop_remainder = training if drop_remainder is None else drop_remainder
    preprocess = preprocess_fn(data_cfg, training, views, jitter)
    streaming = data_cfg.source == "tfds" and arrays is None and indices is None
    if streaming:
        raw, num_examples = sources.raw_dataset(data_cfg, split, shuffle_files=False)
    else:
        if arrays is None:
            arrays = sources.load_arrays(data_cfg, split)
        if indices is not None:
            indices = np.asarray(indices, np.int64)
            arrays = arrays.subset(indices)
        else:
            indices = np.arange(len(arrays), dtype=np.int64)
        num_examples = len(arrays)

    def dataset_fn(context: tf.distribute.InputContext | None = None):
        per_replica = global_batch_size
        pipelines, pipeline_id = 1, 0
        if context is not None:
            per_replica = context.get_per_replica_batch_size(global_batch_size)
            pipelines, pipeline_id = context.num_input_pipelines, context.input_pipeline_id
        if not streaming:
            x_all, y_all, index_all = (tf.constant(arrays.x), tf.constant(arrays.y),
                                       tf.constant(indices))

        def examples(epoch):
            if streaming:
                ds = raw.enumerate().map(lambda i, xy: (xy[0], xy[1], i))
                if pipelines > 1:
                    ds = ds.shard(pipelines, pipeline_id)
                if shuffle:
                    ds = ds.shuffle(int(data_cfg.shuffle_buffer), seed=seed * 100_003 + epoch,
                                    reshuffle_each_iteration=False)
                return ds
            order = tf.range(num_examples, dtype=tf.int64)
            if shuffle:
                order = tf.random.experimental.stateless_shuffle(
                    order, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
            if pipelines > 1:
                order = order[pipeline_id::pipelines]
            return tf.data.Dataset.from_tensor_slices(order).map(
                lambda i: (tf.gather(x_all, i), tf.gather(y_all, i), tf.gather(index_all, i)))

        def epoch_batches(epoch):
            def map_fn(image, label, index):
                seed_pair = tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + epoch, index])
                out = (preprocess(image, seed_pair), tf.cast(label, tf.int32))
                return out + (index,) if with_index else out

            ds = examples(epoch).map(map_fn, num_parallel_calls=tf.data.AUTOTUNE)
            # Batches never straddle epochs, so batch k of epoch e is always the same.
            return ds.batch(per_replica, drop_remainder=drop_remainder)

        ds = tf.data.Dataset.range(start_epoch, max(epochs, start_epoch + 1)).flat_map(
            epoch_batches)
        if skip_batches:
            ds = ds.skip(skip_batches)
        return ds.prefetch(tf.data.AUTOTUNE)

    return dataset_fn, num_examples


def steps_per_epoch(num_examples: int, global_batch_size: int, drop_remainder: bool = True) -> int:
    if drop_remainder:
        return num_examples // global_batch_size
    return -(-num_examples // global_batch_size)
