"""How each Keras layer type treats channels (the last axis): one `Rule` per family.

A rule answers, for one layer call:
- `transfer(node, ins, ctx)`: the output channel layouts from the input layouts
  (a conv or dense starts a new group of channels; BN, activations, pooling pass
  them on; Add ties its inputs' groups; Concatenate lays them side by side;
  anything not understood pins its channels, with the reason);
- `exit`: whether the layer reads its input channels through weights or changes
  their layout, which is where a gate is placed (before it);
- `zero_preserving`: whether all-zero (gated-off) channels stay zero through it;
- for layers with per-channel weights: which axis of which weight follows the
  input or output channels (`weight_axes`), the multiply-adds (`macs_terms`), the
  layer's computation with given (masked or sliced) weights (`apply`), and the
  smaller layer that holds sliced weights (`rebuild`).

Only channels-last layouts are followed; a layer in channels-first format pins its
channels.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import keras

from ekg_tf.graph.bn_kernels import batch_statistics_norm
from ekg_tf.graph.layout import Layout

IN, OUT = "in", "out"

# Activations f with f(0) = 0 (a gated-off channel stays off through them).
_ZERO_PRESERVING_ACTIVATIONS = {
    "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "tanh",
    "linear", "softsign", "mish", "hard_silu", "hard_swish", "celu", "glu", "tanh_shrink",
    "hard_tanh", "soft_shrink", "hard_shrink", "squareplus_zero"}
# Activations that mix channels.
_CROSS_CHANNEL_ACTIVATIONS = {"softmax", "log_softmax", "sparsemax"}


def activation_name(fn) -> str:
    if fn is None:
        return "linear"
    name = getattr(fn, "__name__", str(fn))
    return name.lower()


@dataclasses.dataclass
class BatchNormStep:
    """How batch normalisation runs in a forward pass.

    mode: `inference` (moving statistics), `batch` (batch statistics, moving
    statistics untouched: the search, the memory bank, BN-statistics evaluation) or
    `train` (batch statistics, moving statistics updated as the reference:
    `m -= (m - batch) * (1 - momentum)`). `sync`: batch statistics of the global
    batch when several replicas run. `record`: a list receiving (node name, mean,
    variance) of every batch-statistics BN (BN re-estimation). `fused`: `batch` mode on
    one replica runs the fastest kernel for the width (`bn_kernels`: FusedBatchNormV3,
    the same normalisation in one op, or moments + batch_normalization compiled with
    XLA; the memory bank uses it).
    """
    mode: str = "inference"
    sync: bool = True
    record: list | None = None
    fused: bool = False


def batch_moments(x, sync: bool = True):
    """Mean and biased variance over every axis but the last; under several replicas
    (and `sync`) those of the global batch, computed in two passes like
    `tf.nn.moments` on one device so that N replicas round like one."""
    axes = list(range(len(x.shape) - 1))
    ctx = tf.distribute.get_replica_context()
    if sync and ctx is not None and ctx.num_replicas_in_sync > 1:
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                               tf.concat([tf.reduce_sum(x, axes), tf.reshape(count, [1])], 0))
        n = total[-1]
        mean = total[:-1] / n
        squares = tf.reduce_sum(tf.math.squared_difference(x, tf.stop_gradient(mean)), axes)
        return mean, ctx.all_reduce(tf.distribute.ReduceOp.SUM, squares) / n
    return tf.nn.moments(x, axes)


def _several_replicas(sync: bool) -> bool:
    ctx = tf.distribute.get_replica_context()
    return sync and ctx is not None and ctx.num_replicas_in_sync > 1


def _reduced_precision(x) -> bool:
    """Whether `x` is a mixed-precision activation (its normalisation: float32 statistics)."""
    return x.dtype in (tf.bfloat16, tf.float16)


def _fused_batch_statistics(x, w, epsilon):
    """BN with the batch's statistics (biased variance), by the fastest kernel for its
    width (`bn_kernels`)."""
    channels = tf.shape(x)[-1]
    dtype = tf.float32 if _reduced_precision(x) else x.dtype  # the statistics' dtype
    gamma = tf.cast(w["gamma"], dtype) if "gamma" in w else tf.ones([channels], dtype)
    beta = tf.cast(w["beta"], dtype) if "beta" in w else tf.zeros([channels], dtype)
    return batch_statistics_norm(x, gamma, beta, epsilon)[0]


def _channels_last(layer) -> bool:
    fmt = getattr(layer, "data_format", "channels_last")
    return fmt in (None, "channels_last")


def positions(shape) -> int:
    """Product of the dimensions between the batch and the channel axis."""
    dims = shape[1:-1]
    if any(d is None for d in dims):
        return -1
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


# ----------------------------------------------------------------------------- base rules
class Rule:
    exit = False
    zero_preserving = False
    weighted = False          # per-channel weights: apply/rebuild/weight_axes below
    float32_statistics = False  # normalisation: float32 weights and statistics in mixed
                                # precision (its apply takes x in any dtype)
    produces = False          # its outputs are new channels (conv, dense)

    def problem(self, node, ins, ctx) -> str | None:
        """Why this call's channels cannot be followed (it is then an `Unknown`), if so."""
        return None

    def transfer(self, node, ins, ctx) -> list:
        """The output layouts (`problem` is None)."""
        raise NotImplementedError

    def clean(self, node, ins_clean) -> bool:
        return self.zero_preserving and all(ins_clean)

    # Layers whose computation depends on the width of their channels beyond their
    # weights (e.g. a Reshape to a fixed channel count) override these two.
    def sliced_call(self, node, args, kwargs):
        return node.layer(*args, **kwargs)

    def clone(self, node, out_widths, name):
        """A fresh copy of the layer, named `name`, for a rebuilt (slimmed) model."""
        layer = node.layer
        if isinstance(layer, keras.layers.Layer):
            try:
                return type(layer).from_config({**layer.get_config(), "name": name})
            except Exception:  # a custom layer without a config round trip: reuse it
                return layer
        return layer  # stateless Keras operations are reused


