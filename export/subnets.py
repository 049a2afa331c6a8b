"""A deterministic sub-network without a search: L1-norm ranks, one uniform rate.

Used by the export tests and the latency benchmark as a stand-in for a search
result (`workdir/search/subnet.json`) when none is available: every gate
group's channels are ranked by the L1 norm of the filters that produce them
(summed over every conv writing into the group), and one rate shared by all
groups is lowered in `step`s until `ComplexityCounter.macs_ratio <= target`.
"""
from __future__ import annotations

import numpy as np

from ekg_tf.flops import ComplexityCounter, complexity_graph
from ekg_tf.subnet import SubnetSpec


def l1_filter_scores(model) -> dict:
    """{group name: summed L1 norm of each output filter of the convs writing into it}."""
    scores = {g.name: np.zeros(g.channels, np.float64) for g in model.gate_groups}
    for conv in model.conv_layers():
        if conv.out_group is not None:
            kernel = np.abs(conv.kernel.numpy().astype(np.float64))
            scores[conv.out_group.name] += kernel.sum(axis=(0, 1, 2))
    return scores


def l1_uniform_subnet(model, target_ratio: float, step: float = 0.01,
                      keep_streams: bool = True) -> SubnetSpec:
    """Sets `model`'s gates to L1 ranks and the largest uniform rate with MACs ratio <= target.

    `keep_streams`: residual stream groups stay at rate 1 and only block-internal
    groups are narrowed (the reference's ResNet-56 search never narrowed the
    streams, spec section 9); otherwise every group shares the rate.
    """
    if not 0.0 < target_ratio <= 1.0:
        raise ValueError(f"target MACs ratio must be in (0, 1], got {target_ratio}")
    for name, score in l1_filter_scores(model).items():
        model.gate_group(name).set_rank_from_score(score)
    counter = ComplexityCounter(complexity_graph(model))
    streams = {g.name for g in model.stream_groups} | {model.stem_group.name}
    names = [g.name for g in model.gate_groups if not (keep_streams and g.name in streams)]
    rate = 1.0
    while counter.macs_ratio({n: rate for n in names}) > target_ratio:
        rate = round(rate - step, 10)
        if rate <= 0:
            raise ValueError(f"no uniform rate reaches MACs ratio {target_ratio}")
    for g in model.gate_groups:
        g.rate = rate if g.name in names else 1.0
    return SubnetSpec.from_model(model)
