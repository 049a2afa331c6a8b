"""Layers of the gated networks: masked conv/dense and the reference batch norm."""
from __future__ import annotations

import tensorflow as tf
import keras

from ekg_tf.models.gates import GateGroup

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def _masked_kernel(kernel, in_group: GateGroup | None, out_group: GateGroup | None):
    """Kernel times the in/out masks, rescaled to the unmasked Frobenius norm (reference)."""
    if in_group is None and out_group is None:
        return kernel
    rank = len(kernel.shape)
    mask = 1.0
    if in_group is not None:
        shape = [1] * rank
        shape[-2] = -1
        mask = mask * tf.reshape(tf.cast(in_group.mask_variable, kernel.dtype), shape)
    if out_group is not None:
        shape = [1] * rank
        shape[-1] = -1
        mask = mask * tf.reshape(tf.cast(out_group.mask_variable, kernel.dtype), shape)
    norm = tf.norm(kernel)
    return tf.math.l2_normalize(kernel * mask) * norm


class GatedConv2D(keras.layers.Layer):
    """Conv2D ('SAME', no bias) whose input/output channels follow gate groups."""

    def __init__(self, filters, kernel_size, strides=1, in_group=None, out_group=None, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.in_group = in_group
        self.out_group = out_group
        self.input_hw = None
        self.output_hw = None

    def build(self, input_shape):
        in_channels = int(input_shape[-1])
        if self.in_group is not None and self.in_group.channels != in_channels:
            raise ValueError(f"{self.name}: input has {in_channels} channels but gate group "
                             f"{self.in_group.name!r} has {self.in_group.channels}")
        self.kernel = self.add_weight(
            name="kernel", shape=(self.kernel_size, self.kernel_size, in_channels, self.filters),
            initializer=keras.initializers.VarianceScaling(2.0, mode="fan_out"))
        if input_shape[1] is not None:
            self.input_hw = (int(input_shape[1]), int(input_shape[2]))
            self.output_hw = tuple(-(-d // self.strides) for d in self.input_hw)

    def call(self, x):
        kernel = _masked_kernel(self.kernel, self.in_group, self.out_group)
        return tf.nn.conv2d(x, kernel, self.strides, "SAME")

    def compute_output_shape(self, input_shape):
        hw = [None if d is None else -(-d // self.strides) for d in input_shape[1:3]]
        return (input_shape[0], *hw, self.filters)


class GatedDense(keras.layers.Layer):
    """Classifier whose input rows follow a gate group."""

    def __init__(self, units, in_group=None, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.in_group = in_group

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(int(input_shape[-1]), self.units),
                                      initializer=keras.initializers.RandomNormal(stddev=1e-2))
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")

    def call(self, x):
        kernel = _masked_kernel(self.kernel, self.in_group, None)
        return tf.matmul(x, kernel) + self.bias

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)


class BatchNorm(keras.layers.Layer):
    """Batch norm as the reference: eps 1e-5, momentum 0.9, biased batch variance.

    `call(x, training, freeze_stats)`: training=True normalises with batch
    statistics; the moving statistics are updated unless `freeze_stats` (the
    search evaluates sub-networks that way). With `synchronized=True` the batch
    statistics are all-reduced over replicas, so N replicas compute exactly what
    one device computes on the global batch.
    """

    def __init__(self, gamma_zero=False, epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                 synchronized=True, **kwargs):
        super().__init__(**kwargs)
        self.gamma_zero = gamma_zero
        self.epsilon = epsilon
        self.momentum = momentum
        self.synchronized = synchronized

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.gamma = self.add_weight(name="gamma", shape=(c,),
                                     initializer="zeros" if self.gamma_zero else "ones")
        self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros")
        self.moving_mean = self.add_weight(name="moving_mean", shape=(c,), initializer="zeros",
                                           trainable=False, aggregation="mean")
        self.moving_variance = self.add_weight(name="moving_variance", shape=(c,),
                                               initializer="ones", trainable=False,
                                               aggregation="mean")

    def _batch_moments(self, x):
        axes = list(range(len(x.shape) - 1))
        ctx = tf.distribute.get_replica_context()
        if self.synchronized and ctx is not None and ctx.num_replicas_in_sync > 1:
            # Two passes, as tf.nn.moments computes them on one device (mean, then the
            # mean squared deviation from it), so N replicas round like one device.
            count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
            total = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                   tf.concat([tf.reduce_sum(x, axes), tf.reshape(count, [1])], 0))
            n = total[-1]
            mean = total[:-1] / n
            squares = tf.reduce_sum(tf.math.squared_difference(x, tf.stop_gradient(mean)), axes)
            variance = ctx.all_reduce(tf.distribute.ReduceOp.SUM, squares) / n
            return mean, variance
        return tf.nn.moments(x, axes)

    def call(self, x, training=False, freeze_stats=False):
        if training:
            mean, variance = self._batch_moments(x)
            if not freeze_stats:
                decay = 1.0 - self.momentum
                self.moving_mean.assign_sub((self.moving_mean - mean) * decay)
                self.moving_variance.assign_sub((self.moving_variance - variance) * decay)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        return tf.nn.batch_normalization(x, mean, variance, self.beta, self.gamma, self.epsilon)

    def compute_output_shape(self, input_shape):
        return input_shape