class Unknown(Rule):
    """A layer the tracer does not understand: its channels are pinned (never pruned)."""
    exit = True

    def __init__(self, reason=None):
        self.reason = reason

    def transfer(self, node, ins, ctx):
        reason = self.reason or (f"{node.kind} is not understood by the channel tracer; "
                                 "its input and output channels are kept whole")
        ctx.pin(ins, node, reason)
        outs = [ctx.new_atom(node, i) for i in range(len(node.outputs))]
        ctx.pin(outs, node, reason)
        return outs


class Channelwise(Rule):
    """Acts on each channel on its own at each position (activations, dropout, ...)."""

    def __init__(self, zero_preserving=False):
        self.zero_preserving = zero_preserving

    def transfer(self, node, ins, ctx):
        return [ins[0]]


class Spatial(Channelwise):
    """Moves or pools positions, channel by channel (pooling, padding, cropping...)."""

    def __init__(self, zero_preserving=True, exit=False):
        self.zero_preserving = zero_preserving
        self.exit = exit

    def problem(self, node, ins, ctx):
        if not _channels_last(node.layer):
            return "channels_first data format"
        if ins[0].tile != 1:
            return "acts on a flattened feature map"
        return None


class ActivationRule(Channelwise):
    def transfer(self, node, ins, ctx):
        name = activation_name(getattr(node.layer, "activation", None))
        if name in _CROSS_CHANNEL_ACTIVATIONS:
            ctx.pin(ins, node, f"{name} mixes the channels of its input")
        return [ins[0]]

    def clean(self, node, ins_clean):
        name = activation_name(getattr(node.layer, "activation", None))
        return name in _ZERO_PRESERVING_ACTIVATIONS and all(ins_clean)


class SoftmaxRule(Channelwise):
    def transfer(self, node, ins, ctx):
        ctx.pin(ins, node, f"{node.kind} normalises across channels")
        return [ins[0]]


class RescalingRule(Channelwise):
    def transfer(self, node, ins, ctx):
        layer = node.layer
        if np.size(layer.scale) > 1 or np.size(layer.offset) > 1:
            ctx.pin(ins, node, "per-channel scale/offset are kept whole")
        return [ins[0]]

    def clean(self, node, ins_clean):
        return float(np.max(np.abs(node.layer.offset))) == 0.0 and all(ins_clean)


class Merge(Rule):
    """Add, Subtract, Multiply, Maximum, Minimum, Average: channels are tied position-wise."""

    def __init__(self, any_clean=False):
        self.any_clean = any_clean  # Multiply: one all-zero factor zeroes the product
        self.zero_preserving = True

    def transfer(self, node, ins, ctx):
        tied = [layout for layout in ins if layout.width != 1]  # width 1: broadcast
        if tied:
            ctx.union(tied, node)
            return [tied[0]]
        return [ins[0]]

    def clean(self, node, ins_clean):
        return any(ins_clean) if self.any_clean else all(ins_clean)


