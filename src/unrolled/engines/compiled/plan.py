"""Scheduling a folded graph for the compiled engine.

Which vertices must run step by step (the recurrent core: cycles through
delay edges, and what lies between them), which can run for all steps at
once before the loop (``pre``) or after it (``post``); how a core product
``W · concat(...)`` splits into a loop-free half and a loop half; which core
values the backward pass needs kept for every step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from unrolled.graph.folded import Graph, Param, Vertex
from unrolled.graph.ops import ELEMENTWISE, OPS

# What a structural op's backward rule reads: its operands ("args") and/or its output ("out"); a
# product's operand is kept through its split (see _stored). An elementwise op says it itself
# (ops.Formula.needs); any other op is taken to read both.
_STRUCTURAL_NEEDS = {"matmul": "x", "linear": "x", "slice": "", "concat": "", "softmax": "out",
                     "log_softmax": "out"}


def needs(op: str) -> str:
    """What ``op``'s backward rule reads: "args", "out", both or neither."""
    formula = OPS[op].formula
    return formula.needs if formula is not None else _STRUCTURAL_NEEDS.get(op, "args out")


# ------------------------------------------------------------------ planning


def is_view(v, depth) -> bool:
    """Whether ``v`` is a view of the vertex it slices, kept nowhere of its own: a slice, unless it
    is read through a delay (``depth``: the delayed vertices). A delayed slice keeps a history like
    any delayed vertex, so a step loop writes it each step (a copy of its columns) and, training,
    sends its gradient back to those columns."""
    return isinstance(v, Vertex) and v.kind == "op" and v.op == "slice" and v.name not in depth



@dataclass
class Split:
    """A core product ``W · concat(parts)`` cut into its pre-loop and in-loop halves."""

    W: str
    bias: str | None
    pre: list[tuple[Vertex, int, int]]  # (part, first column, last column + 1)
    core: list[tuple[Vertex, int, int]]

    # made once: a split is fixed once planned, and every run reads its columns
    @functools.cached_property
    def core_cols(self) -> list[int]:
        return [c for _, a, b in self.core for c in range(a, b)]

    @functools.cached_property
    def pre_cols(self) -> list[int]:
        return [c for _, a, b in self.pre for c in range(a, b)]

    @property
    def tokens(self) -> Vertex | None:
        """The index input when the loop-free half is ``W · one_hot(tokens)``: a row pick, not a product."""
        if len(self.pre) == 1:
            part = self.pre[0][0]
            if part.kind == "op" and part.op == "one_hot":
                return part.args[0]
        return None


