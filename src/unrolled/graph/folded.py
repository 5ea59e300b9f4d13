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

``print(g)`` shows one line per vertex (text.py); :meth:`Graph.check` rejects
what cannot be unrolled, with the offending vertices named (checks.py). The
vertices, parameters and losses themselves are plain data (nodes.py).
"""

from __future__ import annotations

import numpy as np

from . import checks, initializers
from .buffers import aligned
from .nodes import Loss, Param, Vertex
from .ops import LOSS_KINDS, OPS, ArgSpec
from .text import graph_text

__all__ = ["Graph", "Loss", "Param", "Vertex"]

INIT_MODES = ("zeros", "learned", "given")
REDUCTIONS = ("mean", "sum")


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
            self._cache["step_order"] = checks.topological(self)
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
        """Reject a graph that cannot be unrolled, naming the vertices at fault; return the graph.

        The rules and their messages are in checks.py; the verdict is cached until the graph changes.
        """
        if self._cache.get("checked"):
            return self
        checks.check(self)
        self._cache["checked"] = True
        return self

    # ------------------------------------------------------------- text

    def __str__(self) -> str:
        return graph_text(self)

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


def _arg_spec(a) -> ArgSpec:
    if isinstance(a, Param):
        return ArgSpec(a.name, a.shape, is_param=True)
    return ArgSpec(a.name, (a.size,), is_index=a.kind == "index")


def _positive(size, name: str) -> int:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"vertex '{name}' has size {size!r}; a size must be a whole number of at least 1")
    return int(size)