class ConcatenateRule(Rule):
    exit = True
    zero_preserving = True

    def problem(self, node, ins, ctx):
        if self._on_channels(node, ctx) and any(layout.tile != 1 for layout in ins):
            return "concatenates flattened feature maps"
        return None

    @staticmethod
    def _on_channels(node, ctx) -> bool:
        rank = len(ctx.shape(node.inputs[0]))
        return node.layer.axis % rank == rank - 1

    def transfer(self, node, ins, ctx):
        if not self._on_channels(node, ctx):  # joined along another axis: tied like Add
            return Merge().transfer(node, ins, ctx)
        out = ins[0]
        for layout in ins[1:]:
            out = out.concat(layout)
        return [out]


class FlattenRule(Rule):
    exit = True
    zero_preserving = True

    def problem(self, node, ins, ctx):
        if not _channels_last(node.layer):
            return "channels_first data format"
        if positions(ctx.shape(node.inputs[0])) < 0:
            return "flattens a feature map of unknown size"
        return None

    def transfer(self, node, ins, ctx):
        count = positions(ctx.shape(node.inputs[0]))
        return [Layout(ins[0].segments, ins[0].tile * count)]

    def sliced_call(self, node, args, kwargs):
        x = args[0]
        return tf.reshape(x, [tf.shape(x)[0], -1])


class ReshapeRule(Rule):
    """Keeps the channel axis (e.g. [B, C] -> [B, 1, 1, C]) or flattens a feature map."""
    exit = True
    zero_preserving = True

    def _kind(self, node, ctx):
        in_shape, out_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
        if in_shape[-1] is not None and out_shape[-1] == in_shape[-1]:
            return "keep"
        if len(out_shape) == 2 and positions(in_shape) > 0:
            return "flatten"
        return None

    def problem(self, node, ins, ctx):
        kind = self._kind(node, ctx)
        if kind == "flatten" or (kind == "keep" and ins[0].tile == 1):
            return None
        return "reshape that moves channels to other axes"

    def transfer(self, node, ins, ctx):
        if self._kind(node, ctx) == "keep":
            return [ins[0]]
        return FlattenRule.transfer(self, node, ins, ctx)

    def sliced_call(self, node, args, kwargs):
        x = args[0]
        target = tuple(node.layer.target_shape)
        if len(target) == 1:
            return tf.reshape(x, [tf.shape(x)[0], -1])
        return tf.reshape(x, [tf.shape(x)[0], *target[:-1], tf.shape(x)[-1]])

    def clone(self, node, out_widths, name):
        config = {**node.layer.get_config(), "name": name}
        target = list(config["target_shape"])
        target[-1] = int(out_widths[0])
        config["target_shape"] = tuple(target)
        return type(node.layer).from_config(config)


class GlobalPooling(Spatial):
    def __init__(self):
        super().__init__(zero_preserving=True, exit=True)


# ----------------------------------------------------------------------------- weighted
class Weighted(Rule):
    """A layer with per-channel weights, computed here from given (masked/sliced) weights."""
    weighted = True
    exit = True
    kernels = ()              # weights rescaled to the unpruned norm when an axis is pruned

    def weight_names(self, layer) -> list:
        """Attribute names of the layer's weights in `layer.get_weights()` order."""
        raise NotImplementedError

    def weight_axes(self, node) -> dict:
        """{weight name: per-axis role}: IN / OUT follow the input / output layout."""
        raise NotImplementedError

    def macs_terms(self, node, ctx) -> list:
        """[(coefficient, roles)]: multiply-adds = sum coefficient * prod(width(role))."""
        return []

    def apply(self, node, x, w, training, bn: BatchNormStep, channel_mask=None):
        raise NotImplementedError

    def rebuild(self, node, in_width, out_width, name):
        """The layer for `in_width` input and `out_width` output channels, named `name`."""
        return type(node.layer).from_config({**node.layer.get_config(), "name": name})


def _bias_activation(layer, y, w):
    """The end of a conv/dense layer's call: + bias, then its activation."""
    if "bias" in w:
        y = y + w["bias"]
    return y if layer.activation is None else layer.activation(y)


def _convolution_problem(layer, layout) -> str | None:
    """Why a convolution's channels cannot be followed, if they cannot."""
    if not _channels_last(layer):
        return "channels_first data format"
    if getattr(layer, "groups", 1) != 1:
        return f"grouped convolution (groups={layer.groups})"
    if getattr(layer, "depth_multiplier", 1) != 1:
        return f"depth_multiplier {layer.depth_multiplier} (only 1 is followed)"
    if layer.padding == "causal":
        return "causal padding"
    if layout.tile != 1:
        return "convolves a flattened feature map"
    return None