@dataclass
class Plan:
    """Which vertex runs when, and what the loop must keep."""

    order: list[Vertex]  # every vertex (delays included) in a same-step topological order
    phase: dict[str, str]  # 'pre', 'core' or 'post'
    depth: dict[str, int]  # delayed vertex -> its deepest delay D
    split: dict[str, Split] = field(default_factory=dict)
    stored: set[str] = field(default_factory=set)  # core vertices kept for all steps
    recomputed: list[str] = field(default_factory=list)  # core vertices the backward loop computes again
    wants_grad: set[str] = field(default_factory=set)
    memo: dict = field(default_factory=dict)

    def is_view(self, v) -> bool:
        """Whether ``v`` is a view of the vertex it slices: see :func:`is_view`."""
        return is_view(v, self.depth)

    def viewed(self, v):
        """What view ``v`` views (through nested views) and its column range there, or ``(v, None)``."""
        lo, hi = None, None
        while self.is_view(v):
            s, e = v.attrs["start"], v.attrs["stop"]
            lo, hi = (s, e) if lo is None else (s + lo, s + hi)
            v = v.args[0]
        return v, ((lo, hi) if lo is not None else None)

    def of(self, phase: str) -> list[Vertex]:
        """The vertices of one phase in a same-step order (the loop's order, for the core); cached."""
        key = "of:" + phase
        if key not in self.memo:
            self.memo[key] = [v for v in self.order if self.phase[v.name] == phase]
        return self.memo[key]

    def weighted(self) -> list[Vertex]:
        """The core's ops that read a parameter (the split products among them), in the loop's order:
        those whose weight gradients the backward pass takes after the loop, over a chunk's rows; cached."""
        if "weighted" not in self.memo:
            self.memo["weighted"] = [v for v in self.of("core") if v.kind == "op" and (
                v.name in self.split or any(isinstance(a, Param) for a in v.args))]
        return self.memo["weighted"]

    def batched(self, phase: str) -> list[Vertex]:
        """Cached :meth:`_batched`."""
        key = "batched:" + phase
        if key not in self.memo:
            self.memo[key] = self._batched(phase)
        return self.memo[key]

    def _batched(self, phase: str) -> list[Vertex]:
        """The vertices of a loop-free phase in an order where a delay follows its source.

        Outside the core the whole graph, delay edges included, is acyclic
        (every cycle is in the core), so such an order exists."""
        members = [v for v in self.order if self.phase[v.name] == phase]
        names = {v.name for v in members}
        edges = edges_of(self.order)
        indegree = {v.name: 0 for v in members}
        for src, dsts in edges.items():
            for d in dsts:
                if d in names and src in names:
                    indegree[d] += 1
        by_name = {v.name: v for v in members}
        ready = [v.name for v in members if indegree[v.name] == 0]
        out = []
        while ready:
            n = ready.pop(0)
            out.append(by_name[n])
            for d in edges[n]:
                if d in names:
                    indegree[d] -= 1
                    if indegree[d] == 0:
                        ready.append(d)
        assert len(out) == len(members)
        return out


def plan(graph: Graph) -> Plan:
    graph.check()
    step = graph.step_order()
    order = graph.delays + step
    phase = _phases(graph, order)
    p = Plan(order=order, phase=phase, depth=graph.delayed())
    p.wants_grad = _wants_grad(order)
    for v in p.of("core"):
        if v.op in ("matmul", "linear"):
            p.split[v.name] = _split_product(v, phase)
    p.stored = _stored(graph, p)
    p.recomputed = _recomputed(graph, p)
    p.stored -= set(p.recomputed)
    return p


def edges_of(order: list[Vertex]) -> dict[str, list[str]]:
    """Data-flow edges of the whole folded graph, delay edges (source -> delay vertex) included."""
    out: dict[str, list[str]] = {v.name: [] for v in order}
    for v in order:
        if v.kind == "delay":
            out[v.source.name].append(v.name)
        elif v.kind == "op":
            for a in v.args:
                if isinstance(a, Vertex):
                    out[a.name].append(v.name)
    return out


def phases(graph: Graph) -> dict[str, str]:
    """Each vertex's phase, 'pre', 'core' or 'post' (see :func:`plan`), without the rest of a plan."""
    return _phases(graph, graph.delays + graph.step_order())


def _phases(graph: Graph, order: list[Vertex]) -> dict[str, str]:
    out = edges_of(order)
    inn: dict[str, list[str]] = {v.name: [] for v in order}
    for src, dsts in out.items():
        for d in dsts:
            inn[d].append(src)
    cyclic = _cyclic_vertices(out)
    below = reach(cyclic, out)  # reachable from a cycle
    above = reach(cyclic, inn)  # can reach a cycle
    phase = {}
    for v in order:
        if v.name in below and v.name in above:
            phase[v.name] = "core"
        elif v.name in below:
            phase[v.name] = "post"
        else:
            phase[v.name] = "pre"
    return phase


def reach(start: set[str], edges: dict[str, list[str]]) -> set[str]:
    seen, stack = set(start), list(start)
    while stack:
        for m in edges[stack.pop()]:
            if m not in seen:
                seen.add(m)
                stack.append(m)
    return seen


def _cyclic_vertices(edges: dict[str, list[str]]) -> set[str]:
    """Vertices on some cycle."""
    return set().union(*cyclic_components(edges))


