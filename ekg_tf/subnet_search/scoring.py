"""Pure functions of the search: step sizes, candidate marking, the FLOPs-landing fine step,
and the L1-norm filter importance (an ablation of the Taylor scores).

Aligned widths (`round_to` r > 1, see `gates.kept_count`): a group's coarse step is a
whole number of r-channel units (the reference's step rounded, at least one unit), its
fine (landing) step one unit, and the removal sum covers exactly the channels the step
removes; r = 1 is the reference's arithmetic, unchanged."""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ekg_tf.graph.gates import kept_count
from ekg_tf.subnet_search.otsu import trimmed_otsu

NOT_A_CANDIDATE = float("inf")


def step_size(channels: int, uses: int, search_step: float, round_to: int = 1) -> float:
    """Per-group coarse step `max(1/C, search_step/uses)` (a shared gate moves more FLOPs);
    with `round_to` r > 1 the same rounded to whole r-channel units (at least one)."""
    if channels < 1 or uses < 1:
        raise ValueError(f"step_size needs channels >= 1 and uses >= 1, got {channels}, {uses}")
    if round_to == 1:
        return max(1.0 / channels, search_step / uses)
    units = max(1, round(search_step / uses * channels / round_to))
    return units * round_to / channels


def fine_step(channels: int, round_to: int = 1) -> float:
    """The landing step: one channel (the reference), or one r-channel unit."""
    return round_to / channels


def removal_sum(score, rate: float, step: float, round_to: int = 1) -> float:
    """Sum of the scores of the channels the next step would remove.

    Scores sorted ascending: the first `round((1-rate)*C)` are the already removed
    channels (their score is 0), the next `step` fraction are the lowest-scoring
    survivors. A group at rate <= 0 (one channel left) cannot shrink: +inf. Aligned
    (`round_to` > 1): the window is exactly the channels between the kept widths at
    `rate` and `rate - step`; +inf when that removes nothing (the group is at r).
    """
    if rate <= 0:
        return NOT_A_CANDIDATE
    s = np.sort(np.asarray(score, dtype=np.float64).ravel())
    if round_to == 1:
        r = 1.0 - rate
        return float(np.sum(s[round(r * s.size):round((r + step) * s.size)]))
    start = s.size - kept_count(s.size, rate, round_to)
    stop = s.size - kept_count(s.size, clamp_rate(next_rate(rate, step)), round_to)
    if stop <= start:
        return NOT_A_CANDIDATE
    return float(np.sum(s[start:stop]))


def mark_candidates(sums, cut: float = 0.2) -> np.ndarray:
    """Boolean mask of groups whose removal sum is at or below the trimmed-Otsu threshold."""
    sums = np.asarray(sums, dtype=np.float64)
    finite = sums[np.isfinite(sums)]
    if finite.size == 0:
        return np.zeros(sums.shape, bool)
    threshold = trimmed_otsu(finite, cut)
    return np.isfinite(sums) & (sums <= threshold)


def next_rate(rate: float, step: float) -> float:
    """The coarse next rate (5 decimals as the reference; may be <= 0 = one channel)."""
    return round(rate - step, 5)


def landing_rate(ratio_at: Callable[[float], float], low_rate: float, fine_step: float,
                 span: float, target: float) -> float:
    """The largest rate on the grid `low_rate + k*fine_step` (below `low_rate + span`) whose
    FLOPs ratio is <= target; `low_rate` itself must be at or below the target.

    This is the reference's fine search: after a coarse step overshoots the target,
    walk back up in 1/C steps (aligned: one r-channel unit, so it lands on an aligned
    width) and stop at the last rate still at or below it.
    """
    if ratio_at(low_rate) > target:
        raise ValueError("landing_rate: the low rate must already be at or below the target")
    best = low_rate
    k = 1
    while True:
        rate = round(low_rate + k * fine_step, 5)
        if rate >= low_rate + span - 1e-9 or rate > 1.0:
            return best
        if ratio_at(rate) > target:
            return best
        best = rate
        k += 1


def clamp_rate(rate: float) -> float:
    """Rates below 0 keep one channel, like rate 0: store them as 0."""
    return min(max(float(rate), 0.0), 1.0)


def candidate_rate(ratio_of: Callable[[Mapping[str, float]], float], rates: Mapping[str, float],
                   name: str, step: float, fine_step: float, search_step: float,
                   target: float) -> float:
    """Rate of group `name` for its candidate: one coarse step, or the fine landing rate."""
    low = next_rate(rates[name], step)

    def ratio_at(r):
        trial = dict(rates)
        trial[name] = clamp_rate(r)
        return ratio_of(trial)

    if ratio_at(low) < target:
        # The walk ends at the first rate above the target, at the latest at the current
        # rate, so any span >= step gives the reference's result (its span is
        # search_step); aligned steps can exceed search_step.
        low = landing_rate(ratio_at, low, fine_step, max(search_step, step), target)
    return clamp_rate(low)


def l1_filter_scores(model) -> dict:
    """L1-norm importance per gate group: the sum of |weights| of every filter producing its
    channels (conv/dense/separable layers whose outputs the group holds), from the
    unmasked kernels of a gated clone."""
    dep = model.dependency
    scores = {g.name: np.zeros(g.channels, np.float64) for g in model.gate_groups}
    for node in dep.graph.nodes:
        rule = dep.rule(node)
        if not rule.produces:
            continue
        kernel = getattr(node.layer, rule.kernels[-1]).numpy().astype(np.float64)
        norms = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
        offset = 0
        for name, size in dep.out_layout(node).segments:
            if name is not None:
                scores[name] += norms[offset:offset + size]
            offset += size
    return scores
