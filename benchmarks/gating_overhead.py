"""Gated model at full width vs the same network as plain Keras layers: speed and equality.

  python benchmarks/gating_overhead.py [--arch resnet56] [--batch 128] [--steps 10]

Prints a table: images/s for inference and for one SGD training step (the
repo's Trainer under the default strategy), and the max logit difference
(BN inference mode) between the two, which must be ~0: the gates at rate 1.0
cost no accuracy.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ekg_tf.config import base_config  # noqa: E402
from ekg_tf.distribute import make_strategy  # noqa: E402
from ekg_tf.graph.gated import GatedModel  # noqa: E402
from ekg_tf.models import build_model  # noqa: E402
from ekg_tf.slimming import slim_model  # noqa: E402
from ekg_tf.train import Trainer, make_optimizer  # noqa: E402


def _plain_loss(model, batch, global_batch_size):
    images, labels = batch
    logits = model(images, training=True)
    loss = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return tf.reduce_sum(loss) / global_batch_size, logits, labels


def _rate(fn, batch, steps):
    fn()  # warm-up (trace)
    fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps * batch / (time.perf_counter() - t)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    strategy = make_strategy("mirrored")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, args.batch).astype(np.int32)
    with strategy.scope():
        gated = GatedModel(build_model(args.arch, 10))
        for layer in gated.base.layers:  # gamma = 0 would hide the second conv of a block
            if layer.name.endswith("_bn2"):
                layer.gamma.assign(tf.ones_like(layer.gamma))
        plain = slim_model(gated)
    diff = float(np.abs(gated(x).numpy() - plain(x, training=False).numpy()).max())
    rows = []
    for name, model in (("gated (rate 1.0)", gated), ("plain Keras", plain)):
        infer = tf.function(lambda a, m=model: m(a, training=False))
        infer_rate = _rate(lambda: infer(x).numpy(), args.batch, args.steps)
        with strategy.scope():
            opt = make_optimizer(base_config().train, 1000)
        trainer = Trainer(model, opt, strategy, args.batch, 5e-4, loss_fn=_plain_loss)
        ds = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors((x, y)).repeat())
        it = iter(ds)
        train_rate = _rate(lambda: trainer.train_step(next(it)).numpy(), args.batch, args.steps)
        rows.append((name, infer_rate, train_rate))
    print(f"{args.arch}, batch {args.batch}, {os.cpu_count()} CPU cores, "
          f"max |logit diff| gated vs plain = {diff:.2e}")
    print(f"| model | inference img/s | training img/s |")
    print(f"| --- | --- | --- |")
    for name, i, t in rows:
        print(f"| {name} | {i:.0f} | {t:.0f} |")
    print(f"| gated / plain | {rows[0][1] / rows[1][1]:.2f} | {rows[0][2] / rows[1][2]:.2f} |")


if __name__ == "__main__":
    main()
