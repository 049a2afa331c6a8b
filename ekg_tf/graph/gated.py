"""The gated clone of a Keras model: the same layers and weights, with EKG gates.

`GatedModel(model)` traces `model`, derives its channel groups and runs it through
`MaskedForward`: with every rate at 1.0 it computes the original model's outputs;
lowering a group's rate masks the channels the sub-network drops. Its variables
are the original model's (training the clone trains the model).

    gated = GatedModel(keras.applications.MobileNetV2(weights=None, ...))
    gated.gate_groups                # [GateGroup(...), ...]: rate, rank, score, mask
    gated(x, training=True, freeze_bn_stats=True)   # BN batch statistics, stats frozen
"""
from __future__ import annotations

import keras

from ekg_tf.errors import UserError
from ekg_tf.graph.dependency import DependencyGraph, dependency_graph
from ekg_tf.graph.forward import MaskedForward, SlicedForward
from ekg_tf.graph.gates import GateGroup
from ekg_tf.graph.rules import BatchNormStep


class NothingToPruneError(UserError):
    """Every channel group of the model is pinned."""


class _State:
    """Plain holder (kept out of Keras' attribute tracking)."""

    def __init__(self, dependency, groups):
        self.dependency = dependency
        self.groups = groups
        self.by_name = {g.name: g for g in groups}


class GatedModel(keras.Model):
    """See the module docstring. `sync_bn`: batch statistics of the global batch under
    several replicas (N replicas compute what one device computes)."""

    def __init__(self, model: keras.Model, dependency: DependencyGraph | None = None,
                 sync_bn: bool = True, name: str | None = None):
        dependency = dependency or dependency_graph(model)
        if not dependency.groups:
            reasons = "; ".join(f"{p.layer} ({p.kind}): {p.reason}" for p in dependency.pinned)
            raise NothingToPruneError(
                f"nothing to prune in {model.name!r}: every channel group is pinned ({reasons})")
        super().__init__(name=name or f"{model.name}_gated")
        self.base = model
        self.sync_bn = bool(sync_bn)
        groups = [GateGroup(g) for g in dependency.groups]
        self._ekg = _State(dependency, groups)
        self._masked = MaskedForward(dependency, self._ekg.by_name)
        self._sliced = SlicedForward(dependency)
        self.built = True

    # -- structure
    @property
    def dependency(self) -> DependencyGraph:
        return self._ekg.dependency

    @property
    def gate_groups(self) -> list:
        """Every prunable group's EKG state, in network order."""
        return list(self._ekg.groups)

    def gate_group(self, name: str) -> GateGroup:
        try:
            return self._ekg.by_name[name]
        except KeyError:
            raise KeyError(f"no gate group {name!r}; groups: "
                           f"{[g.name for g in self._ekg.groups]}") from None

    @property
    def arch_name(self) -> str:
        return self.base.name

    @property
    def image_shape(self) -> tuple:
        return tuple(int(d) for d in self.base.inputs[0].shape[1:])

    @property
    def num_classes(self) -> int:
        return int(self.base.outputs[0].shape[-1])

    @property
    def sliced(self) -> SlicedForward:
        """The real-width forward of this model's graph (see `SlicedForward`)."""
        return self._sliced

    @property
    def masked(self) -> MaskedForward:
        return self._masked

    # -- forward
    def bn_step(self, training: bool, freeze_bn_stats: bool, record=None) -> BatchNormStep:
        mode = "inference" if not training else ("batch" if freeze_bn_stats else "train")
        return BatchNormStep(mode, sync=self.sync_bn, record=record)

    def call(self, inputs, training=False, freeze_bn_stats=False):
        """`training=True, freeze_bn_stats=True` evaluates with BN batch statistics (the
        search's mode): the moving statistics stay as they are and every other layer
        (dropout, noise) runs in inference mode."""
        training = bool(training)
        outputs, _ = self._masked.run(inputs, self.bn_step(training, freeze_bn_stats),
                                      training and not freeze_bn_stats)
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def compute_output_shape(self, input_shape):
        return self.base.compute_output_shape(input_shape)
