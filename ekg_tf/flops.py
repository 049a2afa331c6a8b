"""Analytic complexity (params, multiply-adds) of any sub-network of a gated model.

`complexity_graph(model)` reads the layer shapes once; `count(graph, rates)` is
a pure, vectorised function of the gate rates (no forward pass), cheap enough
to call thousands of times during a search.

Reported numbers:
- `macs`: multiply-adds of convolutions and the classifier (the headline).
- `params`: trainable parameters (conv kernels, BN gamma/beta, classifier
  kernel and bias); `params_with_bn_stats` adds BN moving mean/variance (what
  `keras.Model.count_params()` reports).
- `bn_flops`: BN's per-element work (2 per element), which the reference adds to
  its FLOPs figure.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from ekg_tf.models.gates import kept_count


@dataclasses.dataclass(frozen=True)
class ConvNode:
    name: str
    kernel_area: int          # kh * kw
    in_channels: int
    out_channels: int
    in_group: str | None      # None: not gated (e.g. the RGB input)
    out_group: str | None
    out_pixels: int           # output height * width


@dataclasses.dataclass(frozen=True)
class DenseNode:
    name: str
    in_features: int
    out_features: int
    in_group: str | None


@dataclasses.dataclass(frozen=True)
class BatchNormNode:
    name: str
    channels: int
    group: str | None
    pixels: int


@dataclasses.dataclass(frozen=True)
class ComplexityGraph:
    """What the counter needs to know of a network: shapes and which group gates what."""
    convs: tuple
    denses: tuple
    batch_norms: tuple
    group_channels: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class Complexity:
    params: int
    macs: int
    params_with_bn_stats: int
    bn_flops: int

    def ratio_to(self, full: "Complexity") -> dict:
        return {"params_ratio": self.params / full.params, "macs_ratio": self.macs / full.macs}


def complexity_graph(model) -> ComplexityGraph:
    """Reads a built `GatedResNet` into a `ComplexityGraph`."""
    def group_name(group):
        return None if group is None else group.name

    convs = []
    for conv in model.conv_layers():
        if conv.output_hw is None:
            raise ValueError(f"{conv.name}: model was built without a static input size")
        kh, kw, cin, cout = conv.kernel.shape
        convs.append(ConvNode(conv.path, int(kh * kw), int(cin), int(cout),
                              group_name(conv.in_group), group_name(conv.out_group),
                              int(conv.output_hw[0] * conv.output_hw[1])))
    bns = []
    for bn, conv in model.batch_norms():
        bns.append(BatchNormNode(bn.path, int(bn.gamma.shape[0]), group_name(conv.out_group),
                                 int(conv.output_hw[0] * conv.output_hw[1])))
    fc = model.fc
    denses = [DenseNode(fc.path, int(fc.kernel.shape[0]), int(fc.kernel.shape[1]),
                        group_name(fc.in_group))]
    groups = {g.name: g.channels for g in model.gate_groups}
    return ComplexityGraph(tuple(convs), tuple(denses), tuple(bns), groups)


class ComplexityCounter:
    """Vectorised `count` for one graph: index arrays are built once."""

    def __init__(self, graph: ComplexityGraph):
        self.graph = graph
        self.group_names = list(graph.group_channels)
        index = {name: i + 1 for i, name in enumerate(self.group_names)}  # 0 = ungated
        self._channels = np.array([0] + [graph.group_channels[n] for n in self.group_names],
                                  dtype=np.int64)

        def idx(name):
            return 0 if name is None else index[name]

        c = graph.convs
        self._conv = dict(
            area=np.array([n.kernel_area for n in c], np.int64),
            cin=np.array([n.in_channels for n in c], np.int64),
            cout=np.array([n.out_channels for n in c], np.int64),
            gin=np.array([idx(n.in_group) for n in c], np.int64),
            gout=np.array([idx(n.out_group) for n in c], np.int64),
            pix=np.array([n.out_pixels for n in c], np.int64))
        d = graph.denses
        self._dense = dict(
            fin=np.array([n.in_features for n in d], np.int64),
            fout=np.array([n.out_features for n in d], np.int64),
            gin=np.array([idx(n.in_group) for n in d], np.int64))
        b = graph.batch_norms
        self._bn = dict(ch=np.array([n.channels for n in b], np.int64),
                        g=np.array([idx(n.group) for n in b], np.int64),
                        pix=np.array([n.pixels for n in b], np.int64))
        self.full = self.count({})

    def kept_vector(self, rates: Mapping[str, float]) -> np.ndarray:
        """Kept channels per group index (slot 0 unused)."""
        unknown = set(rates) - set(self.group_names)
        if unknown:
            raise KeyError(f"unknown gate groups {sorted(unknown)}")
        kept = self._channels.copy()
        for i, name in enumerate(self.group_names):
            if name in rates:
                kept[i + 1] = kept_count(int(self._channels[i + 1]), rates[name])
        return kept

    def count(self, rates: Mapping[str, float]) -> Complexity:
        """Complexity with each named group at its rate (unnamed groups: rate 1)."""
        kept = self.kept_vector(rates)

        def width(full, group_index):
            return np.where(group_index > 0, kept[group_index], full)

        c = self._conv
        conv_params = c["area"] * width(c["cin"], c["gin"]) * width(c["cout"], c["gout"])
        d = self._dense
        dense_weights = width(d["fin"], d["gin"]) * d["fout"]
        b = self._bn
        bn_channels = width(b["ch"], b["g"])
        macs = int(np.sum(conv_params * c["pix"]) + np.sum(dense_weights))
        params = int(np.sum(conv_params) + np.sum(dense_weights) + np.sum(d["fout"])
                     + 2 * np.sum(bn_channels))
        return Complexity(params=params, macs=macs,
                          params_with_bn_stats=params + 2 * int(np.sum(bn_channels)),
                          bn_flops=int(2 * np.sum(bn_channels * b["pix"])))

    def macs_ratio(self, rates: Mapping[str, float]) -> float:
        return self.count(rates).macs / self.full.macs


def count_complexity(model, rates: Mapping[str, float] | None = None) -> Complexity:
    """Params and MACs of `model` with the given group rates (default: its current rates)."""
    if rates is None:
        rates = {g.name: g.rate for g in model.gate_groups}
    return ComplexityCounter(complexity_graph(model)).count(rates)