def cyclic_components(edges: dict[str, list[str]]) -> list[set[str]]:
    """The strongly connected components that hold a cycle (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[set[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(edges[w])))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in edges[v]:
                    result.append(set(comp))
    return result


def _wants_grad(order: list[Vertex]) -> set[str]:
    """Vertices whose gradient leads somewhere: a parameter, a dense input or an initial state."""
    wants: set[str] = set()
    for v in order:
        if v.kind in ("input", "delay"):
            wants.add(v.name)
        elif v.kind == "op" and any(isinstance(a, Param) or a.name in wants for a in v.args):
            wants.add(v.name)
    return wants


def _split_product(v: Vertex, phase) -> Split:
    W, x = v.args[0], v.args[1]
    bias = v.args[2].name if v.op == "linear" else None
    parts = x.args if (x.kind == "op" and x.op == "concat") else (x,)
    pre, core, col = [], [], 0
    for part in parts:
        (core if phase[part.name] == "core" else pre).append((part, col, col + part.size))
        col += part.size
    return Split(W.name, bias, pre, core)


def _recomputed(graph: Graph, p: Plan) -> list[str]:
    """Stored elementwise core values that the backward loop computes again at each step, from
    state histories it keeps anyway, instead of keeping them for every step.

    An LSTM's ``tanh(c)`` is one: read back only by the step's own backward
    rules, from ``c``, whose history is kept. Keeping it costs a ``[T, B, F]``
    array, as large as a state's history; computing it again costs one pass
    over ``[B, F]`` a step, beside the step's products. The value is computed
    by the same formula and code as in the forward loop.
    Only values nothing reads for all steps at once qualify: not an output,
    not read after the loop, not a product's operand (its weight gradient
    reads every step's), not an op with a parameter (the same)."""
    outside: set[str] = {o.name for o in graph.outputs}
    for v in p.order:
        if v.kind != "op":
            continue
        if v.name in p.split:
            outside.update(p.viewed(part)[0].name for part, _, _ in p.split[v.name].core)
        if p.phase[v.name] == "post" or any(isinstance(a, Param) for a in v.args):
            outside.update(p.viewed(a)[0].name for a in v.args if isinstance(a, Vertex))

    def from_history(a) -> bool:
        base = p.viewed(a)[0] if isinstance(a, Vertex) else None
        return base is not None and (base.kind == "delay" or base.name in p.depth)

    return [v.name for v in p.of("core")
            if v.name in p.stored and v.name not in outside and v.name not in p.depth
            and v.kind == "op" and v.op in ELEMENTWISE and not p.is_view(v)
            and all(from_history(a) for a in v.args)]


def _stored(graph: Graph, p: Plan) -> set[str]:
    """Core vertices whose value at every step is needed after that step: by the
    backward rules, by the post phase, as outputs, or as another product's operand."""
    need: set[str] = set()
    core = {v.name for v in p.of("core")}

    def mark(v: Vertex):
        v = p.viewed(v)[0]  # a view is kept where what it views is
        if v.kind == "delay":
            return  # histories are always kept
        need.add(v.name)

    for v in p.of("core"):
        if v.kind != "op":
            continue
        if v.name in p.split:
            for part, _, _ in p.split[v.name].core:
                mark(part)
            continue
        reads = needs(v.op)
        has_param = any(isinstance(a, Param) for a in v.args)
        if "args" in reads or has_param:
            for a in v.args:
                if isinstance(a, Vertex):
                    mark(a)
        if "out" in reads or has_param:
            mark(v)
    for v in p.order:
        if p.phase[v.name] == "post" and v.kind == "op":
            for a in v.args:
                if isinstance(a, Vertex) and a.name in core:
                    mark(a)
        if p.phase[v.name] == "post" and v.kind == "delay" and v.source.name in core:
            mark(v.source)
    for v in graph.outputs:
        if v.name in core:
            mark(v)
    return need & core


