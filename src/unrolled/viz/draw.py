"""Pictures of recurrent graphs: the folded graph with its backward arrows,
and the unrolled DAG with time running left to right.

    to_dot(graph)                       # DOT text of the folded graph
    to_dot(graph.unroll(5))             # DOT text of the unrolled DAG
    draw(graph, "elman.svg")            # .dot, .svg or .png
    draw(graph, "elman5.png", unroll=5)

Both renderers start from one description of the picture, a :class:`Scene`
(nodes with a kind, a column and a layer; edges with a kind), so the DOT text
and the matplotlib drawing show the same thing. SVG and PNG come from
Graphviz's ``dot`` when it is installed and from matplotlib otherwise;
``renderer=`` picks one explicitly.

What the pictures say, in both renderers: data flows bottom to top (inputs
below, outputs and losses above); parameters are grey boxes; a vertex read
through a delay (a state) is yellow; delay edges are red and dashed. In the
folded graph the delay edges are the backward arrows that close the cycles,
labelled with their depth ``d=k``. In the unrolled graph there is one column
per step, the initial states in a column of their own at the left; delay edges
run from one column to a later one; each parameter is drawn once, in a row
below the columns, and linked to every copy that reads it by edges of its own
colour. In the DOT text every node and edge carries a ``class`` attribute
(``param``, ``delay``, ``init``, ...), and shared parameters are marked
``class="param shared"`` with the number of copies that read them.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from unrolled.graph.folded import Graph, Param, Vertex
from unrolled.graph.unroll import UnrolledGraph
from unrolled.words import count

FORMATS = (".dot", ".svg", ".png")
RENDERERS = ("auto", "graphviz", "matplotlib")

INSTALL_GRAPHVIZ = (
    "install Graphviz (`apt install graphviz` on Debian/Ubuntu, `brew install graphviz` on macOS, "
    "`conda install -c conda-forge graphviz` in a conda environment)"
)

# Fill colours by node kind, shared by both renderers.
FILL = {
    "input": "#cfe2f3",
    "op": "#ffffff",
    "state": "#fff2cc",
    "output": "#d9ead3",
    "loss": "#f4cccc",
    "param": "#e6e6e6",
    "init": "#fff2cc",
}
DELAY_COLOR = "#cc0000"
# One colour per parameter for its edges in the unrolled picture (cycled).
PARAM_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")

OP_ABBREVIATIONS = {"cross_entropy": "x-entropy", "log_softmax": "log_smax", "one_minus": "1-x", "embedding": "embed"}


class GraphvizMissing(RuntimeError):
    """Graphviz rendering was asked for but its ``dot`` program is not installed."""


# ------------------------------------------------------------------- scene


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


# --------------------------------------------------------------------- DOT


def to_dot(what, unroll: int | None = None) -> str:
    """DOT text of a folded graph, or of the unrolled DAG (``unroll=T`` or an :class:`UnrolledGraph`).

    One line per node and one per edge: the unrolled graph's text has exactly
    ``len(dag.nodes)`` node lines and ``len(dag.edges)`` edge lines. The
    folded graph is left to ``dot`` to lay out. The unrolled graph carries
    fixed positions (``pos``, one column per step) that Graphviz keeps when run
    as ``dot -Kneato -n2``; plain ``dot`` ignores them and lays it out anew.
    """
    sc = what if isinstance(what, Scene) else scene(what, unroll)
    lines = [f"digraph {_quote(sc.title)} {{"]
    if sc.unrolled:
        lines += [
            f"  // fixed positions: render with  dot -Kneato -n2 -Tsvg FILE.dot -o FILE.svg",
            f"  label={_quote(sc.title)}; labelloc=t; fontname=Helvetica; fontsize=16; splines=true;",
            '  node [fontname=Helvetica, fontsize=9, shape=box, style="rounded,filled", margin="0.05,0.02"];',
            "  edge [fontname=Helvetica, fontsize=8, arrowsize=0.5];",
        ]
        lines += _unrolled_dot_body(sc)
    else:
        lines += [
            f"  label={_quote(sc.title)}; labelloc=t; fontname=Helvetica; fontsize=14;",
            "  rankdir=BT; nodesep=0.2; ranksep=0.3;",
            '  node [fontname=Helvetica, fontsize=10, shape=box, style="rounded,filled", height=0.3];',
            "  edge [fontname=Helvetica, fontsize=9, arrowsize=0.6];",
        ]
        lines += [_dot_node(n) for n in sc.nodes]
    lines += [_dot_edge(sc, e) for e in sc.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


DOT_INCH_X, DOT_INCH_Y = 1.2, 0.62  # inches per slot and per layer in the unrolled graph's fixed layout


def _unrolled_dot_body(sc: Scene) -> list[str]:
    lay = layout(sc)
    pt = {nid: (x * DOT_INCH_X * 72, y * DOT_INCH_Y * 72) for nid, (x, y) in lay.pos.items()}
    half_w, half_h = 0.5 * DOT_INCH_X * 72, 0.5 * DOT_INCH_Y * 72

    def box(ids: list[str], room_above: float, room_below: float = 0.0) -> str:
        xs, ys = [pt[i][0] for i in ids], [pt[i][1] for i in ids]
        return (f"{min(xs) - half_w:.0f},{min(ys) - half_h - room_below:.0f},"
                f"{max(xs) + half_w:.0f},{max(ys) + half_h + room_above:.0f}")

    lines = []
    columns = [("cluster_init", "initial", -1)] + [(f"cluster_t{t}", f"t={t}", t) for t in range(sc.T)]
    for cluster, label, step in columns:
        members = [n for n in sc.nodes if n.step == step]
        if not members:
            continue
        style = ('style="rounded,dashed"' if step == -1
                 else 'style="rounded,filled"; fillcolor="#f4f4f4"; color="#cccccc"')
        lines.append(f"  subgraph {cluster} {{ label={_quote(label)}; fontsize=12; {style}; "
                     f'bb="{box([n.id for n in members], 18)}";')
        lines += ["  " + _dot_node(n, pt[n.id]) for n in members]
        lines.append("  }")
    params = [n for n in sc.nodes if n.kind == "param"]
    if params:
        lines.append('  subgraph cluster_params { label="parameters: one each, shared by every step"; fontsize=12; '
                     f'labelloc=b; style="rounded,dashed"; bb="{box([n.id for n in params], 0, 14)}";')
        lines += ["  " + _dot_node(n, pt[n.id]) for n in params]
        lines.append("  }")
    return lines


def _dot_node(n: SceneNode, pos: tuple[float, float] | None = None) -> str:
    attrs = {"label": n.label, "fillcolor": FILL[n.kind], "class": n.kind}
    if pos is not None:
        attrs["pos"] = f"{pos[0]:.1f},{pos[1]:.1f}!"
    if n.kind == "param":
        attrs["style"] = "filled"
        if n.shared_by:
            attrs["class"] = "param shared"
            attrs["comment"] = f"one parameter shared by {n.shared_by} copies"
            attrs["color"] = n.color
            attrs["penwidth"] = "2"
    elif n.kind == "init":
        attrs["style"] = "rounded,filled,dashed"
    return f"  {_quote(n.id)} [{_attrs(attrs)}];"


def _dot_edge(sc: Scene, e: SceneEdge) -> str:
    attrs: dict[str, str] = {"class": e.kind}
    if e.kind == "delay":
        attrs.update(color=DELAY_COLOR, fontcolor=DELAY_COLOR, style="dashed", constraint="false", penwidth="1.2")
        if not sc.unrolled or e.depth > 1:
            attrs["label"] = f"d={e.depth}"
        attrs["comment"] = f"delay edge, depth {e.depth}"
    elif e.kind == "param":
        if sc.unrolled:
            attrs.update(color=sc.node(e.src).color, penwidth="0.6", constraint="false")
        else:
            attrs.update(color="#777777")
    elif e.kind == "init":
        attrs.update(style="dotted", label="init", constraint="false")
    return f"  {_quote(e.src)} -> {_quote(e.dst)} [{_attrs(attrs)}];"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(attrs: dict[str, str]) -> str:
    return ", ".join(f"{k}={_quote(str(v))}" for k, v in attrs.items())


# ---------------------------------------------------------------- rendering


def draw(what, path, *, unroll: int | None = None, renderer: str = "auto") -> Path:
    """Write a picture of a folded graph, or of its unrolled DAG, to ``path`` (.dot, .svg or .png).

    ``unroll=T`` (or passing an :class:`UnrolledGraph`) draws the unrolled
    DAG. ``renderer``: ``"auto"`` uses Graphviz's ``dot`` when it is
    installed and matplotlib otherwise; ``"graphviz"`` insists on Graphviz
    (when it is missing, the DOT text is written next to ``path`` and
    :class:`GraphvizMissing` says how to install it); ``"matplotlib"`` never
    calls Graphviz. Returns the path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot draw to '{path}': the file name must end in {', '.join(FORMATS)}")
    if renderer not in RENDERERS:
        raise ValueError(f"unknown renderer '{renderer}'; use one of {', '.join(RENDERERS)}")
    sc = scene(what, unroll)
    if suffix == ".dot":
        path.write_text(to_dot(sc))
        return path
    dot = dot_program()
    if renderer == "graphviz" and dot is None:
        dot_path = path.with_suffix(".dot")
        dot_path.write_text(to_dot(sc))
        raise GraphvizMissing(
            f"cannot render '{path}' with Graphviz: its `dot` program is not installed; "
            f"{INSTALL_GRAPHVIZ}, or use the matplotlib renderer; the DOT text is in '{dot_path}'"
        )
    if dot is not None and renderer != "matplotlib":
        _render_graphviz(dot, to_dot(sc), path, suffix[1:], fixed=sc.unrolled)
    else:
        _render_matplotlib(sc, path)
    return path


