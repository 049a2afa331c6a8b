"""A deterministic sub-network without a search: L1-norm ranks, one uniform rate.

Used by tests and the latency benchmark as a stand-in for a search result
(`workdir/search/subnet.json`) when none is available: every group's channels are
ranked by the L1 norm of the filters that produce them (summed over every layer
writing into the group), and one rate shared by the groups is lowered in `step`s
until `ComplexityCounter.macs_ratio <= target`.
"""
from __future__ import annotations

from ekg_tf.errors import UserError
from ekg_tf.flops import ComplexityCounter
from ekg_tf.subnet_search.scoring import l1_filter_scores
from ekg_tf.subnet import SubnetSpec


def residual_streams(model) -> set:
    """Groups written by several layers (tied by Add: a residual stream)."""
    return {g.name for g in model.gate_groups
            if sum(m.role == "out" for m in g.members) > 1}


def l1_uniform_subnet(model, target_ratio: float, step: float = 0.01,
                      keep_streams: bool = True) -> SubnetSpec:
    """Sets a gated clone's gates to L1 ranks and the largest uniform rate with MACs
    ratio <= target.

    `keep_streams`: residual-stream groups stay at rate 1 and only the other groups are
    narrowed (the reference's ResNet-56 search never narrowed the streams, spec
    section 9); otherwise every group shares the rate.
    """
    if not 0.0 < target_ratio <= 1.0:
        raise UserError(f"target MACs ratio must be in (0, 1], got {target_ratio}")
    for name, score in l1_filter_scores(model).items():
        model.gate_group(name).set_rank_from_score(score)
    counter = ComplexityCounter(model.dependency)
    streams = residual_streams(model) if keep_streams else set()
    names = [g.name for g in model.gate_groups if g.name not in streams]
    rate = 1.0
    while counter.macs_ratio({n: rate for n in names}) > target_ratio:
        rate = round(rate - step, 10)
        if rate <= 0:
            raise UserError(f"no uniform rate reaches MACs ratio {target_ratio}")
    for g in model.gate_groups:
        g.rate = rate if g.name in names else 1.0
    return SubnetSpec.from_model(model)
