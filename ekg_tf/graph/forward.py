"""Forward passes of a sub-network over the traced graph: masked and at real width.

Both replay the traced graph of the model (`trace.execute`) with the model's own
layers and weights; they differ only in what they do to the weights of layers whose
channels belong to a prunable group, and at the gates:

- `MaskedForward` (the gated clone's `call`): full-width tensors; such weights are
  multiplied by the groups' masks (kernels rescaled to their unmasked Frobenius
  norm, as the reference) and each gated tensor is multiplied by its mask.
- `SlicedForward`: the sub-network at its real width: such weights are gathered at
  the kept channels (kernels rescaled alike); gates do nothing (the pruned channels
  are not there). Kept indices are tensors, so one compiled function serves every
  width. Under BN with batch statistics both give the same logits, and the sliced
  pass costs in proportion to the sub-network's MACs.

Batch normalisation runs as `rules.BatchNormStep` says (moving statistics, batch
statistics with the moving ones frozen, or training updates), synchronised over
replicas. `record` collects the value at every gate (the search's Taylor scores
are gradients there); `capture_at` returns the tensors live before given nodes
(the search's prefix cache) and `start`/`feed` resume from them.
"""
from __future__ import annotations

import tensorflow as tf

from ekg_tf.graph import keras_compat as compat
from ekg_tf.graph import rules as rules_lib
from ekg_tf.graph.gates import gate
from ekg_tf.graph.rules import IN, OUT, BatchNormStep
from ekg_tf.graph.trace import execute


class _Forward:
    def __init__(self, dependency):
        self.dep = dependency
        self.graph = dependency.graph
        self.prunable = {g.name for g in dependency.groups}
        # Weighted nodes whose weights follow a prunable group, and along which axes.
        self._pruned_axes = {}
        for node in self.graph.nodes:
            rule = dependency.rule(node)
            if not rule.weighted:
                continue
            layouts = {IN: dependency.in_layout(node), OUT: dependency.out_layout(node)}
            axes = rule.weight_axes(node)
            touched = any(self._is_pruned(layouts[r]) for roles in axes.values()
                          for r in roles if r)
            if touched:
                self._pruned_axes[node.index] = (axes, layouts)

    def _is_pruned(self, layout) -> bool:
        return any(key in self.prunable for key in layout.keys())

    def _weights(self, node, cache):
        """The weights of a weighted node: each axis that follows a pruned group is cut
        (`_cut`); a kernel with a cut axis is rescaled to its unpruned Frobenius norm
        (`_rescale`, the reference's rule)."""
        variables = rules_lib.weight_variables(node)
        if node.index not in self._pruned_axes:
            return dict(variables)
        kernels = self.dep.rule(node).kernels
        axes, layouts = self._pruned_axes[node.index]
        out = {}
        for name, var in variables.items():
            w, cut = var, False
            for axis, role in enumerate(axes[name]):
                if role is not None and self._is_pruned(layouts[role]):
                    w = self._cut(w, axis, layouts[role], cache)
                    cut = True
            out[name] = self._rescale(w, var) if cut and name in kernels else w
        return out

    def _cut(self, w, axis, layout, cache):
        raise NotImplementedError

    def _rescale(self, w, var):
        raise NotImplementedError

    def _at_gate(self, tid, value, cache):
        return value

    def run(self, inputs, bn: BatchNormStep, training: bool = False, record=None,
            start: int = 0, feed=None, capture_at=(), cache=None):
        """(outputs, captures): see `trace.execute`. `inputs` (start = 0) is the model's
        input (or a list of them); `feed` holds the live tensors when start > 0.
        `training` is what layers other than BN see (dropout, noise)."""
        cache = {} if cache is None else cache
        if start == 0:
            flat = inputs if isinstance(inputs, (list, tuple)) else [inputs]
            feed = dict(zip(self.graph.inputs, flat))

        def call_node(node, values):
            rule = self.dep.rule(node)
            args, kwargs = node.arguments(values)
            if rule.weighted and (node.index in self._pruned_axes
                                  or isinstance(rule, rules_lib.BatchNormRule)):
                return self._apply(node, rule, args[0], training, bn, cache)
            if compat.accepts_training(node.layer):
                kwargs["training"] = training
            return self._call_plain(node, rule, args, kwargs)

        def on_tensor(tid, value):
            if tid in self.dep.gates:
                value = self._at_gate(tid, value, cache)
                if record is not None:
                    record.append((tid, value))
            return value

        return execute(self.graph, feed, call_node, start=start, on_tensor=on_tensor,
                       capture_at=capture_at)

    def _apply(self, node, rule, x, training, bn, cache):
        """A weighted node on its (cut) weights. In reduced precision (x not float32) the
        weights are cast to x's dtype, except a normalisation's: it keeps its statistics in
        float32 (what Keras' mixed precision does) and returns x's dtype."""
        weights = self._weights(node, cache)
        if x.dtype != tf.float32 and not rule.float32_statistics:
            weights = {name: tf.cast(w, x.dtype) for name, w in weights.items()}
        return rule.apply(node, x, weights, training, bn,
                          channel_mask=self._channel_mask(node, cache))

    def _call_plain(self, node, rule, args, kwargs):
        return node.layer(*args, **kwargs)

    def _channel_mask(self, node, cache):
        return None