def dot_program() -> str | None:
    """The path of Graphviz's ``dot``, or None when it is not installed (``UNROLLED_DOT`` overrides)."""
    return os.environ.get("UNROLLED_DOT") or shutil.which("dot")


def _render_graphviz(dot: str, text: str, path: Path, fmt: str, fixed: bool) -> None:
    layout_flags = ["-Kneato", "-n2"] if fixed else []  # keep the positions to_dot wrote
    try:
        done = subprocess.run([dot, *layout_flags, f"-T{fmt}", "-o", str(path)], input=text, capture_output=True,
                              text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"Graphviz could not render '{path}': {e}") from None
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise RuntimeError(f"Graphviz could not render '{path}': {first}")


# ------------------------------------------------------------------ layout


@dataclass
class Layout:
    """Where things go, in slot units (x across, y = layer, up): for the matplotlib renderer, and as the
    fixed positions in the unrolled graph's DOT text.

    ``pos``: each node's centre. ``waypoints[i]``: for an edge that spans
    several layers, the points it passes through on the way (one per layer
    between its ends, each holding a slot of its own, so it never crosses a
    box). ``lanes[i]``: for a delay edge, the x of the vertical lane it runs
    along, beside the graph (folded) or in the gap before its reader's
    column (unrolled).
    """

    pos: dict[str, tuple[float, float]]
    waypoints: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    lanes: dict[int, float] = field(default_factory=dict)


