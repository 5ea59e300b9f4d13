"""Unrolling: a folded recurrent graph and a length T become an explicit DAG.

Every non-delay vertex ``v`` is copied once per step as the node ``(v, t)``.
A delay edge of depth ``d`` from ``h`` to a reader becomes an edge from
``(h, t-d)`` to the reader's node at ``t``, or from the initial-state node
``(h, t-d)`` (negative time) when ``t-d < 0``. Parameters are *not* copied:
each is one node ``(W, None)`` with an edge to every copy that uses it.

Evaluating the unrolled graph node by node is exactly this plain loop over
the folded graph (``tests/test_unroll.py`` checks it)::

    history = {h: [init(h, -D_h), ..., init(h, -1)] for each delayed h}
    for t in range(T):
        for v in graph.step_order():          # inputs first, delays skipped
            args = [params[a]          if a is a parameter
                    else history[a.source][t - a.depth]   if a is a delay
                    else value[a]      for a in v.args]
            value[v] = inputs[v][t] if v is an input else op(v)(*args)
        for h in history: history[h].append(value[h])
"""

from __future__ import annotations

from dataclasses import dataclass

from .folded import Graph, Param


@dataclass(frozen=True)
class Node:
    """One node of the unrolled graph: vertex ``name`` at step ``t``.

    ``t`` is ``None`` for a parameter (shared by all steps) and negative for
    an initial-state node (``-1`` is the value "just before step 0").
    """

    name: str
    t: int | None

    def __str__(self) -> str:
        return self.name if self.t is None else f"{self.name}@{self.t}"


class UnrolledGraph:
    """The explicit DAG of a folded graph over ``T`` steps; see the module docstring.

    Attributes: ``nodes`` (in a topological order), ``edges`` (``(src, dst)``
    pairs, one per operand, so repeated operands give parallel edges),
    ``args[node]`` (the operand nodes of an op node, in operand order),
    ``kind[node]`` (``param``, ``init``, ``input`` or ``op``).
    """

    def __init__(self, graph: Graph, T: int):
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"cannot unroll over T={T!r} steps; T must be a whole number of at least 1")
        self.graph = graph.check()
        self.T = T
        self.nodes: list[Node] = []
        self.edges: list[tuple[Node, Node]] = []
        self.args: dict[Node, list[Node]] = {}
        self.kind: dict[Node, str] = {}
        self.vertex = {}  # node -> the folded vertex or parameter it copies
        self._build()

    def _add(self, node: Node, kind: str, of, args: list[Node] = ()) -> None:
        self.nodes.append(node)
        self.kind[node] = kind
        self.vertex[node] = of
        self.args[node] = list(args)
        self.edges.extend((a, node) for a in args)

    def _build(self) -> None:
        g = self.graph
        for p in g.params.values():
            self._add(Node(p.name, None), "param", p)
        for name, depth in g.delayed().items():
            v = g.vertices[name]
            init_param = [Node(g.init_param_name(name), None)] if v.init == "learned" else []
            for t in range(-depth, 0):
                self._add(Node(name, t), "init", v, init_param)
        order = g.step_order()
        for t in range(self.T):
            for v in order:
                if v.kind in ("input", "index"):
                    self._add(Node(v.name, t), "input", v)
                    continue
                args = []
                for a in v.args:
                    if isinstance(a, Param):
                        args.append(Node(a.name, None))
                    elif a.kind == "delay":
                        args.append(Node(a.source.name, t - a.depth))
                    else:
                        args.append(Node(a.name, t))
                self._add(Node(v.name, t), "op", v, args)

    # ------------------------------------------------------------ queries

    def params_of(self) -> dict[str, list[Node]]:
        """For each parameter, the nodes that read it: its copies' users."""
        users: dict[str, list[Node]] = {p: [] for p in self.graph.params}
        for src, dst in self.edges:
            if self.kind[src] == "param":
                users[src.name].append(dst)
        return users

    def topological_order(self) -> list[Node]:
        """A topological order computed from the edges alone (Kahn's algorithm)."""
        indegree = {n: 0 for n in self.nodes}
        out: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for src, dst in self.edges:
            indegree[dst] += 1
            out[src].append(dst)
        ready = [n for n in self.nodes if indegree[n] == 0]
        order = []
        while ready:
            n = ready.pop()
            order.append(n)
            for m in out[n]:
                indegree[m] -= 1
                if indegree[m] == 0:
                    ready.append(m)
        assert len(order) == len(self.nodes), "unrolled graph has a cycle"  # check() forbids it
        return order

    def __str__(self) -> str:
        lines = [f"unrolled {self.graph.name} over T={self.T}: {len(self.nodes)} nodes, {len(self.edges)} edges"]
        for n in self.nodes:
            kind = self.kind[n]
            if kind == "param":
                lines.append(f"  {n} : param {list(self.vertex[n].shape)} (shared by all steps)")
            elif kind == "init":
                src = f" <- {self.args[n][0]}" if self.args[n] else ""
                lines.append(f"  {n} : [{self.vertex[n].size}] initial state ({self.vertex[n].init}){src}")
            elif kind == "input":
                lines.append(f"  {n} : [{self.vertex[n].size}] input")
            else:
                v = self.vertex[n]
                lines.append(f"  {n} : [{v.size}] = {v.op}({', '.join(str(a) for a in self.args[n])})")
        return "\n".join(lines)

    __repr__ = __str__


def unroll(graph: Graph, T: int) -> UnrolledGraph:
    """The explicit acyclic graph of ``graph`` over ``T`` steps, parameters shared."""
    return UnrolledGraph(graph, T)
