"""Physical pruning: a gated model + sub-network -> an ordinary, smaller Keras model.

Public API (shared by fine-tuning and export):

- `slim_model(gated_model, spec=None, name=None) -> keras.Model`: a plain Keras 3
  functional model (Conv2D / BatchNormalization / ReLU / Add / MaxPooling2D /
  GlobalAveragePooling2D / Dense only; no gates, no Lambda, no custom objects)
  holding the kept channels of `spec` (default: the model's current gate
  state). Kernels are sliced by the kept in/out channels and rescaled to the
  unmasked Frobenius norm exactly as `ekg_tf.models.layers._masked_kernel`, so
  with BN in inference mode its logits equal the gated model's under `spec`.
  Layer names mirror the gated model: `conv`, `bn`, `block0_0_conv1`,
  `block0_0_bn1`, ..., `block1_0_conv3` (projection), `fc`.
- `recalibrate_batch_norm(model, images, batch_size=256)`: re-estimates every BN's
  moving mean/variance as the exact pooled statistics over `images` (normalised
  float32 *training* images; never evaluation data), for a slim Keras model or
  a `GatedResNet`. Needed after slimming (spec section 9: the stored statistics
  no longer fit) and before any evaluation/export of non-fine-tuned weights.
- `fold_batch_norm(slim_model) -> keras.Model`: the same function with every
  Conv2D -> BatchNormalization pair replaced by one biased Conv2D (deployment).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import keras

from ekg_tf.models.layers import BN_EPSILON, BN_MOMENTUM, BatchNorm

_L2_EPS = 1e-12  # tf.math.l2_normalize's epsilon on the squared norm


# ----------------------------------------------------------------------------- slimming

def kept_indices_for(gated_model, spec=None) -> dict:
    """{group name: kept channel indices (sorted)} from `spec`, else the model's gates."""
    if spec is None:
        return {g.name: g.kept_indices() for g in gated_model.gate_groups}
    spec.check_fits(gated_model)
    return {name: np.asarray(state.kept_indices(), np.int64)
            for name, state in spec.groups.items()}


def _channels(kept: dict, group, full: int) -> np.ndarray:
    return np.arange(full) if group is None else kept[group.name]


def sliced_kernel(kernel: np.ndarray, in_idx, out_idx, rescale: bool) -> np.ndarray:
    """kernel[..., in_idx, out_idx] times ||kernel|| / ||slice|| (the masked-kernel rescale)."""
    kernel = np.asarray(kernel)
    sliced = np.take(np.take(kernel, in_idx, axis=-2), out_idx, axis=-1)
    if not rescale:
        return sliced.astype(np.float32)
    full = np.sqrt(np.sum(np.square(kernel, dtype=np.float64)))
    part = np.sum(np.square(sliced, dtype=np.float64))
    scale = full / np.sqrt(max(part, _L2_EPS))
    return (sliced.astype(np.float64) * scale).astype(np.float32)


def _conv_weights(conv, kept):
    kernel = conv.kernel.numpy()
    in_idx = _channels(kept, conv.in_group, kernel.shape[-2])
    out_idx = _channels(kept, conv.out_group, kernel.shape[-1])
    rescale = conv.in_group is not None or conv.out_group is not None
    return sliced_kernel(kernel, in_idx, out_idx, rescale), out_idx


def _bn_weights(bn, out_idx):
    return [np.asarray(v.numpy())[out_idx].astype(np.float32)
            for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)]


