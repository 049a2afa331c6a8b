"""Keras 3 -> tf-keras: the same functional graph, layer by layer, with the same weights.

tensorflow-model-optimization (tfmot 0.8) quantizes only tf-keras (Keras 2) models.
`to_tf_keras(model)` traces a plain Keras 3 functional/Sequential model (a slimmed
network, `ekg_tf.slimming.slim_model`; nested models are flattened by
`ekg_tf.graph.trace`) and replays its graph with tf-keras layers of the same class
and arguments, then copies every layer's weights. The result computes the same
function (inference and training mode, BN included) up to float32 rounding. One
difference is tf-keras' own: its (fused) BatchNormalization moves the moving variance
with the unbiased batch variance (n/(n-1)), Keras 3 with the biased one (1e-4 relative
for 1,024 values per channel).

Every layer type the channel-dependency graph follows (`ekg_tf.graph.rules`) is
converted: Conv1D/2D, DepthwiseConv1D/2D, SeparableConv2D, Dense, BatchNormalization,
LayerNormalization, activations, dropout/noise, Rescaling, Normalization, pooling,
padding, cropping, up-sampling, Add/Subtract/Multiply/Maximum/Minimum/Average,
Concatenate, Flatten, Reshape, and the Keras operations the functional API records
for `x + y`, `x * y` or `keras.ops.relu(x)`. Anything else is refused with the layer's
name and type (`ConversionError`), never converted approximately.

This module imports tf-keras: it runs in the QAT worker process only (`ekg_tf.qat.worker`),
never in a process that uses Keras 3 through `tf.keras`.
"""
from __future__ import annotations

import inspect

import numpy as np
import tf_keras
import keras

from ekg_tf.graph.rules import activation_name
from ekg_tf.graph.trace import execute, trace

L3 = keras.layers
L2 = tf_keras.layers


class ConversionError(ValueError):
    """A Keras 3 layer that has no exact tf-keras counterpart (says which and why)."""


# Layer classes converted by name (Keras 3 class -> the tf-keras class of the same name).
LAYERS = (
    L3.Conv1D, L3.Conv2D, L3.DepthwiseConv1D, L3.DepthwiseConv2D, L3.SeparableConv2D,
    L3.Dense, L3.BatchNormalization, L3.LayerNormalization, L3.Activation, L3.ReLU,
    L3.LeakyReLU, L3.ELU, L3.Softmax, L3.Dropout, L3.SpatialDropout1D, L3.SpatialDropout2D,
    L3.SpatialDropout3D, L3.AlphaDropout, L3.GaussianNoise, L3.GaussianDropout,
    L3.ActivityRegularization, L3.Identity, L3.Rescaling, L3.Normalization,
    L3.MaxPooling1D, L3.MaxPooling2D, L3.MaxPooling3D, L3.AveragePooling1D,
    L3.AveragePooling2D, L3.AveragePooling3D, L3.GlobalAveragePooling1D,
    L3.GlobalAveragePooling2D, L3.GlobalAveragePooling3D, L3.GlobalMaxPooling1D,
    L3.GlobalMaxPooling2D, L3.GlobalMaxPooling3D, L3.ZeroPadding1D, L3.ZeroPadding2D,
    L3.ZeroPadding3D, L3.Cropping1D, L3.Cropping2D, L3.Cropping3D, L3.UpSampling1D,
    L3.UpSampling2D, L3.UpSampling3D, L3.Add, L3.Subtract, L3.Multiply, L3.Maximum,
    L3.Minimum, L3.Average, L3.Concatenate, L3.Flatten, L3.Reshape,
)

# Config keys that only describe how Keras serialises or initialises a layer: the
# weights are copied, so initialisers do not matter; regularisers and constraints are
# training-time terms of `model.fit` (the QAT loop adds weight decay itself).
_DROPPED = {"name", "dtype", "trainable", "autocast", "dtype_policy",
            "kernel_initializer", "bias_initializer", "depthwise_initializer",
            "pointwise_initializer", "beta_initializer", "gamma_initializer",
            "moving_mean_initializer", "moving_variance_initializer",
            "kernel_regularizer", "bias_regularizer", "depthwise_regularizer",
            "pointwise_regularizer", "beta_regularizer", "gamma_regularizer",
            "activity_regularizer", "kernel_constraint", "bias_constraint",
            "depthwise_constraint", "pointwise_constraint", "beta_constraint",
            "gamma_constraint", "input_shape", "batch_input_shape", "batch_shape"}
# Keras 3 options without a tf-keras equivalent: accepted only at their no-op value.
_KERAS3_ONLY = {"lora_rank": (None, 0), "lora_alpha": None, "rms_scaling": (False,),
                "quantization_config": (None,), "invert": (False,)}
# Renamed arguments (Keras 3 name -> tf-keras name).
_RENAMED = {L3.LeakyReLU: {"negative_slope": "alpha"}}

# Keras operations recorded by the functional API -> a tf-keras layer computing the same.
_OP_MERGES = {"Add": L2.Add, "Subtract": L2.Subtract, "Multiply": L2.Multiply,
              "Maximum": L2.Maximum, "Minimum": L2.Minimum}
