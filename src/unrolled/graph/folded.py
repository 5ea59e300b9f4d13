"""The folded recurrent graph: vertices, parameters, delay edges, losses.

A recurrent network is a directed graph of vector vertices. Most edges carry
a value within one time step; *delay* edges deliver the value a vertex had
``d`` steps earlier, and they are the only edges allowed to close a cycle.

Build one with the methods of :class:`Graph`::

    g = Graph("elman")
    x = g.input("x", 75)
    h = g.state("h", 100)                      # declared now, defined below
    W = g.param("W", (100, 175))
    V = g.param("V", (75, 100))
    a = g.matmul(W, g.concat(x, h.prev), name="a")
    g.tanh(a, name="h")                        # defines the state h
    y = g.output(g.matmul(V, h, name="y"))
    g.loss("cross_entropy", y, g.index_input("target", 75))

``print(g)`` shows one line per vertex; :meth:`Graph.check` rejects what
cannot be unrolled, with the offending vertices named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import initializers
from .buffers import aligned
from .ops import LOSS_KINDS, OPS, ArgSpec

INIT_MODES = ("zeros", "learned", "given")
REDUCTIONS = ("mean", "sum")


@dataclass(eq=False)
class Param:
    """A weight shared by every time step: one array, many copies in the unrolled graph."""

    name: str
    shape: tuple[int, ...]
    init: str  # an initializer spec, see initializers.py

    def __repr__(self) -> str:
        return f"Param({self.name!r}, {list(self.shape)})"


@dataclass(eq=False)
class Vertex:
    """A vector of ``size`` features at every time step.

    ``kind`` is one of: ``input`` (dense per-step data), ``index`` (integer
    per-step data, ``size`` = number of classes), ``op`` (computed by
    ``op`` from ``args``), ``delay`` (``args[0]``'s value ``attrs['depth']``
    steps ago) or ``pending`` (a declared state not yet defined).
    """

    graph: "Graph" = field(repr=False)
    name: str
    size: int
    kind: str
    op: str | None = None
    args: tuple = ()
    attrs: dict = field(default_factory=dict)
    is_state: bool = False  # declared with g.state()
    init: str = "zeros"  # how a delay reads this vertex before step 0

    @property
    def prev(self) -> "Vertex":
        """This vertex's value one step earlier (a delay edge of depth 1)."""
        return self.graph.delay(self, 1)

    def delay(self, depth: int) -> "Vertex":
        """This vertex's value ``depth`` steps earlier."""
        return self.graph.delay(self, depth)

    @property
    def source(self) -> "Vertex":
        """For a delay vertex, the vertex it reads."""
        assert self.kind == "delay"
        return self.args[0]

    @property
    def depth(self) -> int:
        return self.attrs["depth"]

    def __repr__(self) -> str:
        return f"Vertex({self.name!r}, [{self.size}], {self.kind})"


@dataclass(eq=False)
class Loss:
    """A per-step loss: ``kind(prediction, target)`` at every step, masked and reduced."""

    name: str
    vertex: Vertex  # the op vertex computing the per-row loss [B, 1]
    reduce: str  # "mean": divided by the number of unmasked (step, row) pairs; "sum": not

    @property
    def prediction(self) -> Vertex:
        return self.vertex.args[0]