def slim_model(gated_model, spec=None, name: str | None = None) -> keras.Model:
    """The physically pruned plain Keras model of `gated_model` under `spec` (see module doc).

    `spec` (a `SubnetSpec`) does not change the gated model; without it the
    model's current gate state is used. Parity with the gated model holds when
    the gated model runs under the same sub-network (`spec.apply_to(model)`).
    """
    kept = kept_indices_for(gated_model, spec)
    arch = gated_model.arch
    weights = {}  # layer name -> list of arrays, set after the graph is built

    def conv_bn(x, conv, bn, conv_name, bn_name):
        kernel, out_idx = _conv_weights(conv, kept)
        layer = keras.layers.Conv2D(kernel.shape[-1], conv.kernel_size, conv.strides,
                                    padding="same", use_bias=False, name=conv_name)
        weights[conv_name] = [kernel]
        x = layer(x)
        weights[bn_name] = _bn_weights(bn, out_idx)
        return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                               name=bn_name)(x)

    inputs = keras.Input(shape=tuple(gated_model.image_shape), name="images")
    x = conv_bn(inputs, gated_model.stem_conv, gated_model.stem_bn, "conv", "bn")
    x = keras.layers.ReLU(name="relu")(x)
    if arch.imagenet_stem:
        x = keras.layers.MaxPooling2D(3, 2, padding="same", name="max_pool")(x)
    for block in gated_model.blocks:
        prefix = block.name
        shortcut = x
        if block.projection is not None:
            shortcut = conv_bn(x, block.projection, block.projection_bn,
                               f"{prefix}_{block.projection.name}",
                               f"{prefix}_{block.projection_bn.name}")
        y = x
        for i, (conv, bn) in enumerate(zip(block.convs, block.bns)):
            y = conv_bn(y, conv, bn, f"{prefix}_{conv.name}", f"{prefix}_{bn.name}")
            if i < len(block.convs) - 1:
                y = keras.layers.ReLU(name=f"{prefix}_relu{conv.name[-1]}")(y)
        x = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
        x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    fc = gated_model.fc
    fc_kernel = fc.kernel.numpy()
    in_idx = _channels(kept, fc.in_group, fc_kernel.shape[0])
    kernel = sliced_kernel(fc_kernel, in_idx, np.arange(fc_kernel.shape[1]),
                           rescale=fc.in_group is not None)
    weights["fc"] = [kernel, fc.bias.numpy().astype(np.float32)]
    logits = keras.layers.Dense(fc.units, name="fc")(x)
    model = keras.Model(inputs, logits, name=name or f"{arch.name}_slim")
    for layer_name, arrays in weights.items():
        model.get_layer(layer_name).set_weights(arrays)
    return model


# ----------------------------------------------------------------------- BN re-estimation

def _batch_norm_layers(model):
    if hasattr(model, "batch_norms") and hasattr(model, "gate_groups"):  # GatedResNet
        return [bn for bn, _ in model.batch_norms()]
    layers = [l for l in model._flatten_layers(include_self=False, recursive=True)
              if isinstance(l, (keras.layers.BatchNormalization, BatchNorm))]
    return layers


def _forward_training(model):
    """A compiled training-mode forward pass (BN normalises with batch statistics)."""
    if hasattr(model, "gate_groups"):
        return tf.function(lambda x: model(x, training=True, freeze_bn_stats=False))
    return tf.function(lambda x: model(x, training=True))