class ConvRule(Weighted):
    """Conv1D / Conv2D: input channels read through the kernel, output channels new."""
    kernels = ("kernel",)
    produces = True

    def problem(self, node, ins, ctx):
        return _convolution_problem(node.layer, ins[0])

    def transfer(self, node, ins, ctx):
        ctx.consume(node, ins[0])
        return [ctx.new_atom(node, 0)]

    def weight_names(self, layer):
        return ["kernel"] + (["bias"] if layer.use_bias else [])

    # The roles of the kernel's last two axes and of the bias (depthwise: both follow
    # the input channels).
    kernel_roles = (IN, OUT)
    bias_role = OUT

    def weight_axes(self, node):
        rank = len(node.layer.kernel.shape)
        axes = {"kernel": (None,) * (rank - 2) + self.kernel_roles}
        if node.layer.use_bias:
            axes["bias"] = (self.bias_role,)
        return axes

    def macs_terms(self, node, ctx):
        area = int(np.prod(node.layer.kernel.shape[:-2]))
        roles = tuple(r for r in self.kernel_roles if r)
        return [(area * positions(ctx.shape(node.outputs[0])), roles)]

    def apply(self, node, x, w, training, bn, channel_mask=None):
        layer = node.layer
        rank = len(layer.kernel.shape) - 2
        strides = layer.strides if isinstance(layer.strides, (tuple, list)) else (
            (layer.strides,) * rank)
        dilations = (layer.dilation_rate if isinstance(layer.dilation_rate, (tuple, list))
                     else (layer.dilation_rate,) * rank)
        y = tf.nn.convolution(x, w["kernel"], strides=list(strides),
                              padding=layer.padding.upper(), dilations=list(dilations))
        return _bias_activation(layer, y, w)

    def rebuild(self, node, in_width, out_width, name):
        config = {**node.layer.get_config(), "name": name, "filters": int(out_width)}
        return type(node.layer).from_config(config)


class DenseRule(Weighted):
    kernels = ("kernel",)
    produces = True

    def transfer(self, node, ins, ctx):
        ctx.consume(node, ins[0])
        return [ctx.new_atom(node, 0)]

    def weight_names(self, layer):
        return ["kernel"] + (["bias"] if layer.use_bias else [])

    def weight_axes(self, node):
        axes = {"kernel": (IN, OUT)}
        if node.layer.use_bias:
            axes["bias"] = (OUT,)
        return axes

    def macs_terms(self, node, ctx):
        return [(positions(ctx.shape(node.inputs[0])), (IN, OUT))]

    def apply(self, node, x, w, training, bn, channel_mask=None):
        if len(x.shape) == 2:
            y = tf.matmul(x, w["kernel"])
        else:
            y = tf.tensordot(x, w["kernel"], [[len(x.shape) - 1], [0]])
        return _bias_activation(node.layer, y, w)

    def rebuild(self, node, in_width, out_width, name):
        config = {**node.layer.get_config(), "name": name, "units": int(out_width)}
        return type(node.layer).from_config(config)


class DepthwiseRule(ConvRule):
    """DepthwiseConv with depth_multiplier 1: one filter per channel (in = out)."""
    produces = False
    rebuild = Weighted.rebuild  # the width follows the input: nothing to set

    kernel_roles = (IN, None)
    bias_role = IN

    def transfer(self, node, ins, ctx):
        return [ins[0]]

    def apply(self, node, x, w, training, bn, channel_mask=None):
        layer = node.layer
        kernel = w["kernel"]
        if len(kernel.shape) == 3:  # DepthwiseConv1D: through the 2-D op
            y = tf.nn.depthwise_conv2d(
                x[:, None], kernel[None], strides=[1, 1, layer.strides[0], 1],
                padding=layer.padding.upper(), dilations=[1, layer.dilation_rate[0]])[:, 0]
        else:
            y = tf.nn.depthwise_conv2d(x, kernel, strides=[1, *layer.strides, 1],
                                       padding=layer.padding.upper(),
                                       dilations=list(layer.dilation_rate))
        return _bias_activation(layer, y, w)


