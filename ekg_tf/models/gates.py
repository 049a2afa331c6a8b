"""Gates and gate groups: the explicit pruning objects of EKG.

A `GateGroup` is a set of channels that are pruned together (e.g. the residual
stream of a stage). It owns the mask variable, the accumulated importance
`score`, the `rank` of each channel (0 = most important) and the kept `rate`.
A `Gate` is one *place* where a group's mask multiplies an activation; a group
may be applied at several places (`uses`).
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import keras


def kept_count(channels: int, rate: float) -> int:
    """Channels kept at `rate`: #{rank < max(C*rate, 1)}, in float32 as the reference."""
    threshold = max(float(np.float32(channels) * np.float32(rate)), 1.0)
    return min(channels, int(math.ceil(threshold)))


class GateGroup:
    """Channels pruned together; one mask shared by every `Gate` that applies it."""

    def __init__(self, name: str, channels: int):
        self.name = name
        self.channels = int(channels)
        self.gates: list[Gate] = []
        self._rate = 1.0
        self._rank = np.arange(self.channels, dtype=np.int64)
        self.score = np.zeros(self.channels, dtype=np.float64)
        # Not tracked by Keras on purpose: masks are sub-network state, saved in
        # the sub-network spec, never in model weights.
        self.mask_variable = tf.Variable(
            tf.ones([self.channels], tf.float32), trainable=False,
            name=f"{name}_mask", synchronization=tf.VariableSynchronization.ON_WRITE,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def __repr__(self):
        return (f"GateGroup({self.name!r}, channels={self.channels}, rate={self.rate:.4f}, "
                f"kept={self.kept}, uses={self.uses})")

    @property
    def uses(self) -> int:
        return len(self.gates)

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


class Gate(keras.layers.Layer):
    """Multiplies an activation by its group's mask; reports Taylor importance.

    The backward pass lets the gradient through unmasked (as the reference does)
    and sends `|sum_{b,h,w} dL/dy * y|` per channel to `score_probe`, so that
    `tape.gradient(L, gate.score_probe)` is this place's importance score.
    """

    def __init__(self, group: GateGroup, **kwargs):
        super().__init__(**kwargs)
        self.group = group
        group.gates.append(self)
        self._probe = _ScoreProbe(group.channels, self.name)

    @property
    def score_probe(self) -> tf.Variable:
        return self._probe.variable

    def call(self, x):
        mask = tf.cast(self.group.mask_variable, x.dtype)
        probe = tf.cast(self.score_probe, x.dtype)
        return _gate_op(x, mask, probe)

    def compute_output_shape(self, input_shape):
        return input_shape


class _ScoreProbe:
    """Holds a zero variable whose 'gradient' is the gate's score (kept out of Keras tracking)."""

    def __init__(self, channels, name):
        self.variable = tf.Variable(tf.zeros([channels], tf.float32), trainable=True,
                                    name=f"{name}_score_probe")


@tf.custom_gradient
def _gate_op(x, mask, probe):
    del probe  # only a handle for the score
    y = x * mask
    reduce_axes = list(range(len(x.shape) - 1))

    def grad(dy):
        score = tf.abs(tf.reduce_sum(dy * y, axis=reduce_axes))
        return dy, tf.zeros_like(mask), score

    return y, grad