NODE_WIDTH, DUMMY_WIDTH = 1.0, 0.45  # slots taken in a row by a box and by an edge passing through


def layout(sc: Scene) -> Layout:
    """Positions for a scene: a layered (Sugiyama-style) layout; time on x for the unrolled graph."""
    return _unrolled_layout(sc) if sc.unrolled else _folded_layout(sc)


def _folded_layout(sc: Scene) -> Layout:
    layer = {n.id: n.layer for n in sc.nodes}
    links = [(i, e.src, e.dst) for i, e in enumerate(sc.edges) if e.kind != "delay"]
    xs = _layered(layer, links)
    out = Layout({n.id: (xs[n.id], float(n.layer)) for n in sc.nodes})
    out.waypoints = _waypoints(links, layer, xs)
    # Backward arrows run in lanes beside the graph, nested: the longest outermost.
    left, right = min(xs.values()), max(xs.values())
    centre = (left + right) / 2
    delays = [(i, e) for i, e in enumerate(sc.edges) if e.kind == "delay"]
    delays.sort(key=lambda ie: abs(layer[ie[1].src] - layer[ie[1].dst]))
    used = {"left": 0, "right": 0}
    for i, e in delays:
        side = "right" if xs[e.src] + xs[e.dst] >= 2 * centre else "left"
        used[side] += 1
        out.lanes[i] = right + 0.35 + 0.3 * used[side] if side == "right" else left - 0.35 - 0.3 * used[side]
    return out