class SeparableRule(ConvRule):
    """SeparableConv2D with depth_multiplier 1: depthwise (in = in), then pointwise (in -> out)."""
    kernels = ("depthwise_kernel", "pointwise_kernel")

    def weight_names(self, layer):
        return ["depthwise_kernel", "pointwise_kernel"] + (["bias"] if layer.use_bias else [])

    def weight_axes(self, node):
        axes = {"depthwise_kernel": (None, None, IN, None),
                "pointwise_kernel": (None, None, IN, OUT)}
        if node.layer.use_bias:
            axes["bias"] = (OUT,)
        return axes

    def macs_terms(self, node, ctx):
        area = int(np.prod(node.layer.depthwise_kernel.shape[:2]))
        pos = positions(ctx.shape(node.outputs[0]))
        return [(area * pos, (IN,)), (pos, (IN, OUT))]

    def apply(self, node, x, w, training, bn, channel_mask=None):
        layer = node.layer
        y = tf.nn.separable_conv2d(x, w["depthwise_kernel"], w["pointwise_kernel"],
                                   strides=[1, *layer.strides, 1],
                                   padding=layer.padding.upper(),
                                   dilations=list(layer.dilation_rate))
        return _bias_activation(layer, y, w)


class BatchNormRule(Weighted):
    exit = False
    float32_statistics = True

    def problem(self, node, ins, ctx):
        layer = node.layer
        rank = len(ctx.shape(node.inputs[0]))
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        if axis % rank != rank - 1 or ins[0].tile != 1:
            return "batch normalisation over an axis other than the channels"
        return None

    def transfer(self, node, ins, ctx):
        return [ins[0]]

    def weight_names(self, layer):
        names = (["gamma"] if layer.scale else []) + (["beta"] if layer.center else [])
        return names + ["moving_mean", "moving_variance"]

    def weight_axes(self, node):
        return {name: (IN,) for name in self.weight_names(node.layer)}

    def apply(self, node, x, w, training, bn, channel_mask=None):
        layer = node.layer
        if bn.fused and bn.mode == "batch" and bn.record is None and len(x.shape) == 4 \
                and not _several_replicas(bn.sync):
            return _fused_batch_statistics(x, w, layer.epsilon)  # float32 statistics
        if _reduced_precision(x):  # the statistics in float32
            return tf.cast(self.apply(node, tf.cast(x, tf.float32), w, training, bn), x.dtype)
        if bn.mode == "inference":
            mean, variance = w["moving_mean"], w["moving_variance"]
        else:
            mean, variance = batch_moments(x, bn.sync)
            if bn.record is not None:
                bn.record.append((node.name, mean, variance))
            if bn.mode == "train":
                decay = 1.0 - layer.momentum
                layer.moving_mean.assign_sub((layer.moving_mean - mean) * decay)
                layer.moving_variance.assign_sub((layer.moving_variance - variance) * decay)
        return tf.nn.batch_normalization(x, mean, variance, w.get("beta"), w.get("gamma"),
                                         layer.epsilon)

    def clean(self, node, ins_clean):
        return False


class LayerNormRule(Weighted):
    """LayerNormalization over the channel axis; statistics over the kept channels."""
    exit = False
    float32_statistics = True

    def problem(self, node, ins, ctx):
        layer = node.layer
        rank = len(ctx.shape(node.inputs[0]))
        axes = [a % rank for a in (layer.axis if isinstance(layer.axis, (list, tuple))
                                   else [layer.axis])]
        if axes != [rank - 1] or ins[0].tile != 1 or getattr(layer, "rms_scaling", False):
            return "layer normalisation over other axes than the channels alone"
        return None

    def transfer(self, node, ins, ctx):
        return [ins[0]]

    def weight_names(self, layer):
        return (["gamma"] if layer.scale else []) + (["beta"] if layer.center else [])

    def weight_axes(self, node):
        return {name: (IN,) for name in self.weight_names(node.layer)}

    def apply(self, node, x, w, training, bn, channel_mask=None):
        layer = node.layer
        if _reduced_precision(x):  # the statistics in float32
            return tf.cast(self.apply(node, tf.cast(x, tf.float32), w, training, bn,
                                      channel_mask), x.dtype)
        if channel_mask is None:
            mean, variance = tf.nn.moments(x, [len(x.shape) - 1], keepdims=True)
        else:  # statistics of the kept channels only (what the slimmed layer computes)
            m = tf.cast(channel_mask, x.dtype)
            n = tf.reduce_sum(m)
            mean = tf.reduce_sum(x * m, -1, keepdims=True) / n
            variance = tf.reduce_sum(tf.square(x - mean) * m, -1, keepdims=True) / n
        y = (x - mean) * tf.math.rsqrt(variance + layer.epsilon)
        if "gamma" in w:
            y = y * w["gamma"]
        if "beta" in w:
            y = y + w["beta"]
        return y

    def clean(self, node, ins_clean):
        return False


