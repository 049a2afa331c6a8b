"""Gate groups: the pruning state (rate, rank, score, mask) of one channel group.

A `GateGroup` wraps a structural `ChannelGroup` of the dependency graph with the
EKG state of the reference: `score[C]` (accumulated importance), `rank[C]`
(0 = most important channel) and `rate` (kept fraction); its mask keeps the
channels with `rank < max(C * rate, 1)` (at least one channel survives). The mask
lives in a non-trainable variable so that changing rates never retraces a
compiled forward pass.

Aligned widths (`round_to` r > 1): the kept count is `C * rate` rounded up to a
multiple of r (at least r; all C channels once it reaches C), so that every width
the search, the complexity counter, the memory bank and slimming see is one the
deployment runtimes' kernels process in whole channel blocks (XNNPACK and MLAS
tile output channels by 4, 8 or 16). r = 1 is the reference's count, unchanged.

`gate(x, mask)` multiplies a gated tensor by its mask; its gradient passes
through unmasked (as the reference's gate), so the Taylor score
`|sum_{b,h,w} dL/dy * y|` of an upstream gate also sees pruned channels' paths.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from ekg_tf.errors import UserError


# An aligned rate written as w / C (and rounded to 5 decimals, as the search writes rates)
# is w channels up to 5e-6 * C; 0.05 channel of tolerance lands it on w for C < 10,000.
_ALIGN_TOLERANCE = 0.05


def kept_count(channels: int, rate: float, round_to: int = 1) -> int:
    """Channels kept at `rate`.

    round_to = 1: #{rank < max(C*rate, 1)}, in float32 as the reference. round_to = r > 1:
    C*rate rounded up to a multiple of r, at least r, at most C (the aligned width)."""
    if round_to == 1:
        threshold = max(float(np.float32(channels) * np.float32(rate)), 1.0)
        return min(channels, int(math.ceil(threshold)))
    units = math.ceil((channels * float(rate) - _ALIGN_TOLERANCE) / round_to)
    return min(channels, max(round_to, units * round_to))


def aligned_rate(channels: int, rate: float, round_to: int = 1) -> float:
    """The rate written for `rate` at `round_to`: the kept fraction kept/C of its aligned
    width (r = 1: `rate` as it is, the reference's rates)."""
    if round_to == 1:
        return float(rate)
    return round(kept_count(channels, rate, round_to) / channels, 5)


def aligned_widths(channels: int, round_to: int = 1) -> list[int]:
    """Every width a group of `channels` can have at `round_to`, ascending."""
    return sorted(set(range(round_to, channels + 1, round_to)) | {channels})


def check_round_to(round_to, groups) -> int:
    """`round_to` as an int; UserError (what to fix) if it is not >= 1 or exceeds a group."""
    try:
        valid = not isinstance(round_to, bool) and int(round_to) == round_to >= 1
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise UserError(f"search.round_to must be an integer >= 1 (1: any width; 8 or 16: "
                         f"widths in the runtimes' channel blocks), got {round_to!r}")
    round_to = int(round_to)
    narrow = [g for g in groups if g.channels < round_to]
    if narrow:
        g = min(narrow, key=lambda g: g.channels)
        raise UserError(
            f"search.round_to={round_to} is larger than gate group {g.name!r} "
            f"({g.channels} channels; {len(narrow)} group(s) are narrower than {round_to}); "
            f"use a round_to of at most {min(x.channels for x in groups)}")
    return round_to


class GateGroup:
    """The EKG state of one channel group (see the module docstring)."""

    def __init__(self, group):
        self.group = group  # the ChannelGroup (name, channels, members, gate places)
        self._rate = 1.0
        self._round_to = 1
        self._rank = np.arange(self.channels, dtype=np.int64)
        self.score = np.zeros(self.channels, dtype=np.float64)
        # Sub-network state, saved in the sub-network spec, never in the model weights.
        self.mask_variable = tf.Variable(
            tf.ones([self.channels], tf.float32), trainable=False,
            name=f"{self.name.replace('/', '_')}_mask",
            synchronization=tf.VariableSynchronization.ON_WRITE,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def channels(self) -> int:
        return self.group.channels

    @property
    def uses(self) -> int:
        return self.group.uses

    @property
    def members(self) -> tuple:
        return self.group.members

    @property
    def gate_tensors(self) -> tuple:
        return self.group.gate_tensors

    def __repr__(self):
        return (f"GateGroup({self.name!r}, channels={self.channels}, rate={self.rate:.4f}, "
                f"kept={self.kept}, uses={self.uses}, round_to={self.round_to})")

    @property
    def round_to(self) -> int:
        """Kept widths are multiples of this (or the full width); 1 = any width."""
        return self._round_to

    @round_to.setter
    def round_to(self, value: int):
        self._round_to = check_round_to(value, [self])
        self._sync()

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, value: float):
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"gate group {self.name!r}: rate must be in [0, 1], got {value}")
        self._rate = value
        self._sync()

    @property
    def rank(self) -> np.ndarray:
        return self._rank.copy()

    @rank.setter
    def rank(self, value):
        value = np.asarray(value, dtype=np.int64)
        if value.shape != (self.channels,) or sorted(value.tolist()) != list(range(self.channels)):
            raise ValueError(f"gate group {self.name!r}: rank must be a permutation of "
                             f"0..{self.channels - 1}, got shape {value.shape}")
        self._rank = value
        self._sync()

    def set_rank_from_score(self, score=None):
        """Rank channels by descending score (ties keep channel order)."""
        if score is not None:
            self.score = np.asarray(score, dtype=np.float64).reshape(self.channels)
        order = np.argsort(-self.score, kind="stable")
        rank = np.empty(self.channels, dtype=np.int64)
        rank[order] = np.arange(self.channels)
        self.rank = rank

    @property
    def kept(self) -> int:
        return kept_count(self.channels, self._rate, self._round_to)

    def mask(self) -> np.ndarray:
        return (self._rank < self.kept).astype(np.float32)

    def kept_indices(self) -> np.ndarray:
        """Indices of the surviving channels, in channel order."""
        return np.flatnonzero(self.mask()).astype(np.int64)

    def _sync(self):
        self.mask_variable.assign(self.mask())


@tf.custom_gradient
def gate(x, mask):
    """x * mask (mask broadcast on the last axis); the gradient to x is not masked."""
    def grad(dy):
        return dy, tf.zeros_like(mask)
    return x * mask, grad
