"""The channel-dependency graph of a Keras model: which channels must be pruned together.

`dependency_graph(model)` traces the model (`ekg_tf.graph.trace`) and follows the
channel axis through every layer with its `Rule`: every conv/dense output starts
an *atom* of channels; layers that tie channels (Add, Multiply, a shared layer
called twice) merge atoms into one group (union-find); Concatenate lays atoms side
by side. An atom is *pinned* (never pruned) when it reaches the model's inputs or
outputs or a layer that is not understood; every pin is listed with its layer,
class and reason. What remains are the prunable `ChannelGroup`s.

Gates (the EKG pruning objects) sit on the tensors of a group that a layer reads
through weights or re-lays out (conv, dense, depthwise, concatenate, flatten,
global pooling: `Rule.exit`), unless the tensor is already gated upstream through
layers that keep zero channels zero. For a ResNet this is the reference's
placement: after each block-internal ReLU, after every block's add + ReLU (the
stage's shared residual-stream group), and after the stem.
"""
from __future__ import annotations

import dataclasses

from ekg_tf.graph import rules as rules_lib
from ekg_tf.graph.layout import Layout
from ekg_tf.graph.trace import TracedGraph, UnsupportedModelError, trace


@dataclasses.dataclass(frozen=True)
class Member:
    """A layer's part in a group: `out` (its output channels are the group),
    `in` (reads the group through its weights), `channel` (per-channel weights or
    work), `tie` (merges it with other channels)."""
    layer: str
    kind: str
    role: str


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that are pruned together, and where the group is gated."""
    name: str
    channels: int
    members: tuple          # of Member
    gate_tensors: tuple     # names of the tensors its gate multiplies

    @property
    def uses(self) -> int:
        return len(self.gate_tensors)

    @property
    def layers(self) -> tuple:
        return tuple(dict.fromkeys(m.layer for m in self.members))

    def __repr__(self):
        return (f"ChannelGroup({self.name!r}, channels={self.channels}, uses={self.uses}, "
                f"layers={len(self.layers)})")


@dataclasses.dataclass(frozen=True)
class PinnedLayer:
    """A reason why channels touching `layer` are never pruned."""
    layer: str
    kind: str
    reason: str


class _Atoms:
    """Union-find over channel atoms, with the reasons atoms are pinned.

    An atom is a run of a layer's output channels. Atoms are split when channels laid
    out differently are tied (an SE gate of 24 channels multiplying a concatenation
    of 16 + 8): the atom's whole class is cut into pieces that line up, so that the
    pieces can be tied one to one (`split`). Layouts keep the atoms they were written
    with; `leaves` expands an atom into its current pieces.
    """

    def __init__(self):
        self.parent, self.size, self.owner, self.owner_kind = [], [], [], []
        self.order: list = []                # (first atom it comes from, offset): group order
        self.pieces: dict[int, tuple] = {}   # split atom -> its pieces, in order
        self.classes: dict[int, list] = {}   # root -> atoms of its class
        self.pins: dict[int, list] = {}      # root -> PinnedLayer reasons

    def new(self, size: int, owner: str, owner_kind: str, order=None) -> int:
        atom = len(self.parent)
        self.order.append(order or (atom, 0))
        self.parent.append(atom)
        self.size.append(int(size))
        self.owner.append(owner)
        self.owner_kind.append(owner_kind)
        self.classes[atom] = [atom]
        return atom

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def leaves(self, a: int) -> list:
        if a not in self.pieces:
            return [a]
        return [leaf for piece in self.pieces[a] for leaf in self.leaves(piece)]

    def expand(self, layout: Layout) -> Layout:
        return Layout(tuple((leaf, self.size[leaf]) for a, _ in layout.segments
                            for leaf in self.leaves(a)), layout.tile)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            keep, drop = min(ra, rb), max(ra, rb)  # the earlier atom names the group
            self.parent[drop] = keep
            self.classes[keep].extend(self.classes.pop(drop))
            self.pins.setdefault(keep, []).extend(self.pins.pop(drop, []))

    def split(self, a: int, cuts: list) -> None:
        """Cuts leaf atom `a` and every atom tied to it at offsets `cuts` (0 < cut < size)."""
        root = self.find(a)
        bounds = [0] + sorted(cuts) + [self.size[a]]
        members, pins = self.classes.pop(root), self.pins.pop(root, [])
        firsts = None
        for atom in members:
            origin, offset = self.order[atom]
            pieces = tuple(self.new(hi - lo, f"{self.owner[atom]}[{lo}:{hi}]",
                                    self.owner_kind[atom], (origin, offset + lo))
                           for lo, hi in zip(bounds, bounds[1:]))
            self.pieces[atom] = pieces
            if firsts is None:
                firsts = pieces
            else:
                for p, q in zip(firsts, pieces):
                    self.union(p, q)
        for piece in firsts:
            for pin in pins:
                self.pin(piece, pin)

    def pin(self, a: int, pin: PinnedLayer) -> None:
        for leaf in self.leaves(a):
            self.pins.setdefault(self.find(leaf), []).append(pin)

    def pinned(self, a: int) -> bool:
        return any(self.pins.get(self.find(leaf)) for leaf in self.leaves(a))


class _Builder:
    """The context rules work in: layouts of tensors, atoms, unions, pins."""

    def __init__(self, graph: TracedGraph):
        self.graph = graph
        self.atoms = _Atoms()
        self.layouts: dict[int, Layout] = {}
        self.layer_atoms: dict[tuple, int] = {}   # (id(layer), output i) -> atom
        self.layer_inputs: dict[int, Layout] = {}  # id(layer) -> first consumed layout
        self.members: list = []                   # (atom, Member)

    def shape(self, tid: int) -> tuple:
        return self.graph.tensors[tid].shape

    def channels_of(self, tid: int) -> int:
        shape = self.shape(tid)
        return int(shape[-1]) if len(shape) >= 2 and shape[-1] is not None else 1

    def new_atom(self, node, i: int) -> Layout:
        """The atom of output `i` of `node` (one atom per layer: a shared layer's calls
        produce the same channels)."""
        key = (id(node.layer), i)
        if key not in self.layer_atoms:
            self.layer_atoms[key] = self.atoms.new(self.channels_of(node.outputs[i]), node.name,
                                                   node.kind)
        atom = self.layer_atoms[key]
        self.members.append((atom, Member(node.name, node.kind, "out")))
        return Layout(((atom, self.atoms.size[atom]),))

    def consume(self, node, layout: Layout) -> None:
        """`node` reads `layout` through its weights (a second call of a shared layer
        ties what it reads to what the first call read)."""
        first = self.layer_inputs.setdefault(id(node.layer), layout)
        if first is not layout:
            self.union([first, layout], node)

    def union(self, layouts: list, node) -> None:
        """Ties the layouts position by position, splitting atoms where their
        boundaries differ; pins them when their widths or tilings differ."""
        ref = layouts[0]
        for other in layouts[1:]:
            if other.tile != ref.tile or other.width != ref.width:
                self.pin(layouts, node, "ties channels of different widths or layouts")
                return
            while True:
                a, b = self.atoms.expand(ref), self.atoms.expand(other)
                bounds_a, bounds_b = _bounds(a), _bounds(b)
                if bounds_a == bounds_b:
                    break
                every = sorted(set(bounds_a) | set(bounds_b))
                for layout, bounds in ((a, bounds_a), (b, bounds_b)):
                    for (atom, size), lo in zip(layout.segments, bounds):
                        cuts = [c - lo for c in every if lo < c < lo + size]
                        if cuts:
                            self.atoms.split(atom, cuts)
                            break  # a split changes both layouts' leaves: start again
                    else:
                        continue
                    break
            for (x, _), (y, _) in zip(a.segments, b.segments):
                self.atoms.union(x, y)

    def pin(self, layouts: list, node, reason: str) -> None:
        pin = PinnedLayer(node.name if node is not None else "", node.kind if node else "",
                          reason)
        for layout in layouts:
            for atom, _ in layout.segments:
                self.atoms.pin(atom, pin)


def _bounds(layout: Layout) -> list:
    """Start offset of each segment."""
    out, offset = [], 0
    for _, size in layout.segments:
        out.append(offset)
        offset += size
    return out


@dataclasses.dataclass(eq=False)
class DependencyGraph:
    """Channel groups of a traced model (see the module docstring).

    `groups`: the prunable groups in network order. `pinned`: why other channels
    are kept whole. `layout(tid)`: a tensor's channel layout as ((group name or
    None, size), ...) segments (None: pinned channels). `gates`: {tensor id:
    layout} of the gated tensors. `in_layout(node)` / `out_layout(node)`.
    """
    graph: TracedGraph
    groups: list
    pinned: list
    layouts: dict
    gates: dict
    rules: list

    @property
    def model_name(self) -> str:
        return self.graph.name

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no channel group {name!r}; groups: {[g.name for g in self.groups]}")

    def layout(self, tid: int) -> Layout:
        return self.layouts[tid]

    def in_layout(self, node) -> Layout:
        return self.layouts[node.inputs[0]]

    def out_layout(self, node) -> Layout:
        return self.layouts[node.outputs[0]]

    def rule(self, node):
        return self.rules[node.index]

    def summary(self) -> str:
        """A readable table of the groups and the pins."""
        lines = [f"{self.model_name}: {len(self.groups)} prunable channel groups, "
                 f"{len(self.pinned)} pins"]
        for g in self.groups:
            producers = [m.layer for m in g.members if m.role == "out"]
            lines.append(f"  {g.name:40s} {g.channels:5d} ch  uses {g.uses:3d}  "
                         f"produced by {', '.join(producers[:3])}"
                         + (f" (+{len(producers) - 3})" if len(producers) > 3 else ""))
        for p in self.pinned:
            lines.append(f"  pinned: {p.layer} ({p.kind}): {p.reason}")
        return "\n".join(lines)


def _add_members(b: _Builder, node, rule, ins, outs) -> None:
    if rule.produces:  # reads its inputs through weights; its outputs were added as "out"
        roles = [(ins, "in")]
    else:
        roles = [(ins + list(outs), "tie" if isinstance(rule, (rules_lib.Merge,
                                                               rules_lib.ConcatenateRule))
                  else "channel")]
    for layouts, role in roles:
        for layout in layouts:
            for atom, _ in layout.segments:
                b.members.append((atom, Member(node.name, node.kind, role)))


def _place_gates(graph: TracedGraph, b: _Builder, rules: list) -> dict:
    """{tensor id: True} for the gated tensors (see the module docstring)."""
    clean = {tid: False for tid in graph.inputs}
    gated = {}

    def prunable(layout):
        return any(not b.atoms.pinned(a) for a, _ in b.atoms.expand(layout).segments)

    def settle(tid):
        exits = any(rules[c].exit for c in graph.consumers.get(tid, ()))
        if exits and not clean[tid] and prunable(b.layouts[tid]):
            gated[tid] = True
            clean[tid] = True

    for tid in graph.inputs:
        settle(tid)
    for node, rule in zip(graph.nodes, rules):
        # A producer's outputs are new channels, gated where they are read, never clean.
        is_clean = not rule.produces and rule.clean(node, [clean[t] for t in node.inputs])
        for tid in node.outputs:
            clean[tid] = is_clean
            settle(tid)
    return gated


def _checked_rule(rule, node, ins, b: _Builder):
    """`rule`, or an `Unknown` rule (pinning the channels) when it cannot follow this call."""
    if not ins:
        return rules_lib.Unknown("has no tensor input")
    if len(node.outputs) != 1 and not isinstance(rule, rules_lib.Unknown):
        return rules_lib.Unknown(f"{node.kind} has {len(node.outputs)} outputs")
    reason = rule.problem(node, ins, b)
    return rules_lib.Unknown(reason) if reason else rule


def build_dependency_graph(graph: TracedGraph) -> DependencyGraph:
    """Follows the channels of a traced graph (see the module docstring)."""
    b = _Builder(graph)
    rules = [rules_lib.rule_for(node.layer) for node in graph.nodes]
    model_input = PinnedLayer("(input)", "InputLayer", "model input: its channels are data")
    for tid in graph.inputs:
        atom = b.atoms.new(b.channels_of(tid), graph.tensors[tid].name, "InputLayer")
        b.atoms.pin(atom, model_input)
        b.layouts[tid] = Layout(((atom, b.atoms.size[atom]),))
    for node in graph.nodes:
        ins = [b.layouts[t] for t in node.inputs]
        rule = rules[node.index] = _checked_rule(rules[node.index], node, ins, b)
        outs = rule.transfer(node, ins, b)
        for tid, layout in zip(node.outputs, outs):
            b.layouts[tid] = layout
        _add_members(b, node, rule, ins, outs)
    model_output = PinnedLayer("(output)", "", "model output: its channels are the result")
    for tid in graph.outputs:
        for atom, _ in b.layouts[tid].segments:
            b.atoms.pin(atom, model_output)
    gated = _place_gates(graph, b, rules)
    return _finish(graph, b, rules, gated)


def _finish(graph, b: _Builder, rules, gated) -> DependencyGraph:
    atoms = b.atoms
    leaves = [a for a in range(len(atoms.parent)) if a not in atoms.pieces]
    roots = sorted({atoms.find(a) for a in leaves},
                   key=lambda r: min(atoms.order[a] for a in atoms.classes[r]))
    gate_names: dict[int, list] = {}
    for tid in gated:
        for leaf, _ in atoms.expand(b.layouts[tid]).segments:
            gate_names.setdefault(atoms.find(leaf), []).append(graph.tensors[tid].name)
    # A prunable group needs a gate: its importance is measured there.
    for root in roots:
        if not atoms.pinned(root) and not gate_names.get(root):
            atoms.pin(root, PinnedLayer(atoms.owner[root], atoms.owner_kind[root],
                                        "no layer reads these channels through weights "
                                        "or re-lays them out: nowhere to gate them"))
    order = [r for r in roots if not atoms.pinned(r)]
    names = {}
    for root in order:
        first = min(atoms.classes[root], key=lambda a: atoms.order[a])
        names[root] = atoms.owner[first]
    members: dict[int, list] = {}
    for atom, member in b.members:
        for leaf in atoms.leaves(atom):
            root = atoms.find(leaf)
            if root in names and member not in members.setdefault(root, []):
                members[root].append(member)
    groups = [ChannelGroup(names[r], atoms.size[r], tuple(members[r]),
                           tuple(dict.fromkeys(gate_names[r]))) for r in order]
    pinned = []
    for root in roots:
        for pin in atoms.pins.get(root, []):
            if pin not in pinned:
                pinned.append(pin)

    def resolve(layout):
        return atoms.expand(layout).map(lambda leaf: names.get(atoms.find(leaf)))

    layouts = {tid: resolve(layout) for tid, layout in b.layouts.items()}
    gates = {tid: layouts[tid] for tid in gated
             if any(k is not None for k in layouts[tid].keys())}
    return DependencyGraph(graph, groups, pinned, layouts, gates, rules)


def dependency_graph(model) -> DependencyGraph:
    """The channel groups of a functional or Sequential Keras model (see the module doc)."""
    if not getattr(model, "built", True):
        raise UnsupportedModelError(f"model {model.name!r} is not built; build it on an input "
                                    "shape first")
    return build_dependency_graph(trace(model))
