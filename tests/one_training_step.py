"""One `Trainer` step of ResNet-8 on a fixed global batch of 16, under any strategy.

The replica-equivalence test of test_train (2 logical CPUs) runs this in a subprocess and
compares with one device running it (two MultiWorkerMirroredStrategy workers are tested
on the whole pipeline in test_prune). Not a test module: imported by that test and its
subprocess script.
"""
import keras
import numpy as np
import tensorflow as tf

GLOBAL_BATCH = 16


def one_training_step(strategy):
    """(weights before, weights after) of one step from the same initial weights and
    global batch whatever the strategy; each replica reads its shard of the batch."""
    from ekg_tf.config import base_config
    from ekg_tf.models import build_model
    from ekg_tf.train import Trainer, make_optimizer, synchronize_batch_norm
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, GLOBAL_BATCH)
    keras.utils.set_random_seed(1)
    with strategy.scope():
        model = build_model("resnet8", 10)
        opt = make_optimizer(base_config().train, 100)
    synchronize_batch_norm(model, strategy)  # N replicas: the global batch's statistics
    for layer in model.layers:  # gamma=0 hides the second conv's gradients; make them count
        if layer.name.endswith("_bn2"):
            layer.gamma.assign(tf.ones_like(layer.gamma))
    before = [v.numpy().copy() for v in model.weights]
    trainer = Trainer(model, opt, strategy, GLOBAL_BATCH, weight_decay=5e-4)
    ds = strategy.distribute_datasets_from_function(
        lambda c: tf.data.Dataset.from_tensor_slices((x, y))
        .shard(c.num_input_pipelines, c.input_pipeline_id)
        .batch(c.get_per_replica_batch_size(GLOBAL_BATCH)))
    for batch in ds:
        trainer.train_step(batch)
    return before, [v.numpy() for v in model.weights]