def _unrolled_layout(sc: Scene) -> Layout:
    # One template column, laid out once and repeated for every step.
    layer = {n.group: n.layer for n in sc.nodes if n.step == 0}
    group_of = {n.id: n.group for n in sc.nodes}
    links = [(i, group_of[e.src], group_of[e.dst]) for i, e in enumerate(sc.edges)
             if e.kind == "data" and sc.node(e.dst).step == 0]
    xs = _layered(layer, links)
    lo = min(xs.values()) - NODE_WIDTH / 2
    col_w = max(xs.values()) + NODE_WIDTH / 2 - lo
    xs = {g: x - lo for g, x in xs.items()}  # template x from 0 to col_w
    states = sorted({group_of[e.src] for e in sc.edges if e.kind == "delay"})
    gap = max(0.8, 0.3 * (len(states) + 1))
    inits: dict[int, list[SceneNode]] = {}
    for n in sc.nodes:
        if n.kind == "init":
            inits.setdefault(n.layer, []).append(n)
    init_w = max((len(r) for r in inits.values()), default=0) * NODE_WIDTH
    x0 = init_w + gap if init_w else 0.0

    def column_left(step: int) -> float:
        return x0 + step * (col_w + gap)

    out = Layout({})
    for n in sc.nodes:
        if n.step is not None and n.step >= 0:
            out.pos[n.id] = (column_left(n.step) + xs[n.group], float(n.layer))
    for y, row in inits.items():
        row.sort(key=lambda n: int(n.id.rsplit("@", 1)[1]))
        for i, n in enumerate(row):
            out.pos[n.id] = (init_w - (len(row) - i - 0.5) * NODE_WIDTH, float(y))
    template_waypoints = _waypoints(links, layer, xs)
    for i, e in enumerate(sc.edges):
        dst = sc.node(e.dst)
        if e.kind == "data":
            same = next((j for j, a, b in links if a == group_of[e.src] and b == dst.group), None)
            if same in template_waypoints:
                out.waypoints[i] = [(column_left(dst.step) + x, y) for x, y in template_waypoints[same]]
        elif e.kind == "delay":
            k = states.index(group_of[e.src])
            out.lanes[i] = column_left(dst.step) - gap / 2 + (k - (len(states) - 1) / 2) * (gap / (len(states) + 1))
    # Parameters: one row below everything, spread across the width, each near its users.
    params = [n for n in sc.nodes if n.kind == "param"]
    if params:
        users: dict[str, list[float]] = {n.id: [] for n in params}
        for e in sc.edges:
            if e.kind == "param" and e.dst in out.pos:
                users[e.src].append(out.pos[e.dst][0])
        params.sort(key=lambda n: sum(users[n.id]) / max(len(users[n.id]), 1))
        right = column_left(sc.T) - gap - NODE_WIDTH / 2
        left = NODE_WIDTH / 2
        step = (right - left) / (len(params) - 1) if len(params) > 1 else 0.0
        start = left if len(params) > 1 else (left + right) / 2
        bottom = min(y for _, y in out.pos.values()) - 1.5
        for i, n in enumerate(params):
            out.pos[n.id] = (start + i * step, bottom)
    return out


