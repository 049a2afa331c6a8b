"""Analytic complexity (params, multiply-adds) of any sub-network of a traced model.

`ComplexityCounter(dependency_graph)` reads, once, every layer's channel layouts and
weight shapes from the channel-dependency graph; `count(rates)` is then a pure,
vectorised function of the group rates (no forward pass), cheap enough to call
thousands of times during a search. A layout's width is linear in the groups' kept
channel counts, every term below a product of at most two widths.

Reported numbers:
- `macs`: multiply-adds of convolutions (regular, depthwise, separable) and dense
  layers, per example (the headline);
- `params`: every weight except BN moving statistics (conv kernels and biases, BN
  gamma/beta, dense kernels and biases, ...); `params_with_bn_stats` adds BN
  moving mean/variance (what `keras.Model.count_params()` reports);
- `bn_flops`: BN's per-element work (2 per element), which the reference adds to its
  FLOPs figure.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import keras
import numpy as np

from ekg_tf.errors import UserError
from ekg_tf.graph import rules as rules_lib
from ekg_tf.graph.gates import kept_count
from ekg_tf.graph.rules import IN, OUT

_BN_STATISTICS = ("moving_mean", "moving_variance")


@dataclasses.dataclass(frozen=True)
class Complexity:
    params: int
    macs: int
    params_with_bn_stats: int
    bn_flops: int


class _Terms:
    """sum coef * width[i] * width[j] (index -1: the constant 1)."""

    def __init__(self):
        self.coef, self.i, self.j = [], [], []

    def add(self, coef, widths):
        widths = list(widths) + [-1, -1]
        self.coef.append(int(coef))
        self.i.append(widths[0])
        self.j.append(widths[1])

    def freeze(self):
        self.coef = np.asarray(self.coef, np.int64)
        self.i = np.asarray(self.i, np.int64)
        self.j = np.asarray(self.j, np.int64)

    def total(self, widths) -> int:
        w = np.append(widths, 1)
        return int(np.sum(self.coef * w[self.i] * w[self.j]))


class ComplexityCounter:
    """Vectorised `count` for one dependency graph (see the module docstring)."""

    def __init__(self, dependency):
        dependency = getattr(dependency, "dependency", dependency)  # a gated clone
        self.dependency = dependency
        self.group_names = [g.name for g in dependency.groups]
        self._channels = np.array([g.channels for g in dependency.groups], np.int64)
        index = {name: i for i, name in enumerate(self.group_names)}
        layouts, rows = {}, []

        def width_index(layout) -> int:
            """Row of `layout` in the width matrix (width = tile * (const + sum kept))."""
            if layout not in layouts:
                row = np.zeros(len(self.group_names) + 1, np.int64)
                for key, size in layout.segments:
                    if key in index:
                        row[index[key] + 1] += layout.tile
                    else:
                        row[0] += layout.tile * size
                layouts[layout] = len(rows)
                rows.append(row)
            return layouts[layout]

        self.macs_terms, self.param_terms, self.stat_terms, self.bn_terms = (
            _Terms(), _Terms(), _Terms(), _Terms())
        graph = dependency.graph
        counted = set()
        for node in graph.nodes:
            rule = dependency.rule(node)
            if not rule.weighted:
                continue
            roles = {IN: width_index(dependency.in_layout(node)),
                     OUT: width_index(dependency.out_layout(node))}
            for coef, factors in rule.macs_terms(node, _Shapes(graph)):
                if coef < 0:
                    raise UserError(f"{node.name}: the model needs a fixed input size to "
                                     "count its multiply-adds (build it with keras.Input(shape="
                                     "(H, W, C)))")
                self.macs_terms.add(coef, [roles[f] for f in factors])
            if isinstance(rule, rules_lib.BatchNormRule):
                positions = rules_lib.positions(graph.tensors[node.inputs[0]].shape)
                self.bn_terms.add(2 * max(positions, 0), [roles[IN]])
            if id(node.layer) in counted:  # a shared layer's weights count once
                continue
            counted.add(id(node.layer))
            for name, axes in rule.weight_axes(node).items():
                var = getattr(node.layer, name)
                fixed = int(np.prod([d for d, r in zip(var.shape, axes) if r is None],
                                    dtype=np.int64))
                terms = self.stat_terms if name in _BN_STATISTICS else self.param_terms
                terms.add(fixed, [roles[r] for r in axes if r is not None])
        self._fixed_params, self._fixed_stats = self._unfollowed_weights(dependency, counted)
        self._rows = np.stack(rows) if rows else np.zeros((0, len(self.group_names) + 1),
                                                          np.int64)
        for terms in (self.macs_terms, self.param_terms, self.stat_terms, self.bn_terms):
            terms.freeze()
        self.full = self.count({})

    @staticmethod
    def _unfollowed_weights(dependency, counted) -> tuple:
        """Weights of layers without a weighted rule (kept whole whatever the rates)."""
        params = stats = 0
        seen = set()
        for node in dependency.graph.nodes:
            layer = node.layer
            if id(layer) in counted or id(layer) in seen or not hasattr(layer, "weights"):
                continue
            seen.add(id(layer))
            for v in layer.weights:
                size = int(np.prod(v.shape, dtype=np.int64))
                if v.path.rsplit("/", 1)[-1] in _BN_STATISTICS:
                    stats += size
                else:
                    params += size
        return params, stats

    def kept_vector(self, rates: Mapping[str, float]) -> np.ndarray:
        """Kept channels per group, in `group_names` order."""
        unknown = set(rates) - set(self.group_names)
        if unknown:
            raise KeyError(f"unknown gate groups {sorted(unknown)}")
        kept = self._channels.copy()
        for i, name in enumerate(self.group_names):
            if name in rates:
                kept[i] = kept_count(int(self._channels[i]), rates[name])
        return kept

    def widths(self, rates: Mapping[str, float]) -> np.ndarray:
        return self._rows @ np.concatenate([[1], self.kept_vector(rates)])

    def count(self, rates: Mapping[str, float]) -> Complexity:
        """Complexity with each named group at its rate (unnamed groups: rate 1)."""
        w = self.widths(rates)
        params = self.param_terms.total(w) + self._fixed_params
        stats = self.stat_terms.total(w) + self._fixed_stats
        return Complexity(params=params, macs=self.macs_terms.total(w),
                          params_with_bn_stats=params + stats,
                          bn_flops=self.bn_terms.total(w))

    def macs_ratio(self, rates: Mapping[str, float]) -> float:
        return self.count(rates).macs / self.full.macs


class _Shapes:
    """What `Rule.macs_terms` may ask of the graph."""

    def __init__(self, graph):
        self.graph = graph

    def shape(self, tid):
        return self.graph.tensors[tid].shape


def count_complexity(model, rates: Mapping[str, float] | None = None) -> Complexity:
    """Params and MACs of a gated clone at `rates` (default: its current rates), or of a
    plain Keras model as it is."""
    from ekg_tf.graph import dependency_graph
    if hasattr(model, "gate_groups"):
        if rates is None:
            rates = {g.name: g.rate for g in model.gate_groups}
        return ComplexityCounter(model.dependency).count(rates)
    return ComplexityCounter(dependency_graph(model)).count(rates or {})


def _all_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


def layer_macs(model) -> int:
    """Multiply-adds per example counted from a built Keras model's own layers (conv,
    depthwise, separable, dense), independently of the channel graph: a check of
    `ComplexityCounter` on slimmed models."""
    total = 0
    for layer in _all_layers(model):
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv1D, keras.layers.Dense,
                                  keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)):
            continue
        out = layer.output.shape
        positions = int(np.prod(out[1:-1])) if len(out) > 2 else 1
        if isinstance(layer, keras.layers.SeparableConv2D):
            dk, pk = layer.depthwise_kernel.shape, layer.pointwise_kernel.shape
            total += positions * (int(np.prod(dk)) + int(np.prod(pk)))
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            total += positions * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            in_positions = int(np.prod(layer.input.shape[1:-1])) if len(layer.input.shape) > 2 \
                else 1
            total += in_positions * int(np.prod(layer.kernel.shape))
        else:
            total += positions * int(np.prod(layer.kernel.shape))
    return total

