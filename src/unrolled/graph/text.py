"""The text form of a folded graph: ``print(graph)``, one line per vertex.

Printing is the first debugging tool, so it must work on a broken graph too
(a state never defined, a cycle without a delay): then the vertices are
listed in the order they were added instead of the order of a step.

    graph elman
      W : param [100, 175] init=xavier
      h_prev : [100] = delay(h, 1, init=zeros)
      x : [75] = input
      concat1 : [175] = concat(x, h_prev)
      a : [100] = matmul(W, concat1)
      h : [100] = tanh(a)  # state
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .checks import find_cycle, topological
from .nodes import Vertex

if TYPE_CHECKING:
    from .folded import Graph


def graph_text(graph: Graph) -> str:
    """The lines of ``print(graph)``: parameters, then delays, then one step's vertices in order."""
    lines = [f"graph {graph.name}"]
    for p in graph.params.values():
        lines.append(f"  {p.name} : param {list(p.shape)} init={p.init}")
    try:
        order = graph.delays + topological(graph)
    except RecursionError:  # pragma: no cover - absurdly deep graphs
        order = list(graph.vertices.values())
    if any(v.kind == "pending" for v in graph.vertices.values()) or find_cycle(graph):
        order = list(graph.vertices.values())  # printing must work on a broken graph too
    outputs = {v.name for v in graph.outputs}
    losses = {l.name: l for l in graph.losses}
    for v in order:
        line = f"  {v.name} : [{v.size}] = {expression(v)}"
        if v.is_state:
            line += "  # state"
        if v.name in outputs:
            line += "  -> output"
        if v.name in losses:
            line += f"  -> loss ({losses[v.name].reduce})"
        lines.append(line)
    return "\n".join(lines)


def expression(v: Vertex) -> str:
    """The right-hand side of a vertex's line, e.g. ``tanh(a)`` or ``delay(h, 1, init=zeros)``."""
    if v.kind == "input":
        return "input"
    if v.kind == "index":
        return "index_input"
    if v.kind == "pending":
        return "<state, not yet defined>"
    if v.kind == "delay":
        return f"delay({v.source.name}, {v.depth}, init={v.source.init})"
    parts = [a.name for a in v.args]
    parts += [f"{k}={val}" for k, val in v.attrs.items() if k != "n"]
    return f"{v.op}({', '.join(parts)})"
