"""Would training at zero-padded, aligned widths make the fine-tuning step faster?

    python benchmarks/padded_widths.py [--pads=1,8,16] [--rounds=6]

A pruned ResNet-56 with widths like the reference's search at 0.45 (residual streams
whole, stage-0 internals 1-7, stage-1 internals 4-20, stage-2 internals 39-64; drawn with
seed 0) is slimmed at those widths (pad 1) and at the widths rounded up to multiples of
each pad. Padded channels holding zeros would stay zero through training (zero filters,
zero BN beta, zero gradients), so a padded network trains exactly like the unpadded one;
the question is only whether aligned channel counts (oneDNN's vector blocks) pay for the
extra multiply-adds. Times one training step (forward + backward of 256 images, fused BN,
SGD + Nesterov) per network, the networks taking turns for `--rounds` rounds of 3 steps.
Run it on a quiet machine. Prints a table and a JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def reference_like_widths(groups, rng) -> dict:
    """{group: width} shaped like the reference's ResNet-56 result at 0.45 (spec section 9)."""
    low_high = {16: (1, 8), 32: (4, 21), 64: (39, 65)}
    return {g.name: g.channels if g.uses > 1 else int(rng.integers(*low_high[g.channels]))
            for g in groups}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pads", default="1,8,16")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf
    from ekg_tf.flops import ComplexityCounter
    from ekg_tf.graph.gated import GatedModel
    from ekg_tf.models import build_model
    from ekg_tf.slimming import slim_model
    from ekg_tf.train.fused_bn import use_fused_batch_norm

    widths = reference_like_widths(GatedModel(build_model("resnet56", 10)).gate_groups,
                                   np.random.default_rng(0))
    x = tf.random.uniform([256, 32, 32, 3])
    y = tf.random.uniform([256], 0, 10, tf.int32)
    steps, macs = {}, {}
    for pad in (int(v) for v in args.pads.split(",")):
        gated = GatedModel(build_model("resnet56", 10))
        for g in gated.gate_groups:
            g.rate = min(g.channels, math.ceil(widths[g.name] / pad) * pad) / g.channels
        macs[pad] = ComplexityCounter(gated).macs_ratio({g.name: g.rate
                                                         for g in gated.gate_groups})
        model = slim_model(gated)
        use_fused_batch_norm(model)
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)

        @tf.function
        def step(x, y, model=model, optimizer=optimizer):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                    y, logits, from_logits=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        for _ in range(3):  # trace, warm up
            step(x, y)
        steps[pad] = step
    times = {pad: [] for pad in steps}
    for _ in range(args.rounds):
        for pad, step in steps.items():
            start = time.perf_counter()
            for _ in range(3):
                float(step(x, y))
            times[pad].append((time.perf_counter() - start) / 3)
    print("| pad to | MACs ratio | s/step (median) | min |")
    rows = []
    for pad, t in times.items():
        rows.append({"pad": pad, "macs_ratio": round(float(macs[pad]), 4),
                     "s_per_step": round(float(np.median(t)), 3), "min": round(min(t), 3)})
        print(f"| {pad} | {macs[pad]:.3f} | {np.median(t):.3f} | {min(t):.3f} |")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
