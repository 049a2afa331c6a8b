"""Batch normalisation with the batch's statistics: the fastest kernel for each width.

Two computations of the same thing, NHWC, biased batch variance (as Keras keeps it):

- `FusedBatchNormV3` (oneDNN on a CPU, cuDNN on a GPU): one op forward, one backward.
  On a CPU oneDNN computes it in 16-channel blocks and is fast only where the channel
  count is a multiple of 16; at other widths its kernels, the backward one above all,
  take 1.5-5x the time of the element-wise ops (training at 7 channels 4x, 13 2.6x,
  63 1.5x; `benchmarks/batch_norm_kernels.py` on an AVX-512 Xeon), while at multiples of
  16 it is twice as fast as they are.
- `compiled_batch_norm`: Keras' `tf.nn.moments` + `tf.nn.batch_normalization` as one
  XLA-compiled function (its gradient compiled too), which XLA fuses into a few loops
  over the tensor: 1.5-2.6x faster than the same ops uncompiled, forward and backward.

A pruned network's widths are mostly not multiples of 16: `batch_statistics_norm` runs
the fused op where it is fast (every width on a GPU) and the compiled one elsewhere.
"""
from __future__ import annotations

import functools

import tensorflow as tf

# oneDNN's channel block on a CPU: the fused kernels' fast path.
CPU_CHANNEL_BLOCK = 16


@functools.lru_cache(maxsize=None)
def _gpu_visible() -> bool:
    return bool(tf.config.list_logical_devices("GPU"))


def fast_fused_width(channels, on_gpu: bool | None = None):
    """Whether the fused kernel is the faster one at `channels` channels (an int, or a
    scalar tensor: then a boolean tensor on a CPU): always on a GPU; on a CPU at
    multiples of `CPU_CHANNEL_BLOCK`."""
    return (_gpu_visible() if on_gpu is None else on_gpu) or channels % CPU_CHANNEL_BLOCK == 0


def fused_batch_norm(x, gamma, beta, epsilon, mean=None, variance=None):
    """(y, mean, variance) of `FusedBatchNormV3`: with the batch's statistics when `mean`
    is None (the variance it returns is Bessel-corrected), else with the ones given."""
    training = mean is None
    if training:
        mean = variance = tf.constant([], gamma.dtype)
    # The raw op: tf.compat.v1.nn.fused_batch_norm raises epsilon to 1.001e-5 (cuDNN's
    # minimum), which would change the reference's 1e-5.
    y, batch_mean, batch_variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=mean, variance=variance, epsilon=float(epsilon),
        exponential_avg_factor=1.0, data_format="NHWC", is_training=training)
    return y, batch_mean, batch_variance


@tf.function(jit_compile=True, autograph=False)
def compiled_batch_norm(x, gamma, beta, epsilon):
    """(y, mean, biased variance) of NHWC `x` normalised with its batch statistics, in one
    XLA cluster (compiled once per input shape); computed in gamma's dtype, y in x's."""
    # The statistics as one reduction over a [N*H*W, C] view: XLA's CPU backend turns the
    # reduction over axes (0, 1, 2) into reduce-window loops and a separate cast pass,
    # 1.1-1.8x slower forward and backward at the pruned widths (7-61 channels).
    xf = tf.cast(tf.reshape(x, [-1, tf.shape(x)[-1]]), gamma.dtype)
    mean, variance = tf.nn.moments(xf, [0])
    y = tf.nn.batch_normalization(xf, mean, variance, beta, gamma, epsilon)
    return tf.reshape(tf.cast(y, x.dtype), tf.shape(x)), mean, variance


def batch_statistics_norm(x, gamma, beta, epsilon):
    """(y, mean, biased variance): NHWC `x` normalised with its batch statistics by the
    kernel that is fastest at its width (chosen when the graph runs if the channel count
    is not static, as in the sliced forward). `x` may be bfloat16 or float16 with float32
    gamma and beta: both kernels then take the statistics in float32 and return y in x's
    dtype, without a cast of x of their own (forward only: the memory bank)."""
    def fused():
        y, mean, variance = fused_batch_norm(x, gamma, beta, epsilon)
        n = tf.cast(tf.size(x) // tf.shape(x)[-1], variance.dtype)
        return y, mean, variance * ((n - 1.0) / tf.maximum(n, 1.0))  # Bessel undone

    def compiled():
        return compiled_batch_norm(x, gamma, beta, tf.constant(epsilon, gamma.dtype))

    channels = tf.shape(x)[-1] if x.shape[-1] is None else int(x.shape[-1])
    fast = fast_fused_width(channels)  # a bool, or a boolean tensor when not static
    if isinstance(fast, bool):
        return fused() if fast else compiled()
    return tf.cond(fast, fused, compiled)