def _layered(layer: dict[str, int], links: list[tuple[int, str, str]], sweeps: int = 6) -> dict[str, float]:
    """An x for every node and every waypoint, each row ordered to cut crossings.

    A link spanning several layers gets a dummy in each layer between its
    ends; the rows are then ordered by the barycentre heuristic (each item
    moved to the mean x of its neighbours in the row below, then above, a few
    sweeps) and packed, boxes one slot wide, dummies narrower.
    """
    rows: dict[int, list[str]] = {}
    for nid, y in layer.items():
        rows.setdefault(y, []).append(nid)
    below: dict[str, list[str]] = {}
    above: dict[str, list[str]] = {}
    for i, a, b in links:
        chain = [a] + [f"\0{i}:{y}" for y in range(layer[a] + 1, layer[b])] + [b]
        for y, d in zip(range(layer[a] + 1, layer[b]), chain[1:-1]):
            rows.setdefault(y, []).append(d)
        for u, v in zip(chain, chain[1:]):
            below.setdefault(v, []).append(u)
            above.setdefault(u, []).append(v)
    rows = dict(sorted(rows.items()))

    def pack() -> dict[str, float]:
        xs = {}
        for ids in rows.values():
            widths = [DUMMY_WIDTH if d.startswith("\0") else NODE_WIDTH for d in ids]
            x = -sum(widths) / 2
            for d, w in zip(ids, widths):
                xs[d] = x + w / 2
                x += w
        return xs

    for sweep in range(sweeps):
        neighbours, order = (below, list(rows)) if sweep % 2 == 0 else (above, list(rows)[::-1])
        for y in order:
            xs = pack()

            def centre(d: str) -> float:
                near = [xs[m] for m in neighbours.get(d, [])]
                return sum(near) / len(near) if near else xs[d]

            rows[y] = sorted(rows[y], key=lambda d: (centre(d), xs[d]))
    return pack()


def _waypoints(links, layer, xs) -> dict[int, list[tuple[float, float]]]:
    return {
        i: [(xs[f"\0{i}:{y}"], float(y)) for y in range(layer[a] + 1, layer[b])]
        for i, a, b in links
        if layer[b] - layer[a] > 1
    }


# ----------------------------------------------------- matplotlib renderer


@dataclass
class _Geometry:
    """Sizes of the matplotlib picture: one unit is one node slot across and one layer up."""

    inch_x: float  # inches per unit across
    inch_y: float  # inches per layer
    box_w: float  # node box, in units
    box_h: float
    font: float  # points


def _geometry(sc: Scene) -> _Geometry:
    if sc.unrolled:
        return _Geometry(inch_x=0.74, inch_y=0.42, box_w=0.9, box_h=0.56, font=6.5)
    return _Geometry(inch_x=1.1, inch_y=0.72, box_w=0.9, box_h=0.62, font=8)


