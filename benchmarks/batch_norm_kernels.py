"""Training-mode BatchNorm + ReLU, forward and backward, by channel count, on this CPU.

    python benchmarks/batch_norm_kernels.py [--batch=256 --reps=15]

Four ways to compute the same thing, each one `tf.function` step timed alone (median of
`--reps` after 3 warm-up runs): `fused` = `FusedBatchNormV3`, `padded16` = the fused op on
channels zero-padded to a multiple of 16 and sliced back, `elementwise` = `tf.nn.moments`
+ `tf.nn.batch_normalization` (Keras 3's BN, and the reference's), `compiled` = the same
as one XLA-compiled function (`ekg_tf.graph.bn_kernels.compiled_batch_norm`); and
`ekg_tf` = what the fine-tuning step and the memory bank run at that width
(`bn_kernels.batch_statistics_norm`: fused or compiled). Also timed: the forward alone
(batch statistics, no gradient), what the memory bank's teachers run. The shapes are those
of the published ResNet-56 searched to 0.45 at the EKG step's batch (two views of 128):
oneDNN's fused kernel is fast only when the channel count is a multiple of the vector
width (16 floats with AVX-512).
Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SHAPES = ((32, (1, 4, 7, 15, 16)), (16, (7, 13, 16, 26, 32)), (8, (26, 39, 47, 52, 63, 64)))


def fused(x, gamma, beta):
    return tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=1e-3, is_training=True)[0]


def padded16(x, gamma, beta):
    channels = x.shape[-1]
    pad = -channels % 16
    if pad == 0:
        return fused(x, gamma, beta)
    y = fused(tf.pad(x, [[0, 0], [0, 0], [0, 0], [0, pad]]),
              tf.pad(gamma, [[0, pad]], constant_values=1.0), tf.pad(beta, [[0, pad]]))
    return y[..., :channels]


def elementwise(x, gamma, beta):
    mean, var = tf.nn.moments(x, [0, 1, 2], keepdims=True)
    return tf.nn.batch_normalization(x, mean, var, beta, gamma, 1e-3)


def compiled(x, gamma, beta):
    from ekg_tf.graph.bn_kernels import compiled_batch_norm
    return compiled_batch_norm(x, gamma, beta, tf.constant(1e-3))[0]


def ekg_tf(x, gamma, beta):
    from ekg_tf.graph.bn_kernels import batch_statistics_norm
    return batch_statistics_norm(x, gamma, beta, 1e-3)[0]


def step_ms(bn, shape, reps: int, backward: bool = True) -> float:
    """Median ms of one forward (+ backward) of relu(bn(x))."""
    x = tf.Variable(tf.random.normal(shape))
    gamma, beta = tf.Variable(tf.ones(shape[-1:])), tf.Variable(tf.zeros(shape[-1:]))
    dy = tf.random.normal(shape)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            y = tf.nn.relu(bn(x, gamma, beta))
        if not backward:
            return [y]
        return tape.gradient(y, [x, gamma, beta], output_gradients=dy)

    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()[0].numpy()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    rows = []
    train, forward = (fused, padded16, elementwise, compiled, ekg_tf), (fused, elementwise,
                                                                        compiled)
    print(f"{'ms':<22}" + "forward + backward".center(12 * len(train))
          + "forward only".center(12 * len(forward)))
    print(f"{'shape':<22}" + "".join(f"{fn.__name__:>12}" for fn in train + forward))
    for hw, channels in SHAPES:
        for c in channels:
            shape = (args.batch, hw, hw, c)
            row = {"shape": list(shape)}
            row.update({fn.__name__: step_ms(fn, shape, args.reps) for fn in train})
            row.update({fn.__name__ + "_forward": step_ms(fn, shape, args.reps, False)
                        for fn in forward})
            rows.append(row)
            print(f"{str(shape):<22}" + "".join(f"{row[fn.__name__]:>12.2f}" for fn in train)
                  + "".join(f"{row[fn.__name__ + '_forward']:>12.2f}" for fn in forward),
                  flush=True)
    print(json.dumps({"batch": args.batch, "reps": args.reps, "rows": rows}))


if __name__ == "__main__":
    main()
