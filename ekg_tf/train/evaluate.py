"""Evaluation: top-1, top-5 and loss of a model over a (distributed) dataset.

`bn_mode="inference"` uses the BN moving statistics; `"batch_stats"` normalises
with each batch's statistics (what the reference's test script does) and never
updates the moving statistics, so evaluation data cannot leak into the model.
"""
from __future__ import annotations

from ekg_tf.errors import UserError
import tensorflow as tf

BN_MODES = ("inference", "batch_stats")


def make_eval_step(model, strategy, bn_mode: str = "inference"):
    if bn_mode not in BN_MODES:
        raise UserError(f"unknown BN mode {bn_mode!r}; choose one of {BN_MODES}")
    training = bn_mode == "batch_stats"

    def replica_step(batch):
        images, labels = batch[0], tf.cast(batch[1], tf.int32)
        if not training:
            # The last partial batch can leave a replica with no images (and TF's CPU
            # conv mishandles an empty batch); batch-statistics mode cannot skip, since
            # synchronised BN needs every replica in its all-reduce.
            return tf.cond(tf.shape(images)[0] > 0, lambda: metrics(images, labels),
                           lambda: tf.zeros([4]))
        return metrics(images, labels)

    def metrics(images, labels):
        if training:
            logits = model(images, training=True, freeze_bn_stats=True)
        else:
            logits = model(images, training=False)
        loss = tf.reduce_sum(tf.keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))
        top1 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32))
        k = min(5, logits.shape[-1])
        top5 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, k), tf.float32))
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.stack([loss, top1, top5, count])

    @tf.function
    def step(dist_batch):
        per_replica = strategy.run(replica_step, args=(dist_batch,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return step


def evaluate(model, strategy, dataset_fn, bn_mode: str = "inference", eval_step=None) -> dict:
    """{'top1', 'top5', 'loss', 'examples'} over one pass of `dataset_fn`'s data."""
    step = eval_step or make_eval_step(model, strategy, bn_mode)
    batches = strategy.distribute_datasets_from_function(dataset_fn)
    # Traced for the dataset's element spec (batch size unknown): traced on the first
    # batch's own shape instead, the step would trace the model again for the last,
    # partial batch (6 s of a ResNet-56 evaluation's 10 s here). A cache hit after the
    # first evaluation.
    step.get_concrete_function(batches.element_spec)
    totals = tf.zeros([4])
    for batch in batches:
        totals += step(batch)
    loss, top1, top5, count = totals.numpy().tolist()
    if count == 0:
        raise UserError("evaluation set is empty")
    return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count,
            "examples": int(count)}