def _render_matplotlib(sc: Scene, path: Path) -> None:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    lay = layout(sc)
    geo = _geometry(sc)
    xs = [x for x, _ in lay.pos.values()] + list(lay.lanes.values())
    ys = [y for _, y in lay.pos.values()]
    x_lo, x_hi = min(xs) - 0.8, max(xs) + 0.8
    y_lo, y_hi = min(ys) - 0.7, max(ys) + (1.2 if sc.unrolled else 0.7)
    handles = [Patch(facecolor=FILL[k], edgecolor="#444444", label=k)
               for k in ("input", "state", "op", "output", "loss", "param")
               if any(n.kind == k for n in sc.nodes)]
    handles.append(Line2D([], [], color=DELAY_COLOR, linestyle="--", label="delay edge"))
    if sc.unrolled:
        handles.append(Line2D([], [], color=PARAM_COLORS[0], lw=0.8, label="parameter → the copies using it"))
    width_in = max(5.0, (x_hi - x_lo) * geo.inch_x)
    ncol = max(1, min(len(handles), int(width_in / 1.3)))
    legend_in = 0.2 + 0.2 * -(-len(handles) // ncol)
    title_in = 0.45
    height_in = max(2.5, (y_hi - y_lo) * geo.inch_y) + legend_in + title_in
    with matplotlib.rc_context({"svg.fonttype": "none", "font.family": "DejaVu Sans"}):
        fig = Figure(figsize=(width_in, height_in))
        ax = fig.add_axes((0, legend_in / height_in, 1, 1 - (legend_in + title_in) / height_in))
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(y_lo, y_hi)
        ax.axis("off")
        fig.suptitle(sc.title, fontsize=geo.font + 4, y=1 - 0.12 / height_in, va="top")
        if sc.unrolled:
            _draw_columns(ax, sc, lay.pos, geo)
        for n in sc.nodes:
            _draw_node(ax, n, lay.pos[n.id], geo)
        for i, e in enumerate(sc.edges):
            _draw_edge(ax, sc, i, e, lay, geo)
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=geo.font + 0.5,
                   frameon=False, borderaxespad=0.3)
        dpi = min(150.0, 9000.0 / max(width_in, height_in))  # keep big pictures under ~9000 pixels
        fig.savefig(path, dpi=dpi, facecolor="white")


def _draw_columns(ax, sc: Scene, pos, geo: _Geometry) -> None:
    """Light bands behind each step's column, with a 't=…' header."""
    from matplotlib.patches import Rectangle

    columns: dict[int, list[float]] = {}
    for n in sc.nodes:
        if n.step is not None:
            columns.setdefault(n.step, []).append(pos[n.id][0])
    stepped = [pos[n.id][1] for n in sc.nodes if n.step is not None]
    top, bottom = max(stepped) + 0.55, min(stepped) - 0.5
    for step, xs in sorted(columns.items()):
        lo, hi = min(xs) - 0.5, max(xs) + 0.5
        shade = "#fbf3df" if step < 0 else ("#f2f2f2" if step % 2 == 0 else "#e9eef5")
        ax.add_artist(Rectangle((lo, bottom), hi - lo, top - bottom, facecolor=shade, edgecolor="none", zorder=0))
        ax.text((lo + hi) / 2, top + 0.1, "initial" if step < 0 else f"t={step}", ha="center", va="bottom",
                fontsize=geo.font + 2, fontweight="bold", color="#444444")


def _draw_node(ax, n: SceneNode, xy, geo: _Geometry) -> None:
    from matplotlib.patches import FancyBboxPatch

    x, y = xy
    w, h = geo.box_w, geo.box_h
    if n.kind == "param":
        style, edge, lw = "square,pad=0", n.color, 1.4
    else:
        style, edge, lw = "round,pad=0,rounding_size=0.12", "#444444", 0.7
    ax.add_artist(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=style, facecolor=FILL[n.kind],
                                edgecolor=edge, linewidth=lw, linestyle="--" if n.kind == "init" else "-",
                                zorder=3))
    ax.text(x, y, n.short, ha="center", va="center", fontsize=geo.font, zorder=4, linespacing=1.05)


def _clip(a, b, geo: _Geometry) -> tuple[float, float]:
    """Where the segment from box centre ``a`` towards ``b`` leaves the box around ``a``."""
    dx, dy = (b[0] - a[0]) * geo.inch_x, (b[1] - a[1]) * geo.inch_y  # in inches, so boxes stay boxes
    hw, hh = geo.box_w / 2 * geo.inch_x, geo.box_h / 2 * geo.inch_y
    if dx == 0 and dy == 0:
        return a
    t = min(hw / abs(dx) if dx else float("inf"), hh / abs(dy) if dy else float("inf"))
    return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t


