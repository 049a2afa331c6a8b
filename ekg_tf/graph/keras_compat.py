"""Every use of a Keras 3 private API in ekg_tf, in one place (checked with keras 3.15).

Keras 3 exposes the functional graph only through private attributes. The channel
tracer needs four things from it; each function below says which private API it
uses and why, so that a Keras upgrade has one file to check.
"""
from __future__ import annotations

import keras


def functional_of(model):
    """The `Functional` graph behind `model`, or None when it has none.

    A `keras.Model` built with `keras.Model(inputs, outputs)` is itself a
    `Functional` (private class `keras.src.models.functional.Functional`); a built
    `keras.Sequential` keeps one in the private attribute `_functional`. A subclassed
    model (its own `call`) has no graph.
    """
    from keras.src.models.functional import Functional  # private: the graph class
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)  # private: Sequential's graph
    if isinstance(model, Functional):
        return model
    return None


def nodes_in_call_order(functional) -> list:
    """The call events (`Node`s) of a functional graph, inputs first, in the order
    Keras itself executes them (`Functional._run_through_graph`: by depth, deepest
    first). Uses the private `_nodes_by_depth`; input placeholders are left out."""
    by_depth = functional._nodes_by_depth  # private: Keras' own topological order
    nodes = []
    for depth in sorted(by_depth, reverse=True):
        nodes.extend(node for node in by_depth[depth]
                     if node.operation is not None and not node.is_input)
    return nodes


def node_arguments(node, values_by_keras_tensor_id: dict):
    """(args, kwargs) of a recorded call with every KerasTensor replaced by its value.

    `Node.arguments` (a private `SymbolicArguments`) keeps the call's structure
    (lists, dicts, non-tensor arguments); `fill_in` is how Keras replays a call."""
    return node.arguments.fill_in(values_by_keras_tensor_id)


def node_inputs(node) -> list:
    """The KerasTensors a recorded call consumed, flattened in argument order
    (`Node.input_tensors`, private)."""
    return list(node.input_tensors)


def node_outputs(node) -> list:
    """The KerasTensors a recorded call produced, flattened (`Node.outputs`, private)."""
    return list(node.outputs)


def accepts_training(layer) -> bool:
    """Whether `layer.call` takes a `training` argument (Keras' private
    `_call_has_training_arg`, which is how Keras itself decides to pass it)."""
    return bool(getattr(layer, "_call_has_training_arg", False))


def all_layers(model) -> list:
    """Every layer inside `model`, nested ones included: the private `_flatten_layers`,
    the walk Keras itself uses to collect weights (it also sees layers that a
    subclassed model holds as attributes, which `model.layers` may not list)."""
    return list(model._flatten_layers(include_self=False, recursive=True))