# ----------------------------------------------------------------------------- registry
_L = keras.layers
_RULES = [
    ((_L.Conv1D, _L.Conv2D), lambda layer: ConvRule()),
    ((_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose, _L.Conv3D),
     lambda layer: Unknown(f"{type(layer).__name__} is not followed by the channel tracer")),
    ((_L.DepthwiseConv1D, _L.DepthwiseConv2D), lambda layer: DepthwiseRule()),
    ((_L.SeparableConv1D,), lambda layer: Unknown("SeparableConv1D is not followed")),
    ((_L.SeparableConv2D,), lambda layer: SeparableRule()),
    ((_L.Dense,), lambda layer: DenseRule()),
    ((_L.BatchNormalization,), lambda layer: BatchNormRule()),
    ((_L.LayerNormalization,), lambda layer: LayerNormRule()),
    ((_L.Softmax,), lambda layer: SoftmaxRule()),
    ((_L.Activation,), lambda layer: ActivationRule()),
    ((_L.ReLU, _L.LeakyReLU, _L.ELU), lambda layer: Channelwise(zero_preserving=True)),
    ((_L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D,
      _L.AlphaDropout, _L.ActivityRegularization, _L.Identity),
     lambda layer: Channelwise(zero_preserving=not isinstance(layer, _L.AlphaDropout))),
    ((_L.GaussianNoise, _L.GaussianDropout), lambda layer: Channelwise(zero_preserving=False)),
    ((_L.Rescaling,), lambda layer: RescalingRule()),
    ((_L.Normalization,), lambda layer: Unknown(
        "Normalization holds per-channel statistics, kept whole (usually at the input)")),
    ((_L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D, _L.AveragePooling1D,
      _L.AveragePooling2D, _L.AveragePooling3D, _L.ZeroPadding1D, _L.ZeroPadding2D,
      _L.ZeroPadding3D, _L.Cropping1D, _L.Cropping2D, _L.Cropping3D, _L.UpSampling1D,
      _L.UpSampling2D, _L.UpSampling3D), lambda layer: Spatial()),
    ((_L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D, _L.GlobalAveragePooling3D,
      _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D),
     lambda layer: GlobalPooling()),
    ((_L.Add, _L.Subtract, _L.Maximum, _L.Minimum, _L.Average), lambda layer: Merge()),
    ((_L.Multiply,), lambda layer: Merge(any_clean=True)),
    ((_L.Concatenate,), lambda layer: ConcatenateRule()),
    ((_L.Flatten,), lambda layer: FlattenRule()),
    ((_L.Reshape,), lambda layer: ReshapeRule()),
]

# Keras operations recorded by the functional API (`x + y`, `keras.ops.relu(x)`, ...).
_OP_MERGES = {"Add": Merge(), "Subtract": Merge(), "Maximum": Merge(), "Minimum": Merge(),
              "Multiply": Merge(any_clean=True)}
_OP_ACTIVATIONS = {"Relu": True, "Relu6": True, "LeakyRelu": True, "Elu": True, "Selu": True,
                   "Gelu": True, "Silu": True, "Tanh": True, "Sigmoid": False,
                   "HardSigmoid": False, "HardSilu": True, "Softplus": False,
                   "Softsign": True, "Mish": True, "Celu": True}


def rule_for(layer) -> Rule:
    """The rule of a layer (an `Unknown` rule, which pins channels, when none fits)."""
    for classes, make in _RULES:
        if type(layer) in classes:  # exact classes: a subclass may compute otherwise
            return make(layer)
    name = type(layer).__name__
    module = type(layer).__module__
    if module.startswith("keras.src.ops"):
        if name in _OP_MERGES:
            return _OP_MERGES[name]
        if name in _OP_ACTIVATIONS:
            return Channelwise(zero_preserving=_OP_ACTIVATIONS[name])
    if isinstance(layer, _L.Lambda):
        return Unknown("Lambda layers are opaque to the channel tracer")
    return Unknown()


def weight_variables(node) -> dict:
    """{weight name: variable} of a weighted node's layer."""
    rule = rule_for(node.layer)
    return {name: getattr(node.layer, name) for name in rule.weight_names(node.layer)}

