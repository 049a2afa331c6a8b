"""The reference's short adaptation pass before the search, under any strategy.

As its pruning.py/op_utils.py: one pass over the first `adapt_per_class` training
images of each class (2,560 for CIFAR-10), shuffled, no augmentation, batches of
256 (remainder dropped), SGD with Nesterov momentum 0.9 at lr 1e-3, loss = summed
cross-entropy / batch size, weight decay 5e-4 added to the gradients as L2, BN in
training mode updating its moving statistics, every gate fully open. It runs as the
distributed `Trainer` step: each global batch is split over the replicas, BN uses the
global batch's statistics, so N replicas give what one device gives.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import keras

from ekg_tf.errors import UserError
from ekg_tf.train.loop import Trainer


def adapt(model, images, labels, learning_rate: float = 1e-3, batch_size: int = 256,
          weight_decay: float = 5e-4, momentum: float = 0.9, progress=None,
          strategy=None) -> dict:
    """Runs the pass in place on a gated clone; returns {'steps', 'loss'}."""
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    n_steps = len(images) // batch_size
    if n_steps < 1:
        raise UserError(f"the adaptation pass needs at least {batch_size} images "
                         f"(search.adapt_batch_size), got {len(images)}; lower "
                         "search.adapt_batch_size or set search.adapt=False")
    for g in model.gate_groups:
        if g.rate != 1.0:
            raise ValueError("the adaptation pass runs on the unpruned network (all rates 1)")
    strategy = strategy or tf.distribute.get_strategy()
    if batch_size % strategy.num_replicas_in_sync:
        raise UserError(f"search.adapt_batch_size {batch_size} does not split over "
                         f"{strategy.num_replicas_in_sync} replicas")
    with strategy.scope():
        optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum,
                                         nesterov=True)
    trainer = Trainer(model, optimizer, strategy, batch_size, weight_decay)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(
        batch_size, drop_remainder=True)
    losses = []
    for batch in strategy.experimental_distribute_dataset(dataset):
        loss, _, _ = trainer.train_step(batch).numpy()
        losses.append(float(loss))
        if progress is not None:
            progress.update(1, items=batch_size, loss=losses[-1])
    return {"steps": n_steps, "loss": float(np.mean(losses))}
