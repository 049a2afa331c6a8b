"""Training-mode BatchNorm + ReLU, forward and backward, by channel count, on this CPU.

    python benchmarks/batch_norm_kernels.py [--batch=256 --reps=15]

Also timed: the forward alone (batch statistics, no gradient), what the search's
evaluations and the memory bank's teachers run.

Three ways to compute the same thing, each one `tf.function` step timed alone (median of
`--reps` after 3 warm-up runs): `fused` = `FusedBatchNormV3` (what `ekg_tf.train.fused_bn`
uses in the fine-tuning step), `padded16` = the fused op on channels zero-padded to a
multiple of 16 and sliced back, `elementwise` = `tf.nn.moments` + `tf.nn.batch_normalization`
(Keras 3's BN, and the reference's). The shapes are those of the published ResNet-56
searched to 0.45 at the EKG step's batch (two views of 128): oneDNN's fused kernel is fast
only when the channel count is a multiple of the vector width (16 floats with AVX-512).
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
    print(f"{'':<22}{'forward + backward':>39}{'forward only':>26}")
    print(f"{'shape':<22}{'fused ms':>10}{'padded16 ms':>13}{'elementwise ms':>16}"
          f"{'fused ms':>10}{'elementwise ms':>16}")
    for hw, channels in SHAPES:
        for c in channels:
            shape = (args.batch, hw, hw, c)
            row = {"shape": list(shape)}
            row.update({fn.__name__: step_ms(fn, shape, args.reps)
                        for fn in (fused, padded16, elementwise)})
            row.update({fn.__name__ + "_forward": step_ms(fn, shape, args.reps, False)
                        for fn in (fused, elementwise)})
            rows.append(row)
            print(f"{str(shape):<22}{row['fused']:>10.2f}{row['padded16']:>13.2f}"
                  f"{row['elementwise']:>16.2f}{row['fused_forward']:>10.2f}"
                  f"{row['elementwise_forward']:>16.2f}", flush=True)
    print(json.dumps({"batch": args.batch, "reps": args.reps, "rows": rows}))


if __name__ == "__main__":
    main()
