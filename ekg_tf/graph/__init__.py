"""The channel-dependency graph of any functional/Sequential Keras model, and its gated clone."""
from ekg_tf.graph.dependency import (ChannelGroup, DependencyGraph, Member, PinnedLayer,
                                     dependency_graph)
from ekg_tf.graph.trace import UnsupportedModelError, trace

__all__ = ["ChannelGroup", "DependencyGraph", "Member", "PinnedLayer", "UnsupportedModelError",
           "dependency_graph", "trace"]
