"""The reference's short adaptation pass before the search.

As its pruning.py/op_utils.py: one pass over the first `adapt_per_class` training
images of each class (2,560 for CIFAR-10), shuffled, no augmentation, batches of
256 (remainder dropped), SGD with Nesterov momentum 0.9 at lr 1e-3, loss = summed
cross-entropy / batch size, weight decay 5e-4 added to the gradients as L2, BN in
training mode updating its moving statistics, every gate fully open.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import keras


def adapt(model, images, labels, learning_rate: float = 1e-3, batch_size: int = 256,
          weight_decay: float = 5e-4, momentum: float = 0.9, progress=None) -> dict:
    """Runs the pass in place on `model` (single replica); returns {'steps', 'loss'}."""
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    n_steps = len(images) // batch_size
    if n_steps < 1:
        raise ValueError(f"the adaptation pass needs at least {batch_size} images "
                         f"(search.adapt_batch_size), got {len(images)}; lower "
                         "search.adapt_batch_size or set search.adapt=False")
    for g in model.gate_groups:
        if g.rate != 1.0:
            raise ValueError("the adaptation pass runs on the unpruned network (all rates 1)")
    optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum,
                                     nesterov=True)
    variables = model.trainable_variables

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_sum(tf.keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True)) / float(batch_size)
        grads = tape.gradient(loss, variables)
        grads = [g + weight_decay * v for g, v in zip(grads, variables)]
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    losses = []
    for i in range(n_steps):
        sl = slice(i * batch_size, (i + 1) * batch_size)
        losses.append(float(train_step(tf.constant(images[sl]), tf.constant(labels[sl]))))
        if progress is not None:
            progress.update(1, items=batch_size, loss=losses[-1])
    return {"steps": n_steps, "loss": float(np.mean(losses))}
