"""Tracing a Keras 3 model into a flat graph of layer calls.

`trace(model)` reads the functional graph of a functional or Sequential model and
flattens every nested functional/Sequential model into it (a
`keras.applications` backbone called inside a user's model becomes its own layer
calls, named `<backbone>.<layer>`), so that channels can be followed across the
boundary. The result is a list of `GraphNode`s in an order in which they can be
executed (Keras' own order), over integer tensor ids.

`execute(graph, feed, call_node)` replays the graph with any values: tensors
(forward passes), KerasTensors (rebuilding a new functional model), and from any
node on, given the tensors live there (the search's prefix cache).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import keras

from ekg_tf.errors import UserError
from ekg_tf.graph import keras_compat as compat


class UnsupportedModelError(UserError):
    """The model has no functional graph that ekg_tf can trace (says what is supported)."""


@dataclasses.dataclass(eq=False)
class TracedTensor:
    id: int
    shape: tuple            # with the batch dimension (None)
    dtype: str
    producer: int | None    # index of the producing node; None for a model input
    name: str


@dataclasses.dataclass(eq=False)
class GraphNode:
    """One call of a layer (or Keras operation) in the flattened graph."""
    index: int
    name: str               # unique; nested layers are "<model>.<layer>"
    layer: object           # the keras Layer / Operation that is called
    inputs: tuple           # tensor ids, flattened in argument order
    outputs: tuple          # tensor ids
    keras_node: object = dataclasses.field(repr=False)
    arg_ids: dict = dataclasses.field(repr=False)  # id(KerasTensor) -> tensor id

    @property
    def kind(self) -> str:
        return type(self.layer).__name__

    def arguments(self, values: dict):
        """(args, kwargs) of this call with every tensor replaced by `values[id]`."""
        return compat.node_arguments(self.keras_node,
                                     {k: values[t] for k, t in self.arg_ids.items()})


@dataclasses.dataclass(eq=False)
class TracedGraph:
    name: str
    nodes: list
    tensors: dict           # id -> TracedTensor
    inputs: tuple           # tensor ids of the model inputs
    outputs: tuple          # tensor ids of the model outputs
    consumers: dict = dataclasses.field(default_factory=dict)  # tensor id -> [node index]

    def live_tensors(self, start: int) -> tuple:
        """Tensor ids computed before node `start` and still needed from it on."""
        live = []
        for tid, t in self.tensors.items():
            made_before = t.producer is None or t.producer < start
            if not made_before:
                continue
            used_later = tid in self.outputs or any(
                c >= start for c in self.consumers.get(tid, ()))
            if used_later:
                live.append(tid)
        return tuple(live)


def _shape(kt) -> tuple:
    return tuple(None if d is None else int(d) for d in kt.shape)


class _Tracer:
    def __init__(self):
        self.nodes: list[GraphNode] = []
        self.tensors: dict[int, TracedTensor] = {}
        self.names: set[str] = set()

    def new_tensor(self, kt, producer, name) -> int:
        tid = len(self.tensors)
        self.tensors[tid] = TracedTensor(tid, _shape(kt), str(kt.dtype), producer, name)
        return tid

    def unique(self, name: str) -> str:
        base, n = name, 1
        while name in self.names:
            n += 1
            name = f"{base}_{n}"
        self.names.add(name)
        return name

    def add_functional(self, functional, input_ids: list, prefix: str) -> list:
        """Adds the nodes of `functional` with its inputs bound to `input_ids`; returns the
        tensor ids of its outputs."""
        ids = {id(kt): tid for kt, tid in zip(functional.inputs, input_ids)}
        for knode in compat.nodes_in_call_order(functional):
            layer = knode.operation
            in_kts = compat.node_inputs(knode)
            missing = [kt for kt in in_kts if id(kt) not in ids]
            if missing:
                raise UnsupportedModelError(
                    f"layer {layer.name!r} of {functional.name!r} reads a tensor that does "
                    "not come from the model's inputs; ekg_tf traces models whose every "
                    "tensor is computed from their inputs")
            in_ids = [ids[id(kt)] for kt in in_kts]
            inner = compat.functional_of(layer)
            if inner is not None and isinstance(layer, keras.Model):
                if len(in_kts) != len(inner.inputs):
                    raise UnsupportedModelError(
                        f"nested model {layer.name!r} is called with {len(in_kts)} tensors "
                        f"but has {len(inner.inputs)} inputs")
                out_ids = self.add_functional(inner, in_ids, f"{prefix}{layer.name}.")
                for kt, tid in zip(compat.node_outputs(knode), out_ids):
                    ids[id(kt)] = tid
                continue
            index = len(self.nodes)
            name = self.unique(prefix + layer.name)
            out_ids = []
            for i, kt in enumerate(compat.node_outputs(knode)):
                tid = self.new_tensor(kt, index, f"{name}:{i}")
                ids[id(kt)] = tid
                out_ids.append(tid)
            self.nodes.append(GraphNode(index, name, layer, tuple(in_ids), tuple(out_ids),
                                        knode, {id(kt): ids[id(kt)] for kt in in_kts}))
        return [ids[id(kt)] for kt in functional.outputs]


def trace(model) -> TracedGraph:
    """The flattened layer graph of a functional or Sequential Keras model."""
    functional = compat.functional_of(model)
    if functional is None:
        if isinstance(model, keras.Sequential):
            raise UnsupportedModelError(
                f"Sequential model {model.name!r} is not built: give it a keras.Input(shape=...) "
                "as its first layer (or call it once on a batch) before pruning it")
        raise UnsupportedModelError(
            f"{model.name!r} ({type(model).__name__}) is a subclassed model without a "
            "functional graph. ekg_tf prunes functional and Sequential Keras models (and "
            "functional/Sequential models nested in them): build it as "
            "keras.Model(inputs, outputs) from keras.Input, or wrap its layers in "
            "keras.Sequential([keras.Input(...), ...])")
    tracer = _Tracer()
    input_ids = [tracer.new_tensor(kt, None, kt.name) for kt in functional.inputs]
    output_ids = tracer.add_functional(functional, input_ids, "")
    graph = TracedGraph(model.name, tracer.nodes, tracer.tensors, tuple(input_ids),
                        tuple(output_ids))
    for node in graph.nodes:
        for tid in node.inputs:
            graph.consumers.setdefault(tid, []).append(node.index)
    return graph


def execute(graph: TracedGraph, feed: dict, call_node: Callable, start: int = 0,
            on_tensor: Callable | None = None, capture_at=()) -> tuple:
    """Replays `graph` from node `start`; returns (outputs, captures).

    feed: tensor id -> value for the model inputs (start = 0) or for
    `graph.live_tensors(start)`. `call_node(node, values)` returns the node's outputs
    (a value or a list). `on_tensor(tid, value)` may replace a value as soon as it is
    computed (gates). `capture_at`: node indices before which the live tensors are
    returned, as {index: tuple of values in `live_tensors(index)` order}.
    """
    values = dict(feed)
    captures = {}
    capture_at = set(capture_at)
    live = {i: graph.live_tensors(i) for i in capture_at}
    for node in graph.nodes[start:]:
        if node.index in capture_at:
            captures[node.index] = tuple(values[t] for t in live[node.index])
        out = call_node(node, values)
        flat = keras.tree.flatten(out)
        if len(flat) != len(node.outputs):
            raise RuntimeError(f"{node.name}: {len(flat)} outputs, traced {len(node.outputs)}")
        for tid, value in zip(node.outputs, flat):
            values[tid] = value if on_tensor is None else on_tensor(tid, value)
    return tuple(values[t] for t in graph.outputs), captures


def rebuild(graph: TracedGraph, call_node: Callable, name: str) -> keras.Model:
    """A new functional model from `graph`, each node replaced by `call_node(node,
    args, kwargs)` applied to KerasTensors (slimming, BN folding)."""
    inputs = []
    for tid in graph.inputs:
        t = graph.tensors[tid]
        inputs.append(keras.Input(shape=t.shape[1:], dtype=t.dtype, name=t.name))

    def call(node, values):
        args, kwargs = node.arguments(values)
        return call_node(node, args, kwargs)

    outputs, _ = execute(graph, dict(zip(graph.inputs, inputs)), call)
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs,
                       outputs[0] if len(outputs) == 1 else list(outputs), name=name)