_OP_ACTIVATIONS = {"Relu": "relu", "Relu6": "relu6", "Sigmoid": "sigmoid", "Tanh": "tanh",
                   "Silu": "swish", "Gelu": "gelu", "Elu": "elu", "Selu": "selu",
                   "Softplus": "softplus", "Softsign": "softsign", "HardSigmoid": "hard_sigmoid",
                   "HardSilu": "hard_silu", "Mish": "mish"}


def _activation(value, layer):
    """A Keras 3 serialised activation -> the tf-keras name of the same function."""
    if value is None or isinstance(value, str):
        name = value or "linear"
    elif isinstance(value, dict) and value.get("module") == "keras.activations":
        name = value.get("config")
    else:
        name = activation_name(getattr(layer, "activation", None))
    name = {"silu": "swish", "hard_swish": "hard_silu"}.get(name, name)
    try:
        tf_keras.activations.get(name)
    except (ValueError, TypeError):
        raise ConversionError(f"layer {layer.name!r}: activation {name!r} has no tf-keras "
                              "equivalent") from None
    return name


def _layer_config(layer, cls) -> dict:
    """The tf-keras constructor arguments equivalent to `layer`'s Keras 3 config."""
    config = layer.get_config()
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    takes_kwargs = "kwargs" in accepted
    renamed = _RENAMED.get(type(layer), {})
    out = {}
    for key, value in config.items():
        if key in _DROPPED:
            continue
        if key in _KERAS3_ONLY:
            allowed = _KERAS3_ONLY[key]
            if allowed is not None and value not in allowed:
                raise ConversionError(f"layer {layer.name!r} ({type(layer).__name__}): "
                                      f"{key}={value!r} has no tf-keras equivalent")
            continue
        key = renamed.get(key, key)
        if key == "activation":
            value = _activation(value, layer)
        if key not in accepted and not takes_kwargs:
            raise ConversionError(f"layer {layer.name!r} ({type(layer).__name__}): tf-keras "
                                  f"{cls.__name__} has no argument {key!r}")
        if isinstance(value, list) and key in ("mean", "variance", "scale", "offset"):
            value = np.asarray(value, np.float32)
        out[key] = value
    return out


def _safe_name(name: str, used: set) -> str:
    """A tf-keras layer name: nested names `<model>.<layer>` become `<model>__<layer>`."""
    base = "".join(c if c.isalnum() or c in "_-" else "_" for c in name.replace(".", "__"))
    candidate, n = base, 1
    while candidate in used:
        n += 1
        candidate = f"{base}_{n}"
    used.add(candidate)
    return candidate


def convert_layer(layer, name: str):
    """The tf-keras layer of the same class and arguments as the Keras 3 `layer`."""
    if type(layer) not in LAYERS:
        raise ConversionError(
            f"layer {layer.name!r} ({type(layer).__module__}.{type(layer).__name__}) has no "
            f"tf-keras converter; converted types: {sorted({c.__name__ for c in LAYERS})}")
    cls = getattr(L2, type(layer).__name__)
    return cls(name=name, **_layer_config(layer, cls))


def _convert_operation(op, name: str, args, kwargs):
    """A recorded Keras operation -> (tf-keras layer, its call arguments)."""
    kind = type(op).__name__
    if type(op).__module__.startswith("keras.src.ops"):
        tensors = [a for a in args if a is not None]
        if kind in _OP_MERGES and len(tensors) == 2 and not kwargs:
            return _OP_MERGES[kind](name=name), ([tensors[0], tensors[1]],), {}
        if kind in _OP_ACTIVATIONS and len(args) == 1 and not kwargs:
            return L2.Activation(_OP_ACTIVATIONS[kind], name=name), (args[0],), {}
    raise ConversionError(f"operation {getattr(op, 'name', kind)!r} ({kind}) has no tf-keras "
                          "converter; use a keras.layers layer for it")


def to_tf_keras(model, name: str | None = None):
    """The tf-keras functional model computing what the Keras 3 `model` computes.

    Raises `ConversionError` (naming the layer) for a layer type without a converter.
    """
    graph = trace(model)
    used: set = set()
    pending = []  # (tf-keras layer, Keras 3 layer): weights copied once built

    def call(node, values):
        args, kwargs = node.arguments(values)
        new_name = _safe_name(node.name, used)
        layer = node.layer
        if isinstance(layer, keras.layers.Layer):
            new = convert_layer(layer, new_name)
            pending.append((new, layer))
        else:
            new, args, kwargs = _convert_operation(layer, new_name, args, kwargs)
        return new(*args, **kwargs)

    inputs = []
    for tid in graph.inputs:
        t = graph.tensors[tid]
        inputs.append(tf_keras.Input(shape=t.shape[1:], dtype=t.dtype,
                                     name=_safe_name(t.name, used)))
    outputs, _ = execute(graph, dict(zip(graph.inputs, inputs)), call)
    converted = tf_keras.Model(inputs[0] if len(inputs) == 1 else inputs,
                               outputs[0] if len(outputs) == 1 else list(outputs),
                               name=_safe_name(name or model.name, set()))
    for new, old in pending:
        arrays = old.get_weights()
        shapes = [tuple(w.shape) for w in new.weights]
        if shapes != [tuple(a.shape) for a in arrays]:
            raise ConversionError(f"layer {old.name!r} ({type(old).__name__}): weight shapes "
                                  f"{[tuple(a.shape) for a in arrays]} do not fit the tf-keras "
                                  f"layer's {shapes}")
        new.set_weights(arrays)
    return converted
