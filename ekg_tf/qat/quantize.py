"""The quantization-aware (fake-quant) model of a tf-keras network, with tfmot's 8-bit scheme.

`quantize_aware_model(model)` is `tfmot.quantization.keras.quantize_model` extended to
the layer types of pruned networks that tfmot's default registry does not list:
- layers whose output is a new value range (Multiply, Subtract, Maximum, Minimum,
  Average, a BatchNormalization that does not follow a conv/dense, LayerNormalization,
  Rescaling, Normalization, an Activation tfmot does not know, 1-D/3-D pooling):
  their output is fake-quantized (moving-average range, asymmetric int8), as TFLite
  will compute them in int8;
- layers that pass values through unchanged at inference (Identity, noise, alpha
  dropout): nothing is quantized;
- Conv1D / DepthwiseConv1D (lowered to 2-D convolutions by TFLite): kernel fake-quantized
  per tensor (symmetric, narrow range) and the output after the activation.
Everything else goes through tfmot's own registry and layout transforms (Conv2D/
DepthwiseConv2D + BN (+ ReLU) patterns, per-channel conv kernels, SeparableConv2D split
into depthwise + pointwise, Add + ReLU fusion, ...). A layer that neither covers is
refused with its name (`ConversionError`).

`calibrate_ranges(model, batches, method)` sets every moving-average activation range
before training. tfmot starts them at [-6, 6] and moves them by an exponential moving
average of each batch's [min, max] with decay 0.999 and no bias correction, so after a
short QAT run (390 steps = one CIFAR epoch at batch 128) 68% of the initial [-6, 6] is
still in every range: a ReLU output keeps a range down to about -4, half of its int8
codes unused. `minmax` sets each range to the mean over training batches of that
batch's [min, max] (0 included), the fixed point of the moving average; `mse` to the
fraction of the observed [min, max] with the least int8 round-trip error of the
tensor's sampled values (the estimator of post-training int8, `ekg_tf.export.
int8_calibration`), which clips rare large values. `fixed_activation_ranges()` keeps
the ranges where calibration put them while the QAT model trains (the moving average
would pull `mse` ranges back towards the batch [min, max]).

Imports tfmot (which sets TF_USE_LEGACY_KERAS=1): the QAT worker process only.
"""
from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

from ekg_tf.qat.convert import ConversionError

L2 = tf_keras.layers
_qk = tfmot.quantization.keras


def _moving_average():
    return _qk.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                 narrow_range=False)


