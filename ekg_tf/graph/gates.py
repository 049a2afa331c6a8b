"""Gate groups: the pruning state (rate, rank, score, mask) of one channel group.

A `GateGroup` wraps a structural `ChannelGroup` of the dependency graph with the
EKG state of the reference: `score[C]` (accumulated importance), `rank[C]`
(0 = most important channel) and `rate` (kept fraction); its mask keeps the
channels with `rank < max(C * rate, 1)` (at least one channel survives). The mask
lives in a non-trainable variable so that changing rates never retraces a
compiled forward pass.

`gate(x, mask)` multiplies a gated tensor by its mask; its gradient passes
through unmasked (as the reference's gate), so the Taylor score
`|sum_{b,h,w} dL/dy * y|` of an upstream gate also sees pruned channels' paths.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf


def kept_count(channels: int, rate: float) -> int:
    """Channels kept at `rate`: #{rank < max(C*rate, 1)}, in float32 as the reference."""
    threshold = max(float(np.float32(channels) * np.float32(rate)), 1.0)
    return min(channels, int(math.ceil(threshold)))


class GateGroup:
    """The EKG state of one channel group (see the module docstring)."""

    def __init__(self, group):
        self.group = group  # the ChannelGroup (name, channels, members, gate places)
        self._rate = 1.0
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
                f"kept={self.kept}, uses={self.uses})")

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
        return kept_count(self.channels, self._rate)

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