def _draw_edge(ax, sc: Scene, i: int, e: SceneEdge, lay: Layout, geo: _Geometry) -> None:
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.path import Path as MplPath

    a, b = lay.pos[e.src], lay.pos[e.dst]
    style = dict(color="#333333", lw=0.7, linestyle="-", zorder=2, mutation_scale=7)
    if e.kind == "delay":
        style.update(color=DELAY_COLOR, lw=0.9, linestyle="--")
    elif e.kind == "param":
        style.update(color=sc.node(e.src).color if sc.unrolled else "#777777")
        if sc.unrolled:
            style.update(lw=0.45, zorder=1, mutation_scale=5, alpha=0.55)
    elif e.kind == "init":
        style.update(color="#777777", linestyle=":")
    label_at = None
    if i in lay.lanes:
        # Up out of the source into the gap above its row, along that gap to the lane, down the lane,
        # along the gap below the reader, up into it: through the gaps, so it crosses no box.
        lane = lay.lanes[i]
        nudge = 0.06 * (i % 3 - 1)  # parallel delay edges do not quite overlap
        ax_, bx = (a[0] + math.copysign(geo.box_w / 4, lane - a[0]), b[0] + math.copysign(geo.box_w / 4, lane - b[0]))
        above, below = a[1] + 0.5 + nudge, b[1] - 0.5 + nudge
        points = [(ax_, a[1] + geo.box_h / 2), (ax_, above), (lane, above), (lane, below), (bx, below),
                  (bx, b[1] - geo.box_h / 2)]
        path = _rounded(points, 0.2, MplPath)
        label_at = (lane, (above + below) / 2)
    else:
        via = lay.waypoints.get(i, [])
        start = _clip(a, via[0] if via else b, geo)
        end = _clip(b, via[-1] if via else a, geo)
        path = _smooth([start, *via, end], MplPath)
    ax.add_artist(FancyArrowPatch(path=path, arrowstyle="-|>", **style))
    if label_at is not None and (not sc.unrolled or e.depth > 1):
        ax.text(*label_at, f"d={e.depth}", color=DELAY_COLOR, fontsize=geo.font, ha="center", va="center",
                zorder=5, bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none"))


def _rounded(points, radius: float, MplPath):
    """A polyline through ``points`` with its corners rounded off (quadratic Béziers)."""
    verts, codes = [points[0]], [MplPath.MOVETO]
    for k in range(1, len(points) - 1):
        p, q, r = points[k - 1], points[k], points[k + 1]
        d_in, d_out = math.dist(p, q), math.dist(q, r)
        if d_in == 0 or d_out == 0:
            continue
        cut = min(radius, d_in / 2, d_out / 2)
        enter = (q[0] + (p[0] - q[0]) * cut / d_in, q[1] + (p[1] - q[1]) * cut / d_in)
        leave = (q[0] + (r[0] - q[0]) * cut / d_out, q[1] + (r[1] - q[1]) * cut / d_out)
        verts += [enter, q, leave]
        codes += [MplPath.LINETO, MplPath.CURVE3, MplPath.CURVE3]
    verts.append(points[-1])
    codes.append(MplPath.LINETO)
    return MplPath(verts, codes)


def _smooth(points, MplPath):
    """A path through ``points``: straight for two, else a Catmull-Rom curve as cubic Béziers."""
    if len(points) == 2:
        return MplPath(points, [MplPath.MOVETO, MplPath.LINETO])
    verts, codes = [points[0]], [MplPath.MOVETO]
    ext = [points[0], *points, points[-1]]
    for k in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[k - 1], ext[k], ext[k + 1], ext[k + 2]
        c1 = (p1[0] + (p2[0] - p0[0]) / 6, p1[1] + (p2[1] - p0[1]) / 6)
        c2 = (p2[0] - (p3[0] - p1[0]) / 6, p2[1] - (p3[1] - p1[1]) / 6)
        verts += [c1, c2, p2]
        codes += [MplPath.CURVE4] * 3
    return MplPath(verts, codes)