class OutputQuantizeConfig(_qk.QuantizeConfig):
    """No weights quantized; the layer's output fake-quantized (int8 asymmetric)."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [_moving_average()]

    def get_config(self):
        return {}


class PassThroughQuantizeConfig(OutputQuantizeConfig):
    """Nothing quantized: the layer is the identity at inference."""

    def get_output_quantizers(self, layer):
        return []


class KernelQuantizeConfig(_qk.QuantizeConfig):
    """Kernel fake-quantized per tensor (symmetric, narrow range), then the activation."""

    def get_weights_and_quantizers(self, layer):
        kernel = _qk.quantizers.LastValueQuantizer(num_bits=8, per_axis=False, symmetric=True,
                                                   narrow_range=True)
        return [(layer.kernel, kernel)]

    def get_activations_and_quantizers(self, layer):
        return [(layer.activation, _moving_average())]

    def set_quantize_weights(self, layer, quantize_weights):
        layer.kernel = quantize_weights[0]

    def set_quantize_activations(self, layer, quantize_activations):
        layer.activation = quantize_activations[0]

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


CUSTOM_OBJECTS = {c.__name__: c for c in (OutputQuantizeConfig, PassThroughQuantizeConfig,
                                          KernelQuantizeConfig)}

_OUTPUT_QUANTIZED = (L2.Multiply, L2.Subtract, L2.Maximum, L2.Minimum, L2.Average,
                     L2.LayerNormalization, L2.Rescaling, L2.Normalization, L2.MaxPooling1D,
                     L2.MaxPooling3D, L2.AveragePooling3D, L2.UpSampling1D, L2.UpSampling3D,
                     L2.ZeroPadding3D)
_PASS_THROUGH = (L2.Identity, L2.GaussianNoise, L2.GaussianDropout, L2.AlphaDropout)
_KERNEL = (L2.Conv1D, L2.DepthwiseConv1D)
# tfmot's conv/dense + BN patterns (a SeparableConv2D is split into depthwise + a Conv2D
# first); a BN there must keep tfmot's default config for the pattern to match.
_BN_FOLDED_INTO = (L2.Conv2D, L2.DepthwiseConv2D, L2.Dense, L2.SeparableConv2D)


def _producer(layer):
    nodes = layer._inbound_nodes  # the functional graph (one call per layer: rebuilt models)
    inbound = nodes[0].inbound_layers if nodes else []
    return inbound if not isinstance(inbound, (list, tuple)) else (
        inbound[0] if len(inbound) == 1 else None)


def _activation_supported(layer) -> bool:
    name = getattr(layer.activation, "__name__", "")
    return name in ("relu", "swish", "gelu", "relu6", "linear", "softmax", "sigmoid", "tanh")


def quantize_config_for(layer, registry):
    """The QuantizeConfig of `layer` (None: tfmot's own default)."""
    if isinstance(layer, L2.BatchNormalization):
        producer = _producer(layer)
        folded = isinstance(producer, _BN_FOLDED_INTO) and len(producer._outbound_nodes) == 1
        return None if folded else OutputQuantizeConfig()
    if isinstance(layer, L2.Activation):
        return None if _activation_supported(layer) else OutputQuantizeConfig()
    if registry.supports(layer):
        return None
    if isinstance(layer, _OUTPUT_QUANTIZED):
        return OutputQuantizeConfig()
    if isinstance(layer, _PASS_THROUGH):
        return PassThroughQuantizeConfig()
    if isinstance(layer, _KERNEL):
        return KernelQuantizeConfig()
    if isinstance(layer, (L2.SeparableConv2D, L2.SeparableConv1D)):
        return None  # tfmot splits them into depthwise + pointwise convolutions
    raise ConversionError(f"layer {layer.name!r} ({type(layer).__name__}) cannot be "
                          "quantization-aware: neither tfmot's 8-bit registry nor "
                          "ekg_tf.qat.quantize covers it")


def quantize_aware_model(model):
    """The fake-quantized (QAT) tf-keras model of `model` (its weights, tfmot 8-bit scheme)."""
    registry = _qk.default_8bit.Default8BitQuantizeRegistry()

    def annotate(layer):
        config = quantize_config_for(layer, registry)
        return _qk.quantize_annotate_layer(layer, quantize_config=config)

    annotated = tf_keras.models.clone_model(model, clone_function=annotate)
    with _qk.quantize_scope(CUSTOM_OBJECTS):
        return _qk.quantize_apply(annotated)


# ----------------------------------------------------------------------------- calibration
@contextlib.contextmanager
def _calibrating(record: dict, sample=None):
    """Within (eager calls): every MovingAverageQuantizer passes its input through
    unquantized and records (min var, max var, batch ranges, sampled values: `sample` of
    the flattened batch, per-tensor asymmetric quantizers only) instead of moving its range;
    weight (LastValue) and input (AllValues) quantizers take their training-time ranges
    (the current kernel's [min, max]; the inputs seen), which tfmot otherwise sets only
    in the first training step: before it, a kernel is quantized over [-6, 6], which
    rounds most of a conv's weights to 0."""
    q = _qk.quantizers
    originals = {cls: cls.__call__ for cls in (q.MovingAverageQuantizer, q.LastValueQuantizer,
                                               q.AllValuesQuantizer)}

    def record_range(self, inputs, training, weights, **kwargs):
        low, high = weights["min_var"], weights["max_var"]
        axes = list(range(len(inputs.shape) - 1)) if self.per_axis else None
        batch_min = tf.reduce_min(inputs, axis=axes).numpy()
        batch_max = tf.reduce_max(inputs, axis=axes).numpy()
        if self.symmetric:  # as tfmot's MovingAvgQuantize folds a batch range
            ratio = -1.0 if self.narrow_range else -((1 << self.num_bits) - 2) / (
                1 << self.num_bits)
            batch_min, batch_max = (np.minimum(batch_min, batch_max / ratio),
                                    np.maximum(batch_max, batch_min * ratio))
        entry = record.setdefault(id(low), (low, high, [], []))
        entry[2].append((np.minimum(batch_min, 0.0), np.maximum(batch_max, 0.0)))
        if sample is not None and not self.per_axis and not self.symmetric:
            entry[3].append(sample(inputs.numpy().ravel()))
        return inputs

    def training_ranges(cls):
        def call(self, inputs, training, weights, **kwargs):
            return originals[cls](self, inputs, True, weights, **kwargs)
        return call

    q.MovingAverageQuantizer.__call__ = record_range
    q.LastValueQuantizer.__call__ = training_ranges(q.LastValueQuantizer)
    q.AllValuesQuantizer.__call__ = training_ranges(q.AllValuesQuantizer)
    try:
        yield record
    finally:
        for cls, call in originals.items():
            cls.__call__ = call


RANGE_METHODS = ("mse", "minmax")
_SAMPLES_PER_BATCH = 20_000  # values kept per tensor and batch for the `mse` estimator


def calibrate_ranges(model, batches, method: str = "minmax", seed: int = 0) -> int:
    """Sets the quantization ranges of a fresh QAT `model` from `batches` (model-ready
    images, the training batch size), in inference mode (BN moving statistics): kernels
    over their [min, max], the input over all values seen, and every moving-average
    activation range (of the float tensor it quantizes) to, by `method`:
    `minmax`, the mean over the batches of the batch's [min, max] (0 included; the fixed
    point of tfmot's moving average); `mse`, the fraction of the [min, max] over all
    batches with the least int8 round-trip error of the tensor's sampled values.
    Returns the number of activation ranges set."""
    from ekg_tf.export.int8_calibration import mse_range
    if method not in RANGE_METHODS:
        raise ValueError(f"unknown range calibration {method!r}; choose from {RANGE_METHODS}")
    rng = np.random.default_rng(seed)
    record = {}
    with _calibrating(record, sample=lambda v: v if v.size <= _SAMPLES_PER_BATCH else
                      rng.choice(v, _SAMPLES_PER_BATCH, replace=False)):
        for images in batches:
            model(tf.constant(images), training=False)
    for low, high, ranges, samples in record.values():
        lows, highs = [r[0] for r in ranges], [r[1] for r in ranges]
        if method == "mse" and samples:  # per-tensor ranges (tfmot's activation quantizers)
            lo, hi = mse_range(np.concatenate(samples), np.min(lows), np.max(highs))
            lows, highs = [np.full(low.shape, lo)], [np.full(high.shape, hi)]
        low.assign(np.mean(lows, axis=0).reshape(low.shape))
        high.assign(np.mean(highs, axis=0).reshape(high.shape))
    return len(record)


@contextlib.contextmanager
def fixed_activation_ranges():
    """Within (while the training step is traced and run): every MovingAverageQuantizer
    fake-quantizes over its current range and leaves it there (tfmot's inference path;
    the straight-through gradient to its input is unchanged), instead of moving it by the
    moving average of the batch [min, max]."""
    q = _qk.quantizers.MovingAverageQuantizer
    original = q.__call__

    def call(self, inputs, training, weights, **kwargs):
        return original(self, inputs, False, weights, **kwargs)

    q.__call__ = call
    try:
        yield
    finally:
        q.__call__ = original
