"""A traced model cut into blocks whose latency the table holds, and a block at given widths.

The graph is cut before every node where exactly one tensor is live (a residual
block's input: its shortcut and its first conv read the same tensor); a piece without
a convolution or dense layer (a BN, a ReLU, an Add + ReLU, a pooling) is merged into
the piece before it, so that the layers a runtime fuses (conv + bias + ReLU, add +
ReLU) are timed together. For a ResNet the blocks are the stem (conv, BN, ReLU), each
residual block (with its projection shortcut and the add + ReLU), and the classifier;
for MobileNetV2 each inverted-residual block.

A block's latency depends on the kept widths of the channel groups its tensors hold
(`Segment.groups`, in order of first appearance). Blocks with the same `signature`
(layer types and configurations, spatial shapes, and where each group sits) have the
same latency at the same group widths: the table stores one entry per signature and
widths (the 8 identical blocks of a ResNet-56 stage share theirs).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import keras

from ekg_tf.graph import rules as rules_lib
from ekg_tf.slimming import fold_batch_norm


@dataclasses.dataclass(frozen=True)
class Segment:
    name: str            # its first node
    start: int           # node indices [start, stop) of the traced graph
    stop: int
    inputs: tuple        # tensor ids live at `start`
    outputs: tuple       # tensor ids live at `stop` (the model outputs for the last one)
    groups: tuple        # prunable groups its tensors hold, in order of first appearance
    signature: str       # equal signatures: equal latency at equal group widths


def _computes(rule) -> bool:
    """A node that carries a block's cost (convolutions and dense layers)."""
    return isinstance(rule, (rules_lib.ConvRule, rules_lib.DenseRule))


def _tensors_of(graph, start: int, stop: int, inputs: tuple) -> list:
    seen = list(inputs)
    for node in graph.nodes[start:stop]:
        for tid in node.inputs + node.outputs:
            if tid not in seen:
                seen.append(tid)
    return seen


def _config(layer) -> dict:
    if not isinstance(layer, keras.layers.Layer):
        return {"op": type(layer).__name__}
    config = dict(layer.get_config())
    config.pop("name", None)
    return config


def segment_graph(dependency) -> list[Segment]:
    """The blocks of a dependency graph's traced model (see the module docstring)."""
    graph = dependency.graph
    n = len(graph.nodes)
    cuts = [0] + [i for i in range(1, n) if len(graph.live_tensors(i)) == 1] + [n]
    pieces = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    merged = []
    for a, b in pieces:
        heavy = any(_computes(dependency.rule(node)) for node in graph.nodes[a:b])
        if merged and (not heavy or not merged[-1][2]):
            merged[-1] = (merged[-1][0], b, merged[-1][2] or heavy)
        else:
            merged.append((a, b, heavy))
    prunable = {g.name for g in dependency.groups}
    segments = []
    for a, b, _ in merged:
        inputs = graph.live_tensors(a) if a > 0 else tuple(graph.inputs)
        outputs = graph.live_tensors(b) if b < n else tuple(graph.outputs)
        tensors = _tensors_of(graph, a, b, inputs)
        groups = []
        for tid in tensors:
            for key in dependency.layouts[tid].keys():
                if key in prunable and key not in groups:
                    groups.append(key)
        local = {g: i for i, g in enumerate(groups)}
        number = {tid: i for i, tid in enumerate(tensors)}

        def layout_of(tid):
            layout = dependency.layouts[tid]
            return [layout.tile, [[local.get(k, None), s] for k, s in layout.segments]]

        description = {
            "inputs": [[list(graph.tensors[t].shape[1:-1]), layout_of(t)] for t in inputs],
            "outputs": [number[t] for t in outputs],
            "nodes": [[node.kind, _config(node.layer), [number[t] for t in node.inputs],
                       [[list(graph.tensors[t].shape[1:-1]), layout_of(t)]
                        for t in node.outputs]] for node in graph.nodes[a:b]]}
        text = json.dumps(description, sort_keys=True, default=str)
        signature = hashlib.sha1(text.encode()).hexdigest()[:16]
        segments.append(Segment(graph.nodes[a].name, a, b, tuple(inputs), tuple(outputs),
                                tuple(groups), signature))
    return segments


def layout_width(layout, kept: dict) -> int:
    """Width of a tensor's last axis with the groups at `kept` channels (others whole)."""
    return layout.tile * sum(kept.get(key, size) for key, size in layout.segments)


def segment_model(dependency, segment: Segment, kept: dict, fold: bool = True):
    """A plain Keras model of `segment` with its groups at `kept` widths ({group: count}),
    fresh (untrained) weights, BN folded into the convolutions as the export deploys it."""
    graph = dependency.graph
    inputs = [keras.Input(shape=(*graph.tensors[t].shape[1:-1],
                                 layout_width(dependency.layouts[t], kept)))
              for t in segment.inputs]
    values = dict(zip(segment.inputs, inputs))
    for node in graph.nodes[segment.start:segment.stop]:
        rule = dependency.rule(node)
        args, kwargs = node.arguments(values)
        in_width = (layout_width(dependency.layouts[node.inputs[0]], kept)
                    if node.inputs else None)
        out_widths = [layout_width(dependency.layouts[t], kept) for t in node.outputs]
        if rule.weighted:
            layer = rule.rebuild(node, in_width, out_widths[0], node.name)
        else:
            layer = rule.clone(node, out_widths, node.name)
        out = layer(*args, **kwargs)
        for tid, value in zip(node.outputs, keras.tree.flatten(out)):
            values[tid] = value
    outputs = [values[t] for t in segment.outputs]
    model = keras.Model(inputs[0] if len(inputs) == 1 else inputs,
                        outputs[0] if len(outputs) == 1 else outputs,
                        name=f"segment_{segment.signature}")
    return fold_batch_norm(model) if fold else model
