"""Keras 3 -> tf-keras conversion parity, run by test_qat.py in a process of its own.

tf-keras is imported here, as in the QAT worker (TF_USE_LEGACY_KERAS=1 from the start),
never in the test process. Prints one JSON line: per model the max relative logit
difference of the converted model in inference mode and with BN batch statistics
(training mode; compared before the dropout, whose random masks differ), the BN
statistics that call updated, and the error message for a layer without a converter.
"""
import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tf_keras  # noqa: E402

import qat_models  # noqa: E402
from ekg_tf.qat.convert import ConversionError, to_tf_keras  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(a).max())


def layer_weights(model, converted):
    return [(layer.get_weights(), converted.get_layer(layer.name).get_weights())
            for layer in model.layers if layer.weights]


def parity(model, x, feature_layer):
    converted = to_tf_keras(model)
    out = {"layers": len(converted.layers),
           "weights_equal": all(np.array_equal(a, b) for k3, k2 in layer_weights(model, converted)
                                for a, b in zip(k3, k2)),
           "inference": rel(model(x, training=False), converted(x, training=False))}
    k3 = keras.Model(model.inputs, model.get_layer(feature_layer).output)
    k2 = tf_keras.Model(converted.inputs, converted.get_layer(feature_layer).output)
    out["training"] = rel(k3(x, training=True), k2(x, training=True))
    # The training-mode call also moved the BN statistics: the same way in both.
    out["updated_weights"] = max((rel(a, b) for k3w, k2w in layer_weights(model, converted)
                                  for a, b in zip(k3w, k2w)), default=0.0)
    return out


def ranges(model, x):
    """qat.range_calibration on the converted network: `minmax` and `mse` ranges of every
    activation quantizer, and what a training-mode call does to them with and without
    `fixed_activation_ranges` (and whether a kernel still gets a gradient)."""
    import tensorflow as tf
    from ekg_tf.qat.quantize import calibrate_ranges, fixed_activation_ranges, quantize_aware_model

    def activation_ranges(qat):
        return {v.name: v.numpy().copy() for v in qat.weights
                if v.name.split("/")[-1].startswith(("output_m", "post_activation_m"))}

    converted = to_tf_keras(model)
    batches = [x[:8], x[8:]]
    out = {}
    for method in ("minmax", "mse"):
        qat = quantize_aware_model(converted)
        out[f"{method}_count"] = calibrate_ranges(qat, batches, method)
        out[method] = activation_ranges(qat)
    kernel = next(v for v in qat.trainable_weights if "kernel" in v.name)
    with fixed_activation_ranges():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(qat(x, training=True) ** 2)
        out["fixed_grad"] = float(tf.reduce_sum(tf.abs(tape.gradient(loss, kernel))))
    fixed = activation_ranges(qat)
    qat(x, training=True)
    moved = activation_ranges(qat)
    base = out["mse"]
    result = {"names": len(base), "count": out["mse_count"],
              "fixed_max_change": max(float(np.abs(fixed[k] - base[k]).max()) for k in base),
              "moving_max_change": max(float(np.abs(moved[k] - base[k]).max()) for k in base),
              "fixed_grad": out["fixed_grad"],
              # every range holds 0; mse clips the long tails of some tensors
              "hold_zero": all(float(base[k.replace("max:0", "min:0")].max()) <= 0.0 <=
                               float(base[k].min()) for k in base if k.endswith("max:0")),
              "narrower": sum(float(base[k].max()) < 0.99 * float(out["minmax"][k].max())
                              for k in base if k.endswith("max:0"))}
    return result


def main():
    x = qat_models.images(16)
    result = {"resnet8": parity(qat_models.resnet8_slim()[0], x, "block2_0_relu"),
              "depthwise": parity(qat_models.depthwise_slim()[0], x, "gap")}
    # Operations recorded by the functional API (x + y, keras.ops.relu) become layers.
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(4, 1, name="b")(inputs)
    ops_model = keras.Model(inputs, keras.ops.relu(a + b) * b)
    result["ops"] = parity(ops_model, x[:, :8, :8], "b")
    result["ranges"] = ranges(qat_models.resnet8_slim()[0], x)
    lam = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs))
    try:
        to_tf_keras(lam)
        result["unsupported"] = None
    except ConversionError as e:
        result["unsupported"] = str(e)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
