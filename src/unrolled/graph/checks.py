"""What makes a folded graph unrollable, and the walks over its same-step edges.

:func:`check` is the rule book behind :meth:`Graph.check`: every state is
defined, every cycle passes through a delay, a given initial state is read,
and every output and loss varies with time. Each error names the vertices at
fault and says what to do, because it is the first thing a user building a
graph reads. The walks (:func:`topological`, :func:`find_cycle`) cut the
delay edges, which read the past and so close no cycle within a step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .nodes import Vertex

if TYPE_CHECKING:
    from .folded import Graph


def check(graph: Graph) -> None:
    """Raise ValueError naming the vertices at fault when ``graph`` cannot be unrolled."""
    for v in graph.vertices.values():
        if v.kind == "pending":
            raise ValueError(
                f"state '{v.name}' is declared but its value is never defined: "
                f"give it one, e.g. g.tanh(a, name='{v.name}')"
            )
    cycle = find_cycle(graph)
    if cycle:
        raise cycle_error(cycle)
    check_given_read(graph)
    varying = time_varying(graph)
    for v in graph.outputs:
        if v.name not in varying:
            raise ValueError(
                f"output '{v.name}' depends on no input and no state: it is the same at every step; "
                f"connect it to an input or a state"
            )
    for loss in graph.losses:
        if loss.prediction.name not in varying:
            raise ValueError(
                f"loss '{loss.name}' depends on no input and no state: its prediction "
                f"'{loss.prediction.name}' is the same at every step; connect it to an input or a state"
            )


def check_given_read(graph: Graph) -> None:
    """An initial value given by the caller is read only by delays: a state no delay reads has no use for one."""
    delayed = graph.delayed()
    for v in graph.vertices.values():
        if v.init == "given" and v.name not in delayed:
            raise ValueError(
                f"state '{v.name}' has init='given' but no delay reads it, so a given initial value would "
                f"never be used: read it through a delay ({v.name}.prev) or drop init='given'"
            )


def find_cycle(graph: Graph) -> list[Vertex] | None:
    """A cycle along same-step edges (delay edges cut), as a list of vertices, or None."""
    color: dict[str, int] = {}
    stack: list[Vertex] = []

    def visit(v: Vertex):
        color[v.name] = 1
        stack.append(v)
        for a in vertex_args(v):
            if color.get(a.name) == 1:
                return stack[stack.index(a):]
            if a.name not in color:
                found = visit(a)
                if found:
                    return found
        color[v.name] = 2
        stack.pop()
        return None

    for v in graph.vertices.values():
        if v.name not in color:
            found = visit(v)
            if found:
                return found
    return None


def cycle_error(cycle: list[Vertex]) -> ValueError:
    """The error for a cycle without a delay, in data-flow order, with a hint when a state is read too early."""
    # The DFS walks from a vertex to its arguments; show data flow instead.
    flow = list(reversed(cycle))
    path = " → ".join(v.name for v in flow + [flow[0]])
    hint = ""
    for reader in flow:
        for a in vertex_args(reader):
            if a in cycle and (a.is_state or a.kind == "pending"):
                hint = f"; did you mean `{a.name}.prev` instead of `{a.name}` in vertex '{reader.name}'?"
                break
        if hint:
            break
    return ValueError(f"cycle {path} has no delay edge: every cycle must pass through a delay{hint}")


def time_varying(graph: Graph) -> set[str]:
    """The vertices whose value can change from step to step: inputs, delays, and what reads them."""
    varying: set[str] = {d.name for d in graph.delays}
    for v in topological(graph):
        if v.kind in ("input", "index") or any(a.name in varying or a.kind == "delay" for a in vertex_args(v)):
            varying.add(v.name)
    return varying


def topological(graph: Graph) -> list[Vertex]:
    """The non-delay vertices, each after its same-step arguments (assumes no cycle)."""
    order: list[Vertex] = []
    seen: set[str] = set()

    def visit(v: Vertex):
        seen.add(v.name)
        for a in vertex_args(v):
            if a.name not in seen:
                visit(a)
        order.append(v)

    for v in graph.vertices.values():
        if v.name not in seen and v.kind != "delay":
            visit(v)
    return [v for v in order if v.kind != "delay"]


def vertex_args(v: Vertex) -> list[Vertex]:
    """The same-step vertex arguments of ``v`` (a delay has none: it reads the past)."""
    if v.kind != "op":
        return []
    return [a for a in v.args if isinstance(a, Vertex)]