class Graph:
    """A folded recurrent graph; see the module docstring."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.vertices: dict[str, Vertex] = {}
        self.params: dict[str, Param] = {}
        self.outputs: list[Vertex] = []
        self.losses: list[Loss] = []
        self._counter = 0
        self._version = 0  # bumped by every change, so checks and derived facts can be cached
        self._cache: dict = {}

    # ------------------------------------------------------------ leaves

    def input(self, name: str, size: int) -> Vertex:
        """A dense per-step input: fed as ``[T, B, size]``."""
        return self._add(Vertex(self, name, _positive(size, name), "input"))

    def index_input(self, name: str, classes: int) -> Vertex:
        """An integer per-step input (tokens, class targets): fed as ``[T, B]``."""
        return self._add(Vertex(self, name, _positive(classes, name), "index"))

    def param(self, name: str, shape, init: str = "xavier") -> Param:
        """A parameter shared by all time steps, created with a named initializer."""
        shape = tuple(int(s) for s in np.atleast_1d(shape))
        if any(s < 1 for s in shape):
            raise ValueError(f"parameter '{name}' has shape {list(shape)}; every size must be at least 1")
        initializers.check_spec(init, name)
        self._check_new_name(name)
        p = Param(name, shape, init)
        self.params[name] = p
        self._changed()
        return p

    def state(self, name: str, size: int, init: str = "zeros") -> Vertex:
        """Declare a vertex now and define it later, so that earlier vertices can read ``name.prev``.

        ``init`` says what a delay reads before step 0: ``zeros``, a
        ``learned`` parameter vector (named ``<name>.init``), or ``given``
        (the caller must pass it). A caller-supplied initial state always
        overrides the default, which is how state is carried across chunks.
        """
        v = self._add(Vertex(self, name, _positive(size, name), "pending", is_state=True))
        self._set_init(v, init)
        return v

    def set_init(self, vertex: Vertex, init: str) -> None:
        """Choose how delays of ``vertex`` read it before step 0 (see :meth:`state`)."""
        self._set_init(self._vertex(vertex), init)

    def delay(self, source: Vertex, depth: int = 1, *, size: int | None = None, name: str | None = None) -> Vertex:
        """A delay edge: ``source``'s value ``depth`` steps earlier."""
        source = self._vertex(source)
        if not isinstance(depth, (int, np.integer)) or isinstance(depth, bool) or depth < 1:
            raise ValueError(
                f"delay of '{source.name}' by {depth!r} steps: a delay must be a whole number of steps, "
                f"at least 1; use '{source.name}' itself for its current value"
            )
        if source.kind == "delay":  # a delay of a delay is one longer delay
            return self.delay(source.source, source.depth + int(depth), size=size, name=name)
        if size is not None and size != source.size:
            raise ValueError(
                f"delay edge {source.name} -> {name or source.name + '.prev'} joins vertices of different sizes: "
                f"'{source.name}' is [{source.size}] but the delayed vertex is [{size}]; give both the same size"
            )
        for v in self.vertices.values():
            if v.kind == "delay" and v.source is source and v.depth == depth and name in (None, v.name):
                return v
        if name is None:
            name = f"{source.name}_prev" + ("" if depth == 1 else str(depth))
            while name in self.vertices or name in self.params:
                name += "_"
        elif self.vertices.get(name) is not None and self.vertices[name].kind == "pending":
            raise ValueError(
                f"g.delay({source.name}, {depth}, name='{name}') cannot define state '{name}': a state's value "
                f"is defined by an op and its past is read with {name}.prev; for a state that holds "
                f"{source.name} from {depth} step(s) ago write g.identity(g.delay({source.name}, {depth}), "
                f"name='{name}')"
            )
        return self._add(Vertex(self, name, source.size, "delay", "delay", (source,), {"depth": int(depth)}))

    # --------------------------------------------------------------- ops

    def apply(self, op: str, *args, name: str | None = None, **attrs) -> Vertex:
        """Add a vertex computing ``op(*args)``; a name that matches a declared state defines it."""
        if op not in OPS:
            raise ValueError(f"unknown op '{op}'; known ops: {', '.join(sorted(OPS))}")
        spec = OPS[op]
        if spec.arity is not None and len(args) != spec.arity:
            raise TypeError(f"{op} takes {spec.arity} operands, got {len(args)}")
        if not args:
            raise TypeError(f"{op} needs at least one operand")
        args = tuple(self._operand(a, i, spec) for i, a in enumerate(args))
        vname = name or self._auto_name(op)
        try:
            size = spec.shape([_arg_spec(a) for a in args], attrs)
        except ValueError as e:
            raise ValueError(f"vertex '{vname}' = {op}({', '.join(a.name for a in args)}): {e}") from None
        pending = self.vertices.get(vname)
        if pending is not None and pending.kind == "pending":
            return self._define_state(pending, op, args, attrs, size)
        return self._add(Vertex(self, vname, size, "op", op, args, attrs))

    def matmul(self, W: Param, x: Vertex, name=None) -> Vertex:
        return self.apply("matmul", W, x, name=name)

    def linear(self, W: Param, x: Vertex, b: Param, name=None) -> Vertex:
        return self.apply("linear", W, x, b, name=name)

    def add(self, a, b, name=None) -> Vertex:
        return self.apply("add", a, b, name=name)

    def sub(self, a, b, name=None) -> Vertex:
        return self.apply("sub", a, b, name=name)

    def mul(self, a, b, name=None) -> Vertex:
        return self.apply("mul", a, b, name=name)

    def scale(self, x, c: float, name=None) -> Vertex:
        return self.apply("scale", x, name=name, c=float(c))

    def one_minus(self, x, name=None) -> Vertex:
        return self.apply("one_minus", x, name=name)

    def concat(self, *xs, name=None) -> Vertex:
        return self.apply("concat", *xs, name=name)

    def slice(self, x, start: int, stop: int, name=None) -> Vertex:
        return self.apply("slice", x, name=name, start=int(start), stop=int(stop))

    def split(self, x, parts, names=None) -> list[Vertex]:
        """Cut ``x`` into consecutive slices: ``parts`` is a count of equal parts or a list of sizes."""
        x = self._vertex(x)
        if isinstance(parts, int):
            if parts < 1 or x.size % parts:
                raise ValueError(f"cannot split '{x.name}' of size {x.size} into {parts} equal parts")
            parts = [x.size // parts] * parts
        if sum(parts) != x.size:
            raise ValueError(f"split sizes {list(parts)} add up to {sum(parts)}, but '{x.name}' has size {x.size}")
        names = names or [None] * len(parts)
        out, start = [], 0
        for n, nm in zip(parts, names):
            out.append(self.slice(x, start, start + n, name=nm))
            start += n
        return out

    def tanh(self, x, name=None) -> Vertex:
        return self.apply("tanh", x, name=name)

    def sigmoid(self, x, name=None) -> Vertex:
        return self.apply("sigmoid", x, name=name)

    def relu(self, x, name=None) -> Vertex:
        return self.apply("relu", x, name=name)

    def identity(self, x, name=None) -> Vertex:
        return self.apply("identity", x, name=name)

    def softplus(self, x, name=None) -> Vertex:
        return self.apply("softplus", x, name=name)

    def exp(self, x, name=None) -> Vertex:
        return self.apply("exp", x, name=name)

    def softmax(self, x, name=None) -> Vertex:
        return self.apply("softmax", x, name=name)

    def log_softmax(self, x, name=None) -> Vertex:
        return self.apply("log_softmax", x, name=name)

    def embedding(self, E: Param, idx: Vertex, name=None) -> Vertex:
        return self.apply("embedding", E, idx, name=name)

    def one_hot(self, idx: Vertex, name=None) -> Vertex:
        idx = self._vertex(idx)
        return self.apply("one_hot", idx, name=name, n=idx.size)

    # ------------------------------------------------- outputs and losses

    def output(self, v: Vertex) -> Vertex:
        """Mark ``v`` as an output: the engines return its value at every step."""
        v = self._vertex(v)
        if v not in self.outputs:
            self.outputs.append(v)
            self._changed()
        return v

    def loss(self, kind: str, prediction, target, *, name: str | None = None, reduce: str = "mean") -> Loss:
        """Attach a per-step loss ``kind(prediction, target)``; a mask may switch steps or rows off at run time.

        The total loss is the sum over losses of
        ``sum_{t,b} mask[t,b] * loss[t,b]``, divided by ``sum mask`` when
        ``reduce="mean"``.
        """
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss '{kind}'; known losses: {', '.join(LOSS_KINDS)}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"loss reduce={reduce!r}; use 'mean' or 'sum'")
        v = self.apply(kind, prediction, target, name=name or self._auto_name("loss"))
        loss = Loss(v.name, v, reduce)
        self.losses.append(loss)
        self._changed()
        return loss

    # ----------------------------------------------------------- queries

    @property
    def inputs(self) -> list[Vertex]:
        if "inputs" not in self._cache:  # asked for on every run
            self._cache["inputs"] = [v for v in self.vertices.values() if v.kind in ("input", "index")]
        return list(self._cache["inputs"])

    @property
    def delays(self) -> list[Vertex]:
        return [v for v in self.vertices.values() if v.kind == "delay"]

    def delayed(self) -> dict[str, int]:
        """Each vertex read through a delay, with its deepest delay: how much history it keeps."""
        if "delayed" not in self._cache:
            depth: dict[str, int] = {}
            for d in self.delays:
                depth[d.source.name] = max(depth.get(d.source.name, 0), d.depth)
            self._cache["delayed"] = depth
        return dict(self._cache["delayed"])

    @property
    def version(self) -> int:
        """A count of the changes made to the graph: an engine notes it when made, to refuse a later graph."""
        return self._version

    def init_param_name(self, vertex_name: str) -> str:
        return f"{vertex_name}.init"

    def step_order(self) -> list[Vertex]:
        """The non-delay vertices in an order that computes one time step (inputs first)."""
        self.check()
        if "step_order" not in self._cache:
            self._cache["step_order"] = self._topological()
        return list(self._cache["step_order"])

    def unroll(self, T: int):
        """The explicit acyclic graph over ``T`` steps (see unroll.py)."""
        from .unroll import unroll

        return unroll(self, T)

    def init_params(self, rng: np.random.Generator | int | None = 0, dtype=np.float64) -> dict[str, np.ndarray]:
        """Fresh parameter values, one array per parameter, from each one's named initializer; each
        starts on a cache line (see buffers.py: the products read them faster so)."""
        rng = np.random.default_rng(rng)
        return {p.name: aligned(initializers.make(p.init, p.shape, rng, dtype)) for p in self.params.values()}

    # -------------------------------------------------------- validation

    def check(self) -> "Graph":
        """Reject a graph that cannot be unrolled, naming the vertices at fault; return the graph."""
        if self._cache.get("checked"):
            return self
        for v in self.vertices.values():
            if v.kind == "pending":
                raise ValueError(
                    f"state '{v.name}' is declared but its value is never defined: "
                    f"give it one, e.g. g.tanh(a, name='{v.name}')"
                )
        cycle = self._find_cycle()
        if cycle:
            self._raise_cycle(cycle)
        self._check_given_read()
        varying = self._time_varying()
        for v in self.outputs:
            if v.name not in varying:
                raise ValueError(
                    f"output '{v.name}' depends on no input and no state: it is the same at every step; "
                    f"connect it to an input or a state"
                )
        for loss in self.losses:
            if loss.prediction.name not in varying:
                raise ValueError(
                    f"loss '{loss.name}' depends on no input and no state: its prediction "
                    f"'{loss.prediction.name}' is the same at every step; connect it to an input or a state"
                )
        self._cache["checked"] = True
        return self

    def _check_given_read(self) -> None:
        """An initial value given by the caller is read only by delays: a state no delay reads has no use for one."""
        delayed = self.delayed()
        for v in self.vertices.values():
            if v.init == "given" and v.name not in delayed:
                raise ValueError(
                    f"state '{v.name}' has init='given' but no delay reads it, so a given initial value would "
                    f"never be used: read it through a delay ({v.name}.prev) or drop init='given'"
                )

    def _find_cycle(self) -> list[Vertex] | None:
        """A cycle along same-step edges (delay edges cut), as a list of vertices, or None."""
        color: dict[str, int] = {}
        stack: list[Vertex] = []

        def visit(v: Vertex):
            color[v.name] = 1
            stack.append(v)
            for a in _vertex_args(v):
                if color.get(a.name) == 1:
                    return stack[stack.index(a):]
                if a.name not in color:
                    found = visit(a)
                    if found:
                        return found
            color[v.name] = 2
            stack.pop()
            return None

        for v in self.vertices.values():
            if v.name not in color:
                found = visit(v)
                if found:
                    return found
        return None

    def _raise_cycle(self, cycle: list[Vertex]) -> None:
        # The DFS walks from a vertex to its arguments; show data flow instead.
        flow = list(reversed(cycle))
        path = " → ".join(v.name for v in flow + [flow[0]])
        hint = ""
        for reader in flow:
            for a in _vertex_args(reader):
                if a in cycle and (a.is_state or a.kind == "pending"):
                    hint = f"; did you mean `{a.name}.prev` instead of `{a.name}` in vertex '{reader.name}'?"
                    break
            if hint:
                break
        raise ValueError(f"cycle {path} has no delay edge: every cycle must pass through a delay{hint}")

    def _time_varying(self) -> set[str]:
        varying: set[str] = {d.name for d in self.delays}
        for v in self._topological():
            if v.kind in ("input", "index") or any(a.name in varying or a.kind == "delay" for a in _vertex_args(v)):
                varying.add(v.name)
        return varying

    def _topological(self) -> list[Vertex]:
        order: list[Vertex] = []
        seen: set[str] = set()

        def visit(v: Vertex):
            seen.add(v.name)
            for a in _vertex_args(v):
                if a.name not in seen:
                    visit(a)
            order.append(v)

        for v in self.vertices.values():
            if v.name not in seen and v.kind != "delay":
                visit(v)
        return [v for v in order if v.kind != "delay"]

    # ------------------------------------------------------------- text

    def __str__(self) -> str:
        lines = [f"graph {self.name}"]
        for p in self.params.values():
            lines.append(f"  {p.name} : param {list(p.shape)} init={p.init}")
        try:
            order = self.delays + self._topological()
        except RecursionError:  # pragma: no cover - absurdly deep graphs
            order = list(self.vertices.values())
        if any(v.kind == "pending" for v in self.vertices.values()) or self._find_cycle():
            order = list(self.vertices.values())  # printing must work on a broken graph too
        outputs = {v.name for v in self.outputs}
        losses = {l.name: l for l in self.losses}
        for v in order:
            line = f"  {v.name} : [{v.size}] = {_expression(v)}"
            if v.is_state:
                line += "  # state"
            if v.name in outputs:
                line += "  -> output"
            if v.name in losses:
                line += f"  -> loss ({losses[v.name].reduce})"
            lines.append(line)
        return "\n".join(lines)

    __repr__ = __str__

    # ---------------------------------------------------------- helpers

    def _add(self, v: Vertex) -> Vertex:
        self._check_new_name(v.name)
        self.vertices[v.name] = v
        self._changed()
        return v

    def _changed(self) -> None:
        self._version += 1
        self._cache.clear()

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a vertex or parameter name must be a non-empty string, got {name!r}")
        if name in self.vertices or name in self.params:
            what = "parameter" if name in self.params else "vertex"
            raise ValueError(f"duplicate name '{name}': a {what} of that name already exists; choose another name")

    def _auto_name(self, op: str) -> str:
        while True:
            self._counter += 1
            name = f"{op}{self._counter}"
            if name not in self.vertices and name not in self.params:
                return name

    def _vertex(self, v) -> Vertex:
        if isinstance(v, str):
            if v not in self.vertices:
                raise ValueError(f"no vertex named '{v}' in graph '{self.name}'")
            v = self.vertices[v]
        if not isinstance(v, Vertex) or v.graph is not self:
            raise TypeError(f"{v!r} is not a vertex of graph '{self.name}'")
        return v

    def _operand(self, a, position: int, spec):
        if isinstance(a, Param):
            if self.params.get(a.name) is not a:
                raise TypeError(f"parameter {a.name!r} belongs to another graph")
            if position not in spec.params_allowed:
                raise ValueError(f"{spec.name} cannot take parameter '{a.name}' as operand {position + 1}")
            return a
        if isinstance(a, str) and a in self.params:
            return self._operand(self.params[a], position, spec)
        v = self._vertex(a)
        if v.kind == "index" and position not in spec.index_allowed:
            raise ValueError(
                f"{spec.name} cannot read index input '{v.name}' directly; "
                f"convert it with g.one_hot('{v.name}') or g.embedding(E, '{v.name}')"
            )
        return v

    def _set_init(self, v: Vertex, init: str) -> None:
        if init not in INIT_MODES:
            raise ValueError(f"initial state init={init!r} for '{v.name}'; use one of {', '.join(INIT_MODES)}")
        v.init = init
        self._changed()
        pname = self.init_param_name(v.name)
        if init == "learned" and pname not in self.params:
            self.param(pname, (v.size,), init="zeros")
        elif init != "learned" and pname in self.params:
            del self.params[pname]
            self._changed()

    def _define_state(self, v: Vertex, op: str, args, attrs, size: int) -> Vertex:
        if size != v.size:
            readers = [d.name for d in self.delays if d.source is v]
            raise ValueError(
                f"delay edge {v.name} -> {readers[0] if readers else v.name + '.prev'} joins vertices of "
                f"different sizes: state '{v.name}' is declared [{v.size}] but its value "
                f"{op}({', '.join(a.name for a in args)}) is [{size}]; make the sizes equal"
            )
        v.kind, v.op, v.args, v.attrs = "op", op, args, attrs
        self._changed()
        del self.vertices[v.name]  # list it where it is defined, so printing follows the equations
        self.vertices[v.name] = v
        return v


def _vertex_args(v: Vertex) -> list[Vertex]:
    """The same-step vertex arguments of ``v`` (a delay has none: it reads the past)."""
    if v.kind != "op":
        return []
    return [a for a in v.args if isinstance(a, Vertex)]


def _arg_spec(a) -> ArgSpec:
    if isinstance(a, Param):
        return ArgSpec(a.name, a.shape, is_param=True)
    return ArgSpec(a.name, (a.size,), is_index=a.kind == "index")


def _expression(v: Vertex) -> str:
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


def _positive(size, name: str) -> int:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"vertex '{name}' has size {size!r}; a size must be a whole number of at least 1")
    return int(size)
