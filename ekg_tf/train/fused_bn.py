"""Keras BatchNormalization computed with TensorFlow's fused kernel while training.

Keras 3's BatchNormalization (TensorFlow backend) runs `tf.nn.moments` and
`tf.nn.batch_normalization`: about a dozen element-wise ops forward and more backward
per layer (Mul, SquaredDifference, Sum, Tile, Mean, Sub ...), which in a ResNet-56 step on
a CPU take ~20% of the op time. `FusedBatchNormV3` (oneDNN on CPU, cuDNN on GPU) does the
same in one op each way.

`use_fused_batch_norm(model)` points each plain BN layer's `call` at a fused version with
the same results: batch statistics over all but the channel axis, moving statistics
updated as Keras does (`m * momentum + batch * (1 - momentum)`, the *biased* batch
variance: the fused op returns the Bessel-corrected one, which is undone), float32
arithmetic whatever the compute dtype (as Keras does), inference with the moving
statistics. Layers it cannot serve keep Keras' own call: synchronised BN (several
replicas), renorm, masks, a channel axis other than the last, inputs other than 4-D.
Only the layer objects change (an instance attribute, not serialised): saved models are
standard Keras models.

While training, the kernel is chosen by width (`ekg_tf.graph.bn_kernels`: on a CPU the
fused op only at multiples of 16 channels, elsewhere the same moments and normalisation
as Keras compiled with XLA); inference (moving statistics) is fused at every width.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from ekg_tf.graph import keras_compat
from ekg_tf.graph.bn_kernels import batch_statistics_norm, fused_batch_norm


def _fusable(layer, inputs, mask) -> bool:
    axis = layer.axis if isinstance(layer.axis, int) else None
    rank = len(inputs.shape)
    return (mask is None and rank == 4 and axis in (-1, rank - 1) and not layer.synchronized
            and not layer.renorm)


def _fused_call(layer, keras_call):
    def call(inputs, training=None, mask=None):
        if not _fusable(layer, inputs, mask):
            return keras_call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)
        channels = x.shape[-1]
        gamma = (tf.cast(layer.gamma, tf.float32) if layer.scale
                 else tf.ones([channels], tf.float32))
        beta = (tf.cast(layer.beta, tf.float32) if layer.center
                else tf.zeros([channels], tf.float32))
        if training and layer.trainable:
            y, mean, variance = batch_statistics_norm(x, gamma, beta, layer.epsilon)
            m = layer.momentum
            layer.moving_mean.assign(tf.cast(layer.moving_mean, tf.float32) * m
                                     + mean * (1.0 - m))
            layer.moving_variance.assign(tf.cast(layer.moving_variance, tf.float32) * m
                                         + variance * (1.0 - m))
        else:
            y, _, _ = fused_batch_norm(x, gamma, beta, layer.epsilon,
                                       tf.cast(layer.moving_mean, tf.float32),
                                       tf.cast(layer.moving_variance, tf.float32))
        return tf.cast(y, layer.compute_dtype)

    call.fused_batch_norm = True
    return call


def use_fused_batch_norm(model) -> int:
    """Makes `model`'s plain Keras BN layers compute with the fused kernels (while training,
    the fastest kernel for each width: `bn_kernels.batch_statistics_norm`); returns how
    many layers it serves."""
    count = 0
    for layer in keras_compat.all_layers(model):
        if type(layer) is not keras.layers.BatchNormalization:
            continue
        if getattr(layer.call, "fused_batch_norm", False):
            count += 1
            continue
        layer.call = _fused_call(layer, layer.call)
        count += 1
    return count