def recalibrate_batch_norm(model, images, batch_size: int = 256, progress=None) -> dict:
    """Sets every BN's moving statistics to the pooled statistics over `images`.

    `images`: normalised float32 NHWC *training* images (numpy or tensor);
    never evaluation data (spec section 9: that leaks the test set). Works for a
    slim/folded-free Keras model (keras BatchNormalization) and a `GatedResNet`
    (`ekg_tf.models.layers.BatchNorm`).

    One training-mode pass (each BN normalises with its batch statistics, as
    when the statistics are gathered in training); for every batch the BN
    momentum is 0 so the moving variables hold exactly that batch's mean and
    biased variance, which are pooled into the exact population mean and
    variance over all images (cumulative, not an exponential moving average):
    mean = sum n_b m_b / N, var = sum n_b (v_b + m_b^2) / N - mean^2.
    Returns {"images": N, "batch_norms": count}.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"recalibrate_batch_norm needs a non-empty NHWC image batch, "
                         f"got shape {images.shape}")
    bns = _batch_norm_layers(model)
    if not bns:
        return {"images": int(len(images)), "batch_norms": 0}
    saved = [(bn.momentum, getattr(bn, "trainable", True)) for bn in bns]
    old_stats = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in bns]
    done = False
    sums = [np.zeros(bn.moving_mean.shape, np.float64) for bn in bns]
    squares = [np.zeros(bn.moving_mean.shape, np.float64) for bn in bns]
    try:
        for bn in bns:
            bn.momentum = 0.0
            bn.trainable = True  # keras BN only uses batch statistics when trainable
        forward = _forward_training(model)  # traced after the change: momentum 0 baked in
        total = 0
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            for bn in bns:
                # From zero, "m - (m - batch) * 1" is exact (no cancellation against
                # the previous value for channels of tiny variance).
                bn.moving_mean.assign(tf.zeros_like(bn.moving_mean))
                bn.moving_variance.assign(tf.zeros_like(bn.moving_variance))
            forward(tf.constant(batch))
            n = len(batch)
            total += n
            for i, bn in enumerate(bns):
                mean = bn.moving_mean.numpy().astype(np.float64)
                var = bn.moving_variance.numpy().astype(np.float64)
                sums[i] += n * mean
                squares[i] += n * (var + mean * mean)
            if progress is not None:
                progress.update(1, items=n)
        for i, bn in enumerate(bns):
            mean = sums[i] / total
            var = np.maximum(squares[i] / total - mean * mean, 0.0)
            bn.moving_mean.assign(mean.astype(np.float32))
            bn.moving_variance.assign(var.astype(np.float32))
        done = True
    finally:
        for bn, (momentum, trainable), (mean, var) in zip(bns, saved, old_stats):
            if not done:  # interrupted: leave the statistics as they were
                bn.moving_mean.assign(mean)
                bn.moving_variance.assign(var)
            bn.momentum = momentum
            bn.trainable = trainable
    return {"images": int(total), "batch_norms": len(bns)}


# ------------------------------------------------------------------------------ BN folding

def fold_batch_norm(model: keras.Model, name: str | None = None) -> keras.Model:
    """A copy of a slim model with each Conv2D -> BatchNormalization pair folded into one conv.

    W' = W * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps)
    (+ the conv's own bias folded the same way). Other layers are copied.
    """
    producers = {}  # id(BN layer) -> conv layer feeding it
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            source = layer.input._keras_history.operation
            if not isinstance(source, keras.layers.Conv2D):
                raise ValueError(f"fold_batch_norm: {layer.name} is not fed by a Conv2D")
            if len(source._outbound_nodes) != 1:
                raise ValueError(f"fold_batch_norm: {source.name}'s output is used besides "
                                 f"{layer.name}; cannot fold")
            producers[id(layer)] = source
    folded_bn = {id(conv): bn for bn_id, conv in producers.items()
                 for bn in model.layers if id(bn) == bn_id}
    new_weights = {}

    def operation_fn(op):
        if isinstance(op, keras.layers.BatchNormalization):
            return lambda x, **kwargs: x  # absorbed into the conv before it
        config = op.get_config()
        if isinstance(op, keras.layers.Conv2D) and id(op) in folded_bn:
            bn = folded_bn[id(op)]
            gamma, beta, mean, var = [w.astype(np.float64) for w in bn.get_weights()]
            scale = gamma / np.sqrt(var + bn.epsilon)
            kernel = op.kernel.numpy().astype(np.float64) * scale
            bias = beta - mean * scale
            if op.use_bias:
                bias = bias + op.bias.numpy().astype(np.float64) * scale
            config["use_bias"] = True
            new_weights[config["name"]] = [kernel.astype(np.float32), bias.astype(np.float32)]
        else:
            new_weights[config["name"]] = op.get_weights()
        return op.__class__.from_config(config)

    inputs = keras.Input(shape=model.inputs[0].shape[1:], name=model.inputs[0].name,
                         dtype=model.inputs[0].dtype)
    outputs = model._run_through_graph([inputs], operation_fn=operation_fn)
    folded = keras.Model(inputs, outputs, name=name or f"{model.name}_folded")
    for layer in folded.layers:
        arrays = new_weights.get(layer.name)
        if arrays:
            layer.set_weights(arrays)
    return folded
