"""Physical pruning: a gated model + sub-network -> an ordinary, smaller Keras model.

Public API (shared by fine-tuning and export):

- `slim_model(gated, spec=None, name=None) -> keras.Model`: the gated model's traced
  graph rebuilt with new layers of the kept widths (a plain Keras 3 functional model
  of the model's own layer types: no gates, no custom objects), holding the kept
  channels of `spec` (default: the gated model's current state). Weights are
  gathered at the kept channels; kernels with a pruned axis are rescaled to their
  unpruned Frobenius norm exactly as the masked forward does, so with BN in
  inference mode its outputs equal the gated model's under `spec`. Layer names are
  the traced names (a nested model's layers become `<model>.<layer>`).
- `recalibrate_batch_norm(model, images, batch_size=256)`: re-estimates every BN's
  moving mean/variance as the exact pooled statistics over `images` (model-ready
  *training* images; never evaluation data), for a gated clone (its current
  sub-network) or any plain functional Keras model. Needed after slimming (spec
  section 9: the stored statistics no longer fit) and before any evaluation/export
  of non-fine-tuned weights.
- `fold_batch_norm(model) -> keras.Model`: the same function with every conv ->
  BatchNormalization pair replaced by one biased conv (deployment).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import keras

from ekg_tf.distribute import any_batch_spec
from ekg_tf.graph import dependency_graph, rules as rules_lib
from ekg_tf.graph.forward import _Forward
from ekg_tf.graph.rules import IN, OUT, BatchNormStep
from ekg_tf.graph.trace import rebuild, trace

_L2_EPS = 1e-12  # tf.math.l2_normalize's epsilon on the squared norm


# ----------------------------------------------------------------------------- slimming
def kept_indices_for(gated, spec=None) -> dict:
    """{group name: kept channel indices (sorted)} from `spec`, else the model's gates."""
    if spec is None:
        return {g.name: g.kept_indices() for g in gated.gate_groups}
    spec.check_fits(gated)
    return {name: np.asarray(state.kept_indices(), np.int64)
            for name, state in spec.groups.items()}


def layout_indices(layout, kept: dict) -> np.ndarray:
    """Kept positions along a tensor's last axis (pinned segments whole)."""
    parts, offset = [], 0
    for key, size in layout.segments:
        idx = kept[key] if key in kept else np.arange(size)
        parts.append(np.asarray(idx, np.int64) + offset)
        offset += size
    idx = np.concatenate(parts)
    if layout.tile > 1:
        idx = (np.arange(layout.tile)[:, None] * layout.channels + idx[None, :]).reshape(-1)
    return idx


def sliced_weight(value: np.ndarray, axes: tuple, indices: dict, rescale: bool) -> np.ndarray:
    """`value` gathered along each axis with a role (IN/OUT -> indices[role]); a kernel
    with a pruned axis is rescaled by ||value|| / ||slice|| (the masked-kernel rule)."""
    value = np.asarray(value)
    sliced = value
    for axis, role in enumerate(axes):
        if role is not None and indices[role] is not None:
            sliced = np.take(sliced, indices[role], axis=axis)
    if not rescale:
        return sliced.astype(np.float32)
    full = np.sqrt(np.sum(np.square(value, dtype=np.float64)))
    part = np.sum(np.square(sliced, dtype=np.float64))
    return (sliced.astype(np.float64) * (full / np.sqrt(max(part, _L2_EPS)))).astype(np.float32)


def slim_model(gated, spec=None, name: str | None = None) -> keras.Model:
    """The physically pruned plain Keras model of `gated` under `spec` (see module doc).

    `spec` (a `SubnetSpec`) does not change the gated model; without it the model's
    current gate state is used."""
    kept = kept_indices_for(gated, spec)
    dep = gated.dependency
    pending = []  # (layer, arrays): weights set once the model is built

    def call_node(node, args, kwargs):
        rule = dep.rule(node)
        in_layout = dep.layouts[node.inputs[0]] if node.inputs else None
        out_layout = dep.layouts[node.outputs[0]]
        indices = {IN: None if in_layout is None else layout_indices(in_layout, kept),
                   OUT: layout_indices(out_layout, kept)}
        if rule.weighted:
            layer = rule.rebuild(node, len(indices[IN]), len(indices[OUT]), node.name)
            pruned = {IN: any(k in kept for k in in_layout.keys()),
                      OUT: any(k in kept for k in out_layout.keys())}
            arrays = []
            for wname, axes in rule.weight_axes(node).items():
                cut = {r: (indices[r] if pruned[r] else None) for r in (IN, OUT)}
                rescale = wname in rule.kernels and any(cut[r] is not None for r in axes if r)
                arrays.append(sliced_weight(getattr(node.layer, wname).numpy(), axes, cut,
                                            rescale))
            pending.append((layer, arrays))
        else:
            layer = rule.clone(node, [len(layout_indices(dep.layouts[t], kept))
                                      for t in node.outputs], node.name)
            if isinstance(layer, keras.layers.Layer) and layer is not node.layer \
                    and node.layer.weights:
                pending.append((layer, node.layer.get_weights()))
        return layer(*args, **kwargs)

    model = rebuild(dep.graph, call_node, name or f"{gated.arch_name}_slim")
    for layer, arrays in pending:
        layer.set_weights(arrays)
    return model


# ----------------------------------------------------------------------- BN re-estimation
class PlainForward(_Forward):
    """The model as it is (nothing masked): BN statistics of plain models."""

    def _is_pruned(self, layout) -> bool:
        return False


