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

On a CPU the fused kernels (oneDNN) train fast only where the channel count is a
multiple of 16: oneDNN computes them in 16-channel blocks, and at other widths its
backward kernel takes 1.5-5x the time of Keras' element-wise ops (7 channels 4x, 13 2.6x,
63 1.5x; `benchmarks/batch_norm_kernels.py` on an AVX-512 Xeon), while at multiples of 16
it is twice as fast as they are. A pruned network's widths are mostly not multiples of 16:
there the training step normalises with the batch statistics as one XLA-compiled function
(the same moments and normalisation as Keras, fused by XLA into a few loops over the
tensor: 1.5-2.6x faster than Keras' ops, forward and backward). Inference (moving
statistics) is fused at every width; on a GPU (cuDNN) everything is fused.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from ekg_tf.graph import keras_compat


# oneDNN's channel block: the fused kernels' fast path on a CPU (see the module docstring).
CPU_CHANNEL_BLOCK = 16


def fast_fused_width(channels: int, on_gpu: bool | None = None) -> bool:
    """Whether the fused kernel is the faster one for a BN layer of `channels` channels:
    always on a GPU; on a CPU at multiples of `CPU_CHANNEL_BLOCK`."""
    if on_gpu is None:
        on_gpu = bool(tf.config.list_logical_devices("GPU"))
    return on_gpu or channels % CPU_CHANNEL_BLOCK == 0


def _fusable(layer, inputs, mask) -> bool:
    axis = layer.axis if isinstance(layer.axis, int) else None
    rank = len(inputs.shape)
    return (mask is None and rank == 4 and axis in (-1, rank - 1) and not layer.synchronized
            and not layer.renorm)


@tf.function(jit_compile=True, autograph=False)
def _compiled_batch_norm(x, gamma, beta, epsilon):
    """Training-mode BN of NHWC `x` with its batch statistics (biased variance, as Keras)
    in one XLA cluster; its gradient is compiled too."""
    mean, variance = tf.nn.moments(x, [0, 1, 2])
    return tf.nn.batch_normalization(x, mean, variance, beta, gamma, epsilon), mean, variance


def _fused(x, gamma, beta, mean, variance, epsilon, training):
    # The raw op: tf.compat.v1.nn.fused_batch_norm raises epsilon to 1.001e-5 (cuDNN's
    # minimum), which would change the reference's 1e-5.
    y, batch_mean, batch_variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=mean, variance=variance, epsilon=float(epsilon),
        exponential_avg_factor=1.0, data_format="NHWC", is_training=training)
    return y, batch_mean, batch_variance


def _training_batch_norm(x, gamma, beta, epsilon):
    """(y, batch mean, biased batch variance): the fused kernel where it is fast, else the
    compiled element-wise one."""
    if not fast_fused_width(int(x.shape[-1])):
        return _compiled_batch_norm(x, gamma, beta, tf.constant(epsilon, tf.float32))
    y, mean, variance = _fused(x, gamma, beta, tf.constant([], tf.float32),
                               tf.constant([], tf.float32), epsilon, True)
    n = tf.cast(tf.size(x) // x.shape[-1], tf.float32)
    return y, mean, variance * ((n - 1.0) / tf.maximum(n, 1.0))  # Bessel undone


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
            y, mean, variance = _training_batch_norm(x, gamma, beta, layer.epsilon)
            m = layer.momentum
            layer.moving_mean.assign(tf.cast(layer.moving_mean, tf.float32) * m
                                     + mean * (1.0 - m))
            layer.moving_variance.assign(tf.cast(layer.moving_variance, tf.float32) * m
                                         + variance * (1.0 - m))
        else:
            y, _, _ = _fused(x, gamma, beta, tf.cast(layer.moving_mean, tf.float32),
                             tf.cast(layer.moving_variance, tf.float32), layer.epsilon, False)
        return tf.cast(y, layer.compute_dtype)

    call.fused_batch_norm = True
    return call


def use_fused_batch_norm(model) -> int:
    """Makes `model`'s plain Keras BN layers compute with the fused kernel (while training,
    at the widths where it is the faster one, `fast_fused_width`; at the others with the
    XLA-compiled batch statistics); returns how many layers it serves."""
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