class MaskedForward(_Forward):
    """Full-width forward with the groups' masks (`groups`: {name: GateGroup})."""

    def __init__(self, dependency, groups: dict):
        super().__init__(dependency)
        self.groups = groups

    def mask(self, layout, cache):
        """The mask along a layout: its groups' masks, ones for pinned segments (cached
        per forward call)."""
        key = ("mask", layout)
        if key not in cache:
            parts = [self.groups[name].mask_variable if name in self.prunable
                     else tf.ones([size], tf.float32) for name, size in layout.segments]
            m = parts[0] if len(parts) == 1 else tf.concat(parts, 0)
            if layout.tile > 1:
                m = tf.tile(m, [layout.tile])
            cache[key] = m
        return cache[key]

    def _cut(self, w, axis, layout, cache):
        shape = [1] * len(w.shape)
        shape[axis] = -1
        return w * tf.reshape(tf.cast(self.mask(layout, cache), w.dtype), shape)

    def _rescale(self, w, var):
        return tf.math.l2_normalize(w) * tf.norm(var)

    def _channel_mask(self, node, cache):
        if isinstance(self.dep.rule(node), rules_lib.LayerNormRule) and node.index in \
                self._pruned_axes:
            return self.mask(self.dep.in_layout(node), cache)
        return None

    def _at_gate(self, tid, value, cache):
        return gate(value, tf.cast(self.mask(self.dep.gates[tid], cache), value.dtype))


class SlicedForward(_Forward):
    """The sub-network at its real width; `kept`: {group name: int32 kept indices}."""

    def __init__(self, dependency):
        super().__init__(dependency)
        self.kept = None

    def indices(self, layout, cache):
        key = ("idx", layout)
        if key not in cache:
            offset = 0
            parts = []
            for name, size in layout.segments:
                idx = self.kept[name] if name in self.prunable else tf.range(size)
                parts.append(idx + offset if offset else idx)
                offset += size
            idx = parts[0] if len(parts) == 1 else tf.concat(parts, 0)
            if layout.tile > 1:
                idx = tf.reshape(tf.range(layout.tile)[:, None] * layout.channels
                                 + idx[None, :], [-1])
            cache[key] = idx
        return cache[key]

    def _cut(self, w, axis, layout, cache):
        return tf.gather(w, self.indices(layout, cache), axis=axis)

    def _rescale(self, w, var):
        return w * (tf.norm(var) / tf.maximum(tf.norm(w), 1e-6))

    def _call_plain(self, node, rule, args, kwargs):
        return rule.sliced_call(node, args, kwargs)

    def run(self, inputs, kept: dict, bn: BatchNormStep, training: bool = False, **kwargs):
        """As `_Forward.run`, with `kept` {group name: int32 kept channel indices}."""
        if bn.mode == "train":
            raise ValueError("the sliced forward evaluates; it cannot update BN statistics")
        self.kept = kept
        try:
            return super().run(inputs, bn, training, **kwargs)
        finally:
            self.kept = None
