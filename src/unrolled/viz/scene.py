"""What a picture of a graph shows, before any renderer: a :class:`Scene`.

Nodes carry a kind (input, op, state, output, loss, param, init), a column
(the step; -1 for the initial states) and a row (the layer within a step);
edges carry a kind (data, param, delay, init). Both renderers, DOT and
matplotlib, start from the same scene, so they show the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unrolled.graph.folded import Graph, Param, Vertex
from unrolled.graph.unroll import UnrolledGraph
from unrolled.words import count

from .styles import OP_ABBREVIATIONS, PARAM_COLORS


@dataclass
class SceneNode:
    id: str  # unique: a vertex or parameter name, or "name@t" in the unrolled graph
    label: str  # the full label (DOT)
    short: str  # an abbreviated label (matplotlib)
    kind: str  # input, op, state, output, loss, param or init
    step: int | None  # the column: a step, -1 for the initial states, None for the folded graph and parameters
    layer: int  # the row: depth within one step (inputs 0); parameters of the unrolled graph -1
    group: str  # the folded vertex or parameter this node copies
    shared_by: int = 0  # for a parameter of the unrolled graph: how many copies read it
    color: str = "#555555"  # a parameter's own colour (its border, and its edges in the unrolled graph)


@dataclass
class SceneEdge:
    src: str
    dst: str
    kind: str  # data, param, delay (a delay edge) or init (a learned initial state)
    depth: int = 0  # the delay depth of a delay edge


@dataclass
class Scene:
    """What a picture shows, independent of the renderer."""

    title: str
    unrolled: bool
    T: int | None
    nodes: list[SceneNode] = field(default_factory=list)
    edges: list[SceneEdge] = field(default_factory=list)
    _index: dict[str, SceneNode] = field(default_factory=dict, repr=False)

    def node(self, node_id: str) -> SceneNode:
        return self._index[node_id]

    def add(self, node: SceneNode) -> None:
        self.nodes.append(node)
        self._index[node.id] = node


def scene(what, unroll: int | None = None) -> Scene:
    """The picture of a folded graph, or of an unrolled one (``unroll=T`` or an :class:`UnrolledGraph`)."""
    if isinstance(what, UnrolledGraph):
        if unroll is not None and unroll != what.T:
            raise ValueError(f"the graph is already unrolled over T={count(what.T, 'step')}, "
                             f"but unroll={unroll} was asked for")
        return _unrolled_scene(what)
    if not isinstance(what, Graph):
        raise TypeError(f"cannot draw {type(what).__name__}: pass a Graph or an UnrolledGraph")
    if unroll is not None:
        return _unrolled_scene(what.unroll(unroll))
    return _folded_scene(what)


def vertex_layers(graph: Graph) -> dict[str, int]:
    """Each non-delay vertex's row within one step: inputs 0, an op one above its highest same-step operand.

    An input that feeds nothing but losses (a target) is lifted to just below
    its loss, beside the prediction, instead of running a long edge up the
    whole picture.
    """
    layer: dict[str, int] = {}
    for v in graph.step_order():
        if v.kind in ("input", "index"):
            layer[v.name] = 0
        else:
            below = [layer[a.name] for a in v.args if isinstance(a, Vertex) and a.kind != "delay"]
            layer[v.name] = 1 + max(below, default=0)
    readers: dict[str, list[Vertex]] = {}
    for v in graph.vertices.values():
        for a in v.args if v.kind == "op" else ():
            if isinstance(a, Vertex):
                readers.setdefault(a.name, []).append(v)
    losses = {l.name for l in graph.losses}
    for v in graph.inputs:
        rs = readers.get(v.name, [])
        if rs and all(r.name in losses for r in rs):
            layer[v.name] = min(layer[r.name] for r in rs) - 1
    return layer


def _vertex_kind(graph: Graph, v: Vertex, states: set[str]) -> str:
    if any(l.name == v.name for l in graph.losses):
        return "loss"
    if v.name in states:
        return "state"
    if v in graph.outputs:
        return "output"
    if v.kind in ("input", "index"):
        return "input"
    return "op"


def _op_text(v: Vertex) -> str:
    if v.kind == "input":
        return "input"
    if v.kind == "index":
        return "index"
    return v.op


def _abbreviate(text: str, width: int = 10) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _short_op(v: Vertex) -> str:
    op = _op_text(v)
    return OP_ABBREVIATIONS.get(op, op)


def _shape_text(p: Param) -> str:
    return "[" + ", ".join(str(s) for s in p.shape) + "]"


def _folded_scene(graph: Graph) -> Scene:
    graph.check()
    layers = vertex_layers(graph)
    states = set(graph.delayed())
    sc = Scene(f"{graph.name}: folded graph", unrolled=False, T=None)
    users: dict[str, list[str]] = {p: [] for p in graph.params}
    for v in graph.step_order():
        if v.kind == "op":
            for a in v.args:
                if isinstance(a, Param):
                    users[a.name].append(v.name)
    for name, init_param in _learned_inits(graph).items():
        users[init_param].append(name)
    for p in graph.params.values():
        below = min((layers[u] for u in users[p.name]), default=1) - 1
        sc.add(SceneNode(p.name, f"{p.name}\n{_shape_text(p)}", f"{_abbreviate(p.name)}\n{_shape_text(p)}",
                         "param", None, max(below, 0), p.name))
    for v in graph.step_order():
        kind = _vertex_kind(graph, v, states)
        sc.add(SceneNode(v.name, f"{v.name}\n[{v.size}] {_op_text(v)}",
                         f"{_abbreviate(v.name)}\n[{v.size}] {_short_op(v)}", kind, None, layers[v.name], v.name))
    for v in graph.step_order():
        for a in v.args if v.kind == "op" else ():
            if isinstance(a, Param):
                sc.edges.append(SceneEdge(a.name, v.name, "param"))
            elif a.kind == "delay":
                sc.edges.append(SceneEdge(a.source.name, v.name, "delay", a.depth))
            else:
                sc.edges.append(SceneEdge(a.name, v.name, "data"))
    for name, init_param in _learned_inits(graph).items():
        sc.edges.append(SceneEdge(init_param, name, "init"))
    return sc


def _learned_inits(graph: Graph) -> dict[str, str]:
    """State name -> the parameter holding its learned initial value."""
    return {
        name: graph.init_param_name(name)
        for name in graph.delayed()
        if graph.vertices[name].init == "learned"
    }


def _unrolled_scene(dag: UnrolledGraph) -> Scene:
    graph = dag.graph
    layers = vertex_layers(graph)
    states = set(graph.delayed())
    sc = Scene(f"{graph.name}: unrolled over T={count(dag.T, 'step')}", unrolled=True, T=dag.T)
    shared = {name: len(users) for name, users in dag.params_of().items()}
    color = {name: PARAM_COLORS[i % len(PARAM_COLORS)] for i, name in enumerate(graph.params)}
    for node in dag.nodes:
        kind = dag.kind[node]
        of = dag.vertex[node]
        nid = str(node)
        if kind == "param":
            n = shared[node.name]
            sc.add(SceneNode(nid, f"{node.name}\n{_shape_text(of)}\nshared by {n}",
                             f"{_abbreviate(node.name)}\n{_shape_text(of)}", "param", None, -1, node.name, n,
                             color[node.name]))
        elif kind == "init":
            sc.add(SceneNode(nid, f"{nid}\ninit={of.init}", f"{_abbreviate(nid)}\n{of.init}", "init", -1,
                             layers[node.name], node.name))
        else:
            sc.add(SceneNode(nid, f"{node.name}\n[{of.size}] {_short_op(of)}", _abbreviate(node.name),
                             _vertex_kind(graph, of, states), node.t, layers[node.name], node.name))
    for src, dst in dag.edges:
        if dag.kind[src] == "param":
            sc.edges.append(SceneEdge(str(src), str(dst), "param"))
        elif src.t != dst.t:
            sc.edges.append(SceneEdge(str(src), str(dst), "delay", dst.t - src.t))
        else:
            sc.edges.append(SceneEdge(str(src), str(dst), "data"))
    return sc