def _forward_of(model):
    if hasattr(model, "masked"):  # a gated clone: its current sub-network
        return model.masked, model.dependency
    dependency = dependency_graph(model)
    return PlainForward(dependency), dependency


def batch_norm_layers(model) -> list:
    """The BatchNormalization layers of a gated clone or plain model, in graph order."""
    _, dependency = _forward_of(model)
    return [node.layer for node in dependency.graph.nodes
            if isinstance(dependency.rule(node), rules_lib.BatchNormRule)]


def recalibrate_batch_norm(model, images, batch_size: int = 256, progress=None) -> dict:
    """Sets every BN's moving statistics to the exact pooled statistics over `images`.

    `images`: model-ready float32 *training* images (never evaluation data: spec
    section 9). One pass with batch statistics; per BN and batch the exact mean and
    biased variance are recorded and pooled into the population moments over all
    images: mean = sum n_b m_b / N, var = sum n_b (v_b + m_b^2) / N - mean^2.
    Returns {"images": N, "batch_norms": count}.
    """
    images = np.asarray(images, np.float32)
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(f"recalibrate_batch_norm needs a non-empty batch of images, "
                         f"got shape {images.shape}")
    forward, dependency = _forward_of(model)
    layers = {node.name: node.layer for node in dependency.graph.nodes
              if isinstance(dependency.rule(node), rules_lib.BatchNormRule)}
    if not layers:
        return {"images": int(len(images)), "batch_norms": 0}

    names = []  # BN node names in the order the forward records them (set when tracing)

    @tf.function(autograph=False, input_signature=[any_batch_spec(images.shape)])
    def moments(x):
        record = []
        forward.run(x, BatchNormStep("batch", sync=False, record=record), training=False)
        names[:] = [name for name, _, _ in record]
        return [(m, v) for _, m, v in record]

    sums, squares, total = {}, {}, 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        values = moments(tf.constant(batch))
        n = len(batch)
        total += n
        for name, (m, v) in zip(names, values):
            m, v = m.numpy().astype(np.float64), v.numpy().astype(np.float64)
            sums[name] = sums.get(name, 0.0) + n * m
            squares[name] = squares.get(name, 0.0) + n * (v + m * m)
        if progress is not None:
            progress.update(1, items=n)
    for name, layer in layers.items():
        mean = sums[name] / total
        var = np.maximum(squares[name] / total - mean * mean, 0.0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(var.astype(np.float32))
    return {"images": int(total), "batch_norms": len(layers)}


def bn_statistics(model) -> list:
    return [(l.moving_mean.numpy().copy(), l.moving_variance.numpy().copy())
            for l in batch_norm_layers(model)]


def restore_bn_statistics(model, stats) -> None:
    for layer, (m, v) in zip(batch_norm_layers(model), stats):
        layer.moving_mean.assign(m)
        layer.moving_variance.assign(v)


# ------------------------------------------------------------------------------ BN folding
_FOLDABLE = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Conv1D)


def fold_batch_norm(model: keras.Model, name: str | None = None) -> keras.Model:
    """A copy of a plain model with each conv -> BatchNormalization pair folded into one conv.

    W' = W * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps)
    (+ the conv's own bias folded the same way); a conv is folded when the BN is its
    only consumer and it has no activation of its own. Other layers are copied.
    """
    graph = trace(model)
    folded = {}  # conv node index -> its BN node
    for node in graph.nodes:
        if not isinstance(node.layer, keras.layers.BatchNormalization):
            continue
        producer = graph.tensors[node.inputs[0]].producer
        if producer is None:
            continue
        conv = graph.nodes[producer]
        if (type(conv.layer) in _FOLDABLE and conv.layer.activation in (None,
                                                                        keras.activations.linear)
                and graph.consumers[conv.outputs[0]] == [node.index]
                and conv.outputs[0] not in graph.outputs):
            folded[conv.index] = node
    bn_nodes = {bn.index for bn in folded.values()}
    pending = []

    def call_node(node, args, kwargs):
        if node.index in bn_nodes:
            return args[0]  # absorbed into the conv before it
        rule = rules_lib.rule_for(node.layer)
        if node.index in folded:
            layer = node.layer
            bn = folded[node.index].layer
            new = type(layer).from_config({**layer.get_config(), "use_bias": True,
                                           "name": node.name})
            weights = dict(zip(rules_lib.BatchNormRule().weight_names(bn), [w.astype(np.float64)
                                                       for w in bn.get_weights()]))
            gamma = weights.get("gamma", np.ones_like(weights["moving_mean"]))
            scale = gamma / np.sqrt(weights["moving_variance"] + bn.epsilon)
            kernel = layer.kernel.numpy().astype(np.float64)
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
            else:
                kernel = kernel * scale
            bias = weights.get("beta", 0.0) - weights["moving_mean"] * scale
            if layer.use_bias:
                bias = bias + layer.bias.numpy().astype(np.float64) * scale
            pending.append((new, [kernel.astype(np.float32), bias.astype(np.float32)]))
            return new(*args, **kwargs)
        layer = rule.clone(node, [graph.tensors[t].shape[-1] for t in node.outputs], node.name)
        if isinstance(layer, keras.layers.Layer) and layer is not node.layer \
                and node.layer.weights:
            pending.append((layer, node.layer.get_weights()))
        return layer(*args, **kwargs)

    out = rebuild(graph, call_node, name or f"{model.name}_folded")
    for layer, arrays in pending:
        layer.set_weights(arrays)
    return out
