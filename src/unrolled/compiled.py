"""The compiled engine: BPTT computed from the folded graph, fast.

It never builds the unrolled graph. Instead it schedules the folded one:

* **Partition.** Cycles of the folded graph (through delay edges) form the
  *recurrent core*, together with everything on a path from one cycle to
  another: only the core must run step by step. Vertices that need no core
  value (``pre``) are computed once for all steps as ``[T*B, F]`` arrays
  before the loop; vertices that read the core but never feed it (``post``:
  readouts, losses) once after it. The op table's rules work on any number
  of rows, so the batched phases use them as they are.
* **Split products.** A core ``W · concat(x, h_prev)`` is
  ``W[:, x] · x + W[:, h] · h_prev``; the ``x`` half is one big product in the
  ``pre`` phase, only the ``h`` half stays in the loop.
* **Batched weight gradients.** The backward loop carries only gradients
  with respect to core values; it stores the gradient of every core product
  for all steps, and each weight gradient is then one product over all
  ``T*B`` rows after the loop.
* **Generated code.** The two loops are emitted as straight Python over
  NumPy with preallocated buffers and ``out=`` arguments; read them in
  ``engine.code`` (they are registered with ``linecache``, so tracebacks
  show their lines).

It returns exactly what the reference engine returns (``RunResult``), and
the tests hold the two to 1e-10 in float64 on random cyclic graphs.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from .graph import Graph, Param, Vertex
from .ops import OPS, unbroadcast
from . import fuse
from .fuse import sliced as _sliced
from .runio import Feeds, RunResult, as_state, check_combine, prepare

# Ops the loop emits as in-place NumPy calls; any other op in the core runs
# through the op table (correct, just slower).
_INLINE = {"matmul", "linear", "add", "sub", "mul", "scale", "one_minus", "tanh", "sigmoid", "relu",
           "identity", "slice", "concat"}
# What each op's backward rule reads: its operands ("args") and/or its output ("out").
_NEEDS = {"matmul": "x", "linear": "x", "add": "", "sub": "", "mul": "args", "scale": "", "one_minus": "",
          "tanh": "out", "sigmoid": "out", "relu": "args", "identity": "", "slice": "", "concat": "",
          "softmax": "out", "log_softmax": "out"}


# ------------------------------------------------------------------ planning


@dataclass
class _Split:
    """A core product ``W · concat(parts)`` cut into its pre-loop and in-loop halves."""

    W: str
    bias: str | None
    pre: list[tuple[Vertex, int, int]]  # (part, first column, last column + 1)
    core: list[tuple[Vertex, int, int]]

    @property
    def core_cols(self) -> list[int]:
        return [c for _, a, b in self.core for c in range(a, b)]

    @property
    def pre_cols(self) -> list[int]:
        return [c for _, a, b in self.pre for c in range(a, b)]


@dataclass
class Plan:
    """Which vertex runs when, and what the loop must keep."""

    order: list[Vertex]  # every vertex (delays included) in a same-step topological order
    phase: dict[str, str]  # 'pre', 'core' or 'post'
    depth: dict[str, int]  # delayed vertex -> its deepest delay D
    split: dict[str, _Split] = field(default_factory=dict)
    stored: set[str] = field(default_factory=set)  # core vertices kept for all steps
    wants_grad: set[str] = field(default_factory=set)
    memo: dict = field(default_factory=dict)

    def of(self, phase: str) -> list[Vertex]:
        """The vertices of one phase in a same-step order (the loop's order, for the core)."""
        return [v for v in self.order if self.phase[v.name] == phase]

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
        edges = _edges(self.order)
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
    return p


def _edges(order: list[Vertex]) -> dict[str, list[str]]:
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


def _phases(graph: Graph, order: list[Vertex]) -> dict[str, str]:
    out = _edges(order)
    inn: dict[str, list[str]] = {v.name: [] for v in order}
    for src, dsts in out.items():
        for d in dsts:
            inn[d].append(src)
    cyclic = _cyclic_vertices(out)
    below = _reach(cyclic, out)  # reachable from a cycle
    above = _reach(cyclic, inn)  # can reach a cycle
    phase = {}
    for v in order:
        if v.name in below and v.name in above:
            phase[v.name] = "core"
        elif v.name in below:
            phase[v.name] = "post"
        else:
            phase[v.name] = "pre"
    return phase


def _reach(start: set[str], edges: dict[str, list[str]]) -> set[str]:
    seen, stack = set(start), list(start)
    while stack:
        for m in edges[stack.pop()]:
            if m not in seen:
                seen.add(m)
                stack.append(m)
    return seen


def _cyclic_vertices(edges: dict[str, list[str]]) -> set[str]:
    """Vertices on some cycle (Tarjan's strongly connected components, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: set[str] = set()
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
                    result.update(comp)
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


def _split_product(v: Vertex, phase) -> _Split:
    W, x = v.args[0], v.args[1]
    bias = v.args[2].name if v.op == "linear" else None
    parts = x.args if (x.kind == "op" and x.op == "concat") else (x,)
    pre, core, col = [], [], 0
    for part in parts:
        (core if phase[part.name] == "core" else pre).append((part, col, col + part.size))
        col += part.size
    return _Split(W.name, bias, pre, core)


def _stored(graph: Graph, p: Plan) -> set[str]:
    """Core vertices whose value at every step is needed after that step: by the
    backward rules, by the post phase, as outputs, or as another product's operand."""
    need: set[str] = set()
    core = {v.name for v in p.of("core")}

    def mark(v: Vertex):
        while v.kind == "op" and v.op == "slice":  # a slice is a view: keep what it views
            v = v.args[0]
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
        needs = _NEEDS.get(v.op, "args out")
        has_param = any(isinstance(a, Param) for a in v.args)
        if "args" in needs or has_param:
            for a in v.args:
                if isinstance(a, Vertex):
                    mark(a)
        if "out" in needs or has_param:
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


# ------------------------------------------------------------ code writing


class _Code:
    def __init__(self):
        self.lines: list[str] = []
        self.indent = 0

    def __call__(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class _Writer:
    """Emits the forward and backward step loops for a plan."""

    def __init__(self, graph: Graph, p: Plan, jit: bool = False, fused: bool = False):
        self.g, self.p, self.jit = graph, p, jit
        self.fuse = fused and not jit
        self.kernels = fuse.KernelText()
        self.core = p.of("core")
        self.names: dict[str, str] = {}
        for i, v in enumerate(p.order):
            self.names[v.name] = f"v{i}"
        self.pnames = {name: f"p{i}" for i, name in enumerate(graph.params)}
        # concatenations read only by split products are never built: the products read their parts
        readers: dict[str, list[Vertex]] = {}
        for u in p.order:
            if u.kind == "op":
                for a in u.args:
                    if isinstance(a, Vertex):
                        readers.setdefault(a.name, []).append(u)
        self.skip = {v.name for v in self.core if v.kind == "op" and v.op == "concat"
                     and v.name not in {o.name for o in graph.outputs}
                     and all(r.name in p.split for r in readers.get(v.name, []))}

    # ---- where values live

    def val(self, v: Vertex, t: str = "t") -> str:
        """The expression of ``v``'s value at step ``t`` inside the loop."""
        n, ph = self.names[v.name], self.p.phase[v.name]
        if isinstance(v, Param):
            return f"P_{self.pnames[v.name]}"
        if v.kind == "delay":
            if ph == "core":
                src, D = v.source, self.p.depth[v.source.name]
                return f"H_{self.names[src.name]}[{t}+{D - v.depth}]"
            return f"X_{n}[{t}]"  # a pre delay (a shifted input), computed before the loop
        if ph != "core":
            return f"X_{n}[{t}]"
        if v.kind == "op" and v.op == "slice":
            return f"{self.val(v.args[0], t)}[:, {v.attrs['start']}:{v.attrs['stop']}]"
        if v.name in self.p.depth:
            return f"H_{n}[{t}+{self.p.depth[v.name]}]"
        if v.name in self.p.stored:
            return f"V_{n}[{t}]"
        return f"S_{n}"

    def arg(self, a) -> str:
        return f"P_{self.pnames[a.name]}" if isinstance(a, Param) else self.val(a)

    # ---- forward

    def forward(self) -> str:
        c = _Code()
        c("def forward_loop(T, B, buf, P):")
        c.indent = 1
        c("for t in range(T):")
        c.indent = 2
        for item in self._body():
            if isinstance(item, fuse.Region):
                fuse.emit_forward(self, item, self.kernels, c)
                continue
            v = item
            c(f"# {v.name} = {v.op}({', '.join(a.name for a in v.args)})")
            self._emit_forward(c, v)
        if not self.core:
            c("pass")
        return c.text()

    def _emit_forward(self, c: _Code, v: Vertex) -> None:
        dst, a = self.val(v), [self.arg(x) for x in v.args]
        op = v.op
        if op in ("matmul", "linear"):
            s = self.p.split[v.name]
            n = self.names[v.name]
            xs = [self.val(part) for part, _, _ in s.core]
            x = xs[0] if len(xs) == 1 else f"C_{n}"
            if len(xs) > 1:
                self._concat(c, xs, [part.size for part, _, _ in s.core], x)
            c(f"matmul({x}, WT_{n}, out={dst})")
            if s.pre:
                c(f"add({dst}, Y_{n}[t], out={dst})")
            elif s.bias:
                c(f"add({dst}, P_{self.pnames[s.bias]}, out={dst})")
        elif op in ("add", "sub", "mul"):
            fn = {"add": "add", "sub": "subtract", "mul": "multiply"}[op]
            c(f"{fn}({a[0]}, {a[1]}, out={dst})")
        elif op == "scale":
            c(f"multiply({a[0]}, {v.attrs['c']!r}, out={dst})")
        elif op == "one_minus":
            c(f"subtract(1, {a[0]}, out={dst})")
        elif op == "tanh":
            c(f"tanh({a[0]}, out={dst})")
        elif op == "sigmoid" and self.jit:
            c(f"sigmoid({a[0]}, out={dst})")
        elif op == "sigmoid":
            c(f"negative({a[0]}, out={dst}); exp({dst}, out={dst}); add({dst}, 1, out={dst}); "
              f"reciprocal({dst}, out={dst})")
        elif op == "relu":
            c(f"maximum({a[0]}, 0, out={dst})")
        elif op == "identity":
            c(f"copyto({dst}, {a[0]})")
        elif op == "concat":
            self._concat(c, a, [x.size for x in v.args], dst)
        else:
            c(f"{dst}[...] = F_{self.names[v.name]}([{', '.join(a)}])")

    # ---- backward

    def backward(self) -> str:
        c = _Code()
        c("def backward_loop(T, B, buf, P):")
        c.indent = 1
        c("for t in range(T - 1, -1, -1):")
        c.indent = 2
        self._assigned: dict[str, list[tuple[int, int]]] = {}
        self._zero_fill = self._zero_fill_targets()
        body_start = len(c.lines)
        for key in sorted(self._zero_fill):
            c(f"{self._zero_fill[key]}.fill(0)")
        for item in reversed(self._body()):
            if isinstance(item, fuse.Region):
                fuse.emit_backward(self, item, self.kernels, c)
                continue
            v = item
            c(f"# d {v.name} = {v.op}({', '.join(a.name for a in v.args)})")
            self._emit_backward(c, v)
        for src in self.core:
            if src.name in self.p.depth and self.in_ring(src):
                D = self.p.depth[src.name]
                c(f"GH_{self.names[src.name]}[(t+{D}) % {D + 1}].fill(0)  # this slot serves step t-1 next")
        if len(c.lines) == body_start:
            c("pass")
        return c.text()

    def grad(self, v: Vertex, t: str = "t") -> tuple[str, str, bool]:
        """Where the loop accumulates d loss / d v at step t: (base expression, key, add-only)."""
        n, ph = self.names[v.name], self.p.phase[v.name]
        if v.kind == "delay":
            if ph == "core":
                src, D = v.source, self.p.depth[v.source.name]
                key = f"GH_{self.names[src.name]}"
                return f"{key}[{self._gh_index(src, f'{t}+{D - v.depth}')}]", key, True
            return f"GX_{n}[{t}]", f"GX_{n}", False
        if ph != "core":
            return f"GX_{n}[{t}]", f"GX_{n}", False
        if v.name in self.p.depth:
            key = f"GH_{n}"
            return f"{key}[{self._gh_index(v, f'{t}+{self.p.depth[v.name]}')}]", key, True
        if self._has_full_grad(v):
            key = f"GF_{n}"
            return f"{key}[{t}]", key, self._post_grad(v)
        return f"G_{n}", f"G_{n}", False

    def _gh_index(self, src: Vertex, index: str) -> str:
        """A gradient history is a ring of D + 1 slots when nothing needs it after the loop."""
        return f"({index}) % {self.p.depth[src.name] + 1}" if self.in_ring(src) else index

    def in_ring(self, src: Vertex) -> bool:
        """Whether the loop may keep only the last D + 1 gradients of delayed ``src``:
        no outside gradient arrives over all steps, and no weight needs them after the loop."""
        return not (self._post_grad(src) or self._has_full_grad(src))

    def _has_full_grad(self, v: Vertex) -> bool:
        return v.name in self.p.split or self._post_grad(v) or (
            v.kind == "op" and any(isinstance(a, Param) for a in v.args))

    def _post_grad(self, v: Vertex) -> bool:
        """Does ``v`` receive gradient from outside the loop (post phase, output seeds)?"""
        memo = self.p.memo.setdefault("post_grad", {})
        if v.name not in memo:
            memo[v.name] = self._find_post_grad(v)
        return memo[v.name]

    def _find_post_grad(self, v: Vertex) -> bool:
        def reads(a) -> bool:  # a is v, or a slice or a delay of it, or a slice of a delay of it, ...
            if isinstance(a, Param):
                return False
            base = _sliced(a)[0]
            while base.kind == "delay":
                base = _sliced(base.source)[0]
            return base is v

        if any(reads(o) for o in self.g.outputs):
            return True
        for u in self.p.order:
            if self.p.phase[u.name] != "post":
                continue
            if u.kind == "delay" and reads(u.source):
                return True
            if u.kind == "op" and any(reads(a) for a in u.args):
                return True
        return False

    def _contributions(self):
        """(target vertex, column range or None) for every gradient the loop body produces, in order."""
        if "contributions" not in self.p.memo:
            self.p.memo["contributions"] = self._find_contributions()
        return self.p.memo["contributions"]

    def _find_contributions(self):
        out = []
        for v in reversed(self.core):
            if v.kind != "op" or v.op == "slice" or v.name in self.skip:
                continue
            for target, rng in self._targets(v):
                out.append((target, rng))
        return out

    def _targets(self, v: Vertex):
        res = []
        if v.name in self.p.split:
            for part, _, _ in self.p.split[v.name].core:
                if part.name in self.p.wants_grad:
                    base, rng = _sliced(part)
                    res.append((base, rng) if rng else (part, None))
            return res
        for a in v.args:
            if isinstance(a, Param) or a.name not in self.p.wants_grad:
                continue
            base, rng = _sliced(a)
            res.append((base, rng) if rng else (a, None))
        return res

    def _zero_fill_targets(self) -> dict[str, str]:
        """Per-step gradient buffers that cannot be written assign-first: zero them each step."""
        covered: dict[str, list] = {}
        bad: set[str] = set()
        widths: dict[str, int] = {}
        exprs: dict[str, str] = {}
        for target, rng in self._contributions():
            expr, key, add_only = self.grad(target)
            if add_only:
                continue
            widths[key] = target.size
            exprs[key] = expr
            lo, hi = rng or (0, target.size)
            spans = covered.setdefault(key, [])
            overlap = [s for s in spans if s[0] < hi and lo < s[1]]
            if overlap and not any(s[0] <= lo and hi <= s[1] for s in spans):
                bad.add(key)
            spans.append((lo, hi))
        for key, spans in covered.items():
            if _coverage(spans) < widths[key]:
                bad.add(key)
        # a target read in the loop that no one writes in the loop must be zeroed too
        for v in self.core:
            if v.kind == "op" and v.op != "slice" and v.name not in self.skip:
                expr, key, add_only = self.grad(v)
                if not add_only and key not in covered:
                    bad.add(key)
                    exprs[key] = expr
        return {key: exprs[key] for key in bad}

    def _add_to(self, c: _Code, target: Vertex, rng, expr_into: callable) -> None:
        """Emit ``grad(target)[rng] (+)= value``; ``expr_into(dst)`` writes the value into ``dst``."""
        base, key, add_only = self.grad(target)
        lo, hi = rng or (0, target.size)
        where = base if rng is None else f"{base}[:, {lo}:{hi}]"
        fresh = not add_only and key not in self._zero_fill and not any(
            s[0] < hi and lo < s[1] for s in self._assigned.get(key, []))
        if fresh:
            self._assigned.setdefault(key, []).append((lo, hi))
            expr_into(c, where)
        else:
            tmp = f"T{hi - lo}"
            self.temp_widths.add(hi - lo)
            expr_into(c, tmp)
            c(f"add({where}, {tmp}, out={where})")

    def _emit_backward(self, c: _Code, v: Vertex) -> None:
        g, _, _ = self.grad(v)
        if v.op == "slice" or v.name not in self.p.wants_grad:
            return
        op, n = v.op, self.names[v.name]
        out = self.val(v)
        targets = []
        for i, a in enumerate(v.args):
            if isinstance(a, Param) or a.name not in self.p.wants_grad:
                continue
            base, rng = _sliced(a)
            targets.append((i, base if rng else a, rng))

        def each(fn):
            for i, tgt, rng in targets:
                self._add_to(c, tgt, rng, lambda cc, dst, i=i: fn(cc, dst, i))

        if op in ("matmul", "linear"):
            s = self.p.split[v.name]
            wanted = [(part, a0, b0) for part, a0, b0 in s.core if part.name in self.p.wants_grad]
            if len(s.core) == 1 and wanted:
                part = wanted[0][0]
                base, rng = _sliced(part)
                self._add_to(c, base if rng else part, rng,
                             lambda cc, dst: cc(f"matmul({g}, W_{n}, out={dst})"))
            elif wanted:
                c(f"matmul({g}, W_{n}, out=CG_{n})")
                off = 0
                for part, a0, b0 in s.core:
                    w = b0 - a0
                    if part.name in self.p.wants_grad:
                        base, rng = _sliced(part)
                        self._add_to(c, base if rng else part, rng,
                                     lambda cc, dst, o=off, w=w: cc(f"copyto({dst}, CG_{n}[:, {o}:{o + w}])"))
                    off += w
        elif op == "add":
            each(lambda cc, dst, i: cc(f"copyto({dst}, {g})"))
        elif op == "sub":
            each(lambda cc, dst, i: cc(f"copyto({dst}, {g})") if i == 0 else cc(f"negative({g}, out={dst})"))
        elif op == "mul":
            a = [self.arg(x) for x in v.args]
            each(lambda cc, dst, i: cc(f"multiply({g}, {a[1 - i]}, out={dst})"))
        elif op == "scale":
            each(lambda cc, dst, i: cc(f"multiply({g}, {v.attrs['c']!r}, out={dst})"))
        elif op == "one_minus":
            each(lambda cc, dst, i: cc(f"negative({g}, out={dst})"))
        elif op == "tanh":
            each(lambda cc, dst, i: cc(f"multiply({out}, {out}, out={dst}); subtract(1, {dst}, out={dst}); "
                                       f"multiply({dst}, {g}, out={dst})"))
        elif op == "sigmoid":
            each(lambda cc, dst, i: cc(f"subtract(1, {out}, out={dst}); multiply({dst}, {out}, out={dst}); "
                                       f"multiply({dst}, {g}, out={dst})"))
        elif op == "relu":
            x = self.arg(v.args[0])
            each(lambda cc, dst, i: cc(f"greater({x}, 0, out=M_{v.size}); multiply({g}, M_{v.size}, out={dst})"))
            self.mask_widths.add(v.size)
        elif op == "identity":
            each(lambda cc, dst, i: cc(f"copyto({dst}, {g})"))
        elif op == "concat":
            offs, o = [], 0
            for a in v.args:
                offs.append(o)
                o += a.size
            each(lambda cc, dst, i: cc(f"copyto({dst}, {g}[:, {offs[i]}:{offs[i] + v.args[i].size}])"))
        else:
            a = [self.arg(x) for x in v.args]
            c(f"_gs = J_{n}({g}, [{', '.join(a)}], {out})")
            each(lambda cc, dst, i: cc(f"copyto({dst}, _gs[{i}])"))

    # ---- shared

    def _body(self) -> list:
        """The loop body in order: vertices, or fused Regions of them when fusing."""
        if self.fuse:
            return fuse.regions(self)
        return [v for v in self.core if v.kind == "op" and v.op != "slice" and v.name not in self.skip]

    def _concat(self, c: _Code, parts: list[str], sizes: list[int], dst: str) -> None:
        if not self.jit:
            c(f"concatenate(({', '.join(parts)},), axis=1, out={dst})")
            return
        off = 0
        for part, size in zip(parts, sizes):
            c(f"copyto({dst}[:, {off}:{off + size}], {part})")
            off += size

    def sources(self) -> tuple[str, str]:
        self.temp_widths: set[int] = set()
        self.mask_widths: set[int] = set()
        fwd = self.forward()
        bwd = self.backward()
        return fwd, bwd


def _coverage(spans) -> int:
    total, end = 0, -1
    for lo, hi in sorted(spans):
        if hi <= end:
            continue
        total += hi - max(lo, end if end > lo else lo)
        end = hi
    return total


# ------------------------------------------------------------------- engine


class CompiledEngine:
    """Runs a folded graph's forward pass and BPTT with generated step loops.

    Same interface and results as :class:`unrolled.reference.ReferenceEngine`.
    ``engine.code`` is the generated loop source; ``engine.plan`` says which
    vertex runs in which phase.
    """

    name = "compiled"

    def __init__(self, graph: Graph, jit: bool | str = "auto"):
        self.graph = graph.check()
        from .stages import cut

        # several cycles run one after another, each in a loop of its own (see stages.py)
        parts = cut(graph)
        self.stages = [(st, CompiledEngine(st.graph, jit=jit)) for st in parts] if len(parts) > 1 else []
        if self.stages:
            self.jit = jit
            self.code = "\n".join(eng.code for _, eng in self.stages)
            return
        self.plan = plan(graph)
        self.jit = jit  # True, False, or "auto": Numba for runs whose steps are small
        self._jit_ok = _jit_available(jit, self.plan)
        fused = jit is not False and os.environ.get("UNROLLED_JIT", "1") != "0" and fuse.available()
        self._writer = _Writer(graph, self.plan, fused=fused)
        fwd, bwd = self._writer.sources()
        self.code = _header(self._writer) + fwd + "\n" + bwd
        self._namespace = self._compile(self.code)
        if self._writer.kernels.functions:
            self.kernel_code = self._writer.kernels.module()
            self._namespace.update(_load_module(self.kernel_code, "fused"))
        self._jit_namespace: dict | None = None
        self._buffers: dict = {}

    def uses_jit(self, B: int) -> bool:
        """Whether a run over batches of ``B`` rows takes the Numba loop."""
        if self.stages:
            return any(eng.uses_jit(B) for _, eng in self.stages)
        if not self._jit_ok:
            return False
        if self.jit is True:
            return True
        widest = max((v.size for v in self.plan.of("core")), default=0)
        return B * widest <= JIT_AUTO_LIMIT

    def jit_namespace(self) -> dict:
        """The Numba-compiled loops, built on first use (compiling takes seconds; Numba caches it on disk)."""
        if self._jit_namespace is None:
            writer = self._jit_writer = _Writer(self.graph, self.plan, jit=True)
            fwd, bwd = writer.sources()
            self.jit_code = _header(writer) + _with_arguments(fwd) + "\n" + _with_arguments(bwd)
            self._jit_namespace = _load_jit_loops(self.jit_code)
        return self._jit_namespace

    def _compile(self, source: str) -> dict:
        filename = f"<unrolled compiled {self.graph.name} {id(self):x}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        ns = {name: getattr(np, name) for name in (
            "matmul", "add", "subtract", "multiply", "negative", "exp", "reciprocal", "tanh", "maximum",
            "copyto", "concatenate", "greater")}
        for v in self.plan.of("core"):
            if v.kind == "op" and v.op not in _INLINE:
                spec, attrs = OPS[v.op], dict(v.attrs)
                n = self._writer.names[v.name]
                ns[f"F_{n}"] = lambda args, spec=spec, attrs=attrs: spec.forward(args, attrs)
                ns[f"J_{n}"] = lambda g, args, out, spec=spec, attrs=attrs: spec.vjp(g, args, out, attrs)
        exec(compile(source, filename, "exec"), ns)
        return ns

    # ------------------------------------------------------------- run

    def run(self, params, inputs=None, *, init_states=None, masks=None, combine: str = "sum",
            per_copy: bool = False, backward: bool = True, steps=None, batch=None,
            final_state_grads=None, output_grads=None) -> RunResult:
        """Forward and (unless ``backward=False``) BPTT; see :func:`unrolled.reference.run`."""
        check_combine(combine)
        if per_copy:
            raise ValueError("per-copy gradients come from the reference engine: use engine='reference'")
        feeds = prepare(self.graph, params, inputs, init_states, masks, steps=steps, batch=batch,
                        final_state_grads=final_state_grads, output_grads=output_grads)
        if self.stages:
            return self._run_stages(params, feeds, init_states or {}, masks or {}, combine, backward,
                                    final_state_grads or {}, output_grads or {})
        state = _RunState(self, params, feeds)
        with np.errstate(under="ignore", over="ignore"):
            state.forward()
            result = state.collect()
            if backward:
                state.backward(result, combine)
        return result

    def _run_stages(self, params, feeds: Feeds, init_states, masks, combine, backward,
                    final_state_grads, output_grads) -> RunResult:
        """Forward through the stages in order, then BPTT back through them in reverse: the
        gradient a stage sends to an input it imported is an output gradient of the stage before."""
        values = dict(feeds.inputs)
        runs = []
        with np.errstate(under="ignore", over="ignore"):
            for st, eng in self.stages:
                g = eng.graph
                sub = prepare(
                    g, {k: params[k] for k in g.params}, {n: values[n] for n in st.imports},
                    {k: v for k, v in init_states.items() if k in st.delayed},
                    {k: v for k, v in masks.items() if k in g.vertices}, steps=feeds.T, batch=feeds.B,
                    final_state_grads={k: v for k, v in final_state_grads.items() if k in st.delayed},
                    output_grads={k: v for k, v in output_grads.items() if k in st.outputs})
                state = _RunState(eng, {k: params[k] for k in g.params}, sub)
                state.forward()
                r = state.collect()
                for n in st.exports:
                    values[n] = r.outputs[n]
                runs.append((st, state, r))
            if backward:
                sent: dict[str, np.ndarray] = {}  # gradients later stages send back, by vertex
                for st, state, r in reversed(runs):
                    for n in st.exports:
                        if n in sent:
                            mine = state.f.output_grads.get(n)
                            state.f.output_grads[n] = sent.pop(n) if mine is None else mine + sent.pop(n)
                    state.backward(r, combine)
                    for n, grad in r.input_grads.items():
                        sent[n] = grad if n not in sent else sent[n] + grad
        return self._merge(runs, feeds, backward)

    def _merge(self, runs, feeds: Feeds, backward: bool) -> RunResult:
        result = RunResult(loss=sum(r.loss for _, _, r in runs))
        for st, _, r in runs:
            result.outputs.update({n: r.outputs[n] for n in st.outputs})
            result.step_losses.update(r.step_losses)
            result.final_states.update(r.final_states)
            if backward:
                result.init_grads.update(r.init_grads)
                for k, grad in r.grads.items():
                    result.grads[k] = grad if k not in result.grads else result.grads[k] + grad
        if backward:
            result.grads = {k: result.grads.get(k, np.zeros(p.shape, dtype=feeds.dtype))  # unused ones get zeros
                            for k, p in self.graph.params.items()}
            for v in self.graph.inputs:
                if v.kind == "input":
                    parts = [r.input_grads[v.name] for _, _, r in runs if v.name in r.input_grads]
                    result.input_grads[v.name] = (np.sum(parts, axis=0) if parts
                                                  else np.zeros((feeds.T, feeds.B, v.size), dtype=feeds.dtype))
        return result

    def buffers(self, T: int, B: int, dtype) -> dict:
        key = (T, B, np.dtype(dtype).str)
        if key not in self._buffers:
            self._buffers.clear()  # keep one set: a training run uses one (T, B)
            self._buffers[key] = {}
        return self._buffers[key]


# ------------------------------------------------------------ the JIT path

_NAME = re.compile(r"\b(?:(?:H|V|S|X|Y|W|WT|C|CG|G|GH|GF|GX)_v\d+|P_p\d+|T\d+|M_\d+)\b")
JIT_AUTO_LIMIT = 4096  # "auto" JITs a run when rows x the widest core vertex is at most this: call-bound steps


def _jit_available(jit, p: Plan) -> bool:
    """Can this graph take the Numba loop? (``jit=True`` insists, and says why not.)"""
    # UNROLLED_JIT: "0" keeps Numba out of "auto" altogether, "fuse" lets it fuse kernels but never run the loop
    if jit is False or (jit != True and os.environ.get("UNROLLED_JIT", "1") in ("0", "fuse")):  # noqa: E712
        return False
    unsupported = sorted({v.op for v in p.of("core") if v.kind == "op" and v.op not in _INLINE})
    if unsupported:
        if jit is True:
            raise ValueError(f"the JIT loop cannot run {', '.join(unsupported)} inside the recurrent core; "
                             f"use jit=False or 'auto'")
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        if jit is True:
            raise ValueError("jit=True needs Numba: pip install numba") from None
        return False
    return True


def _with_arguments(source: str) -> str:
    """Numba freezes globals at compile time, so every buffer becomes an argument instead."""
    names = sorted(set(_NAME.findall(source)), key=lambda n: (n.split("_")[0], n))
    head, _, body = source.partition("\n")
    fn = head.split("(")[0]
    return f"@numba.njit(cache=True, nogil=True, error_model=\"numpy\")\n{fn}(T, {', '.join(names)}):\n{body}"


def _load_module(text: str, prefix: str) -> dict:
    """Import generated Numba code from a file in the cache folder (so Numba can cache it); its names."""
    import hashlib
    import importlib.util

    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    path = _cache_folder() / f"{prefix}_{digest}.py"
    if not path.exists():
        from .atomic import atomic_write_text

        atomic_write_text(path, text)
    spec = importlib.util.spec_from_file_location(f"unrolled_{prefix}_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return {k: v for k, v in vars(module).items() if not k.startswith("_")}


def _load_jit_loops(source: str) -> dict:
    """The generated loops, compiled by Numba, each wrapped to take its buffers from a dict."""
    module = _load_module("import numba\nfrom unrolled.jitkernels import *  # noqa: F401,F403\n\n" + source, "loops")
    ns = {}
    for fn in ("forward_loop", "backward_loop"):
        compiled = module[fn]
        names = compiled.py_func.__code__.co_varnames[1:compiled.py_func.__code__.co_argcount]
        ns[fn] = _binder(compiled, names)
    return ns


def _binder(compiled, names):
    def call(T, bind):
        return compiled(T, *[bind[n] for n in names])

    return call


def _cache_folder():
    """Where generated JIT loops live: $UNROLLED_CACHE, else ~/.cache/unrolled, else a temporary folder."""
    import tempfile
    from pathlib import Path

    for candidate in (os.environ.get("UNROLLED_CACHE"), os.path.join(os.path.expanduser("~"), ".cache", "unrolled"),
                      os.path.join(tempfile.gettempdir(), "unrolled-cache")):
        if not candidate:
            continue
        folder = Path(candidate) / "jit"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write-test"
            probe.write_text("")
            probe.unlink()
            return folder
        except OSError:
            continue
    raise OSError("no writable folder for the JIT cache: set UNROLLED_CACHE to one, or use jit=False")


def _header(w: _Writer) -> str:
    lines = [f"# generated by unrolled.compiled for graph '{w.g.name}'",
             "# core (step by step): " + ", ".join(v.name for v in w.p.of("core")),
             "# pre (all steps at once, before the loop): " + ", ".join(v.name for v in w.p.of("pre")),
             "# post (all steps at once, after the loop): " + ", ".join(v.name for v in w.p.of("post")),
             "# names: " + ", ".join(f"{w.names[v.name]}={v.name}" for v in w.p.order), ""]
    return "\n".join(lines) + "\n"


class _RunState:
    """One run's arrays: the batched phases run here, the loops in generated code."""

    def __init__(self, eng: CompiledEngine, params, feeds: Feeds):
        self.eng, self.params, self.f = eng, params, feeds
        self.p, self.w, self.g = eng.plan, eng._writer, eng.graph
        self.T, self.B, self.dtype = feeds.T, feeds.B, feeds.dtype
        self.buf = eng.buffers(self.T, self.B, self.dtype)
        self.use_jit = eng.uses_jit(self.B)
        self.X: dict[str, np.ndarray] = {}  # pre/post values, [T, B, F] (or [T, B] indices)

    # ---- buffers

    def alloc(self, name: str, shape) -> np.ndarray:
        a = self.buf.get(name)
        if a is None or a.shape != tuple(shape):
            a = self.buf[name] = np.empty(shape, dtype=self.dtype)
        return a

    def value(self, v: Vertex) -> np.ndarray:
        """``v``'s value for all steps, ``[T, B, F]``."""
        T, D = self.T, self.p.depth.get(v.name)
        ph = self.p.phase[v.name]
        if v.kind == "delay":
            if ph == "core":
                Ds = self.p.depth[v.source.name]
                return self.buf[f"H_{self.w.names[v.source.name]}"][Ds - v.depth: Ds - v.depth + T]
            return self.X[v.name]
        if ph != "core":
            return self.X[v.name]
        if v.kind == "op" and v.op == "slice":
            return self.value(v.args[0])[:, :, v.attrs["start"]:v.attrs["stop"]]
        n = self.w.names[v.name]
        if D is not None:
            return self.buf[f"H_{n}"][D:]
        return self.buf[f"V_{n}"]

    # ---- forward

    def forward(self) -> None:
        T, B = self.T, self.B
        for v in self.p.batched("pre"):
            self._batched_forward(v)
        self._prepare_loop()
        self._call("forward_loop")
        for v in self.p.batched("post"):
            self._batched_forward(v)

    def _call(self, fn: str) -> None:
        try:
            if self.use_jit:
                self.eng.jit_namespace()[fn](self.T, self.bind)
            else:
                # buffers and parameters become globals of the generated functions: the fastest lookup there is
                ns = self.eng._namespace
                ns.update(self.bind)
                ns[fn](self.T, self.B, self.buf, self.params)
        except (FloatingPointError, ValueError) as e:
            raise RuntimeError(f"in the compiled {fn.split('_')[0]} loop of graph '{self.g.name}': {e}") from e

    def _batched_forward(self, v: Vertex) -> None:
        T, B = self.T, self.B
        if v.kind in ("input", "index"):
            self.X[v.name] = self.f.inputs[v.name]
            return
        if v.kind == "delay":
            src = v.source
            hist = self._history(src)
            D = self.p.depth[src.name]
            self.X[v.name] = hist[D - v.depth: D - v.depth + T]
            return
        args = [self.params[a.name] if isinstance(a, Param) else _flat(self.value(a)) for a in v.args]
        try:
            out = OPS[v.op].forward(args, dict(v.attrs, dtype=self.dtype))
        except (FloatingPointError, ValueError) as e:
            raise RuntimeError(f"while computing vertex '{v.name}' = {v.op}(...) for all steps: {e}") from e
        self.X[v.name] = out.reshape(T, B, -1)

    def _history(self, src: Vertex) -> np.ndarray:
        """``[D + T, B, F]``: the initial states then ``src`` at every step."""
        key = f"hist:{src.name}"
        if key not in self.X:
            self.X[key] = np.concatenate([self.f.init[src.name], self.value(src)], axis=0)
        return self.X[key]

    def _prepare_loop(self) -> None:
        T, B, w, p = self.T, self.B, self.w, self.p
        bind = {f"P_{w.pnames[k]}": self.params[k] for k in self.g.params}
        suffix = "f32" if self.dtype == np.float32 else "f64"
        for name in w.kernels.names():  # fused kernels come in the run's precision
            bind[name] = self.eng._namespace[f"{name}_{suffix}"]
        for v in p.of("core"):
            n = w.names[v.name]
            if v.name in p.depth:
                D = p.depth[v.name]
                H = self.alloc(f"H_{n}", (D + T, B, v.size))
                H[:D] = self.f.init[v.name]
                bind[f"H_{n}"] = H
            elif v.name in p.stored:
                bind[f"V_{n}"] = self.alloc(f"V_{n}", (T, B, v.size))
            elif v.kind == "op" and v.op != "slice":
                bind[f"S_{n}"] = self.alloc(f"S_{n}", (B, v.size))
            if v.name in p.split:
                s = p.split[v.name]
                W = self.params[s.W]
                Wc = _columns(W, s.core_cols)
                bind[f"W_{n}"], bind[f"WT_{n}"] = Wc, np.ascontiguousarray(Wc.T)
                if len(s.core) > 1:
                    bind[f"C_{n}"] = self.alloc(f"C_{n}", (B, len(s.core_cols)))
                    bind[f"CG_{n}"] = self.alloc(f"CG_{n}", (B, len(s.core_cols)))
                if s.pre:
                    bind[f"Y_{n}"] = self._pre_product(v, s)
        for v in p.order:
            if p.phase[v.name] == "pre" and v.kind != "index":
                bind[f"X_{w.names[v.name]}"] = self.X[v.name]
        self.bind = bind

    def _pre_product(self, v: Vertex, s: _Split) -> np.ndarray:
        """The loop-free half of a split product, for all steps: ``W[:, pre] · x_pre + b``."""
        W = self.params[s.W]
        Wp = _columns(W, s.pre_cols)
        Y = self.alloc(f"Y_{self.w.names[v.name]}", (self.T, self.B, v.size))
        tokens = _one_hot_tokens(s)
        if tokens is not None:
            # W · one_hot(k) is W's column k: a gather, not a product with a matrix of zeros
            np.take(np.ascontiguousarray(Wp.T), _flat(self.value(tokens)), axis=0,
                    out=Y.reshape(self.T * self.B, v.size))
            # (its weight gradient stays a dense product with the one-hot rows: BLAS beats a scatter)
            self.X[f"prex:{v.name}"] = _flat(self.value(s.pre[0][0]))
        else:
            xs = [_flat(self.value(part)) for part, _, _ in s.pre]
            x = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=1)
            self.X[f"prex:{v.name}"] = x
            np.matmul(x, Wp.T, out=Y.reshape(self.T * self.B, v.size))
        if s.bias:
            Y += self.params[s.bias]
        return Y

    def collect(self) -> RunResult:
        g, T, f = self.g, self.T, self.f
        step_losses = {l.name: self.value(l.vertex)[:, :, 0] * f.masks[l.name] for l in g.losses}
        loss = sum(float(step_losses[l.name].sum(dtype=np.float64)) / f.norms[l.name] for l in g.losses)
        outputs = {v.name: np.array(self.value(v)) for v in g.outputs}
        finals = {}
        for name, D in self.p.depth.items():
            v = g.vertices[name]
            hist = self.buf[f"H_{self.w.names[name]}"] if self.p.phase[name] == "core" else self._history(v)
            finals[name] = as_state(np.array(hist[T:T + D]))
        return RunResult(loss=loss, outputs=outputs, step_losses=step_losses, final_states=finals)

    # ---- backward

    def backward(self, result: RunResult, combine: str) -> None:
        T, B, p, w, f = self.T, self.B, self.p, self.w, self.f
        self.GX: dict[str, np.ndarray] = {}  # gradient of pre/post vertices, [T, B, F]
        self.grads = {k: np.zeros(v.shape, dtype=self.dtype) for k, v in self.params.items()}
        self.init_grads: dict[str, np.ndarray] = {}
        self.core_grad: dict[str, np.ndarray] = {}  # post-phase gradient into core vertices, [T, B, F]
        # a delayed core vertex's gradient history is allocated now, so post-phase
        # gradients land in it directly instead of in a [T, B, F] array of their own
        for name, D in p.depth.items():
            if p.phase[name] == "core":
                v = self.g.vertices[name]
                GH = self.alloc(f"GH_{w.names[name]}", ((D + 1) if w.in_ring(v) else (D + T), B, v.size))
                GH[...] = 0
        for l in self.g.losses:
            seed = (f.masks[l.name] / f.norms[l.name]).astype(self.dtype)[:, :, None]
            self._add_grad(l.vertex, seed)
        for name, a in f.output_grads.items():
            self._add_grad(self.g.vertices[name], a)
        for name, D in p.depth.items():
            if p.phase[name] != "core" and name in f.final_state_grads:
                # a delayed vertex outside the loop: its final states are its last values
                hist = np.zeros((D + T, B, self.g.vertices[name].size), dtype=self.dtype)
                hist[T:T + D] = f.final_state_grads[name]
                self.init_grads[name] = self.init_grads.get(name, 0) + hist[:D]
                self._add_grad(self.g.vertices[name], hist[D:])
        for v in reversed(p.batched("post")):
            self._batched_backward(v)
        self._prepare_backward_loop()
        self._call("backward_loop")
        self._loop_param_grads()
        for v in reversed(p.batched("pre")):
            self._batched_backward(v)
        self._finish(result, combine)

    def _add_grad(self, v: Vertex, g: np.ndarray) -> None:
        """Accumulate a whole-sequence gradient ``[T, B, F]`` into vertex ``v`` (or what it slices)."""
        if v.kind == "op" and v.op == "slice" and self.p.phase[v.name] == "core":
            base, (lo, hi) = _sliced(v)
            full = np.zeros((self.T, self.B, base.size), dtype=self.dtype)
            full[:, :, lo:hi] = g
            return self._add_grad(base, full)
        if v.kind == "delay" and self.p.phase[v.name] == "core":
            return self._delay_backward(v, g)
        if self.p.phase[v.name] == "core" and v.name in self.p.depth:
            GH = self.buf[f"GH_{self.w.names[v.name]}"][self.p.depth[v.name]:]
            np.add(GH, g, out=GH)
            return
        store = self.core_grad if self.p.phase[v.name] == "core" else self.GX
        if v.name in store:
            store[v.name] = store[v.name] + g
        else:
            # no copy: stored gradients are only ever replaced (a + b), never updated in place
            store[v.name] = np.asarray(g, dtype=self.dtype)

    def _batched_backward(self, v: Vertex) -> None:
        g = self.GX.get(v.name)
        if g is None or v.kind == "index":
            return
        T, B = self.T, self.B
        if v.kind == "input":
            return
        if v.kind == "delay":
            self._delay_backward(v, g)
            return
        args = [self.params[a.name] if isinstance(a, Param) else _flat(self.value(a)) for a in v.args]
        try:
            grads = OPS[v.op].vjp(_flat(g), args, _flat(self.value(v)), dict(v.attrs, dtype=self.dtype))
        except (FloatingPointError, ValueError) as e:
            raise RuntimeError(f"while differentiating vertex '{v.name}' = {v.op}(...): {e}") from e
        for a, ga in zip(v.args, grads):
            if ga is None:
                continue
            if isinstance(a, Param):
                self.grads[a.name] += unbroadcast(ga, self.params[a.name].shape)
            elif a.name in self.p.wants_grad:
                self._add_grad(a, ga.reshape(T, B, -1))

    def _delay_backward(self, v: Vertex, g: np.ndarray) -> None:
        """A delay outside the loop is a shift: its gradient shifts back to the source and the initial state."""
        src, T = v.source, self.T
        D = self.p.depth[src.name]
        full = np.zeros((D + T,) + g.shape[1:], dtype=self.dtype)
        full[D - v.depth: D - v.depth + T] = g
        self.init_grads[src.name] = self.init_grads.get(src.name, 0) + full[:D]
        self._add_grad(src, full[D:])

    def _prepare_backward_loop(self) -> None:
        T, B, p, w, f = self.T, self.B, self.p, self.w, self.f
        bind = self.bind
        for v in p.of("core"):
            n = w.names[v.name]
            post = self.core_grad.get(v.name)
            if v.name in p.depth:
                D = p.depth[v.name]
                GH = self.buf[f"GH_{n}"]  # zeroed, holding the post-phase gradients (see backward)
                if v.name in f.final_state_grads:
                    fs = f.final_state_grads[v.name]
                    for k in range(D):  # the last D steps, at indexes T .. T+D-1
                        GH[_slot(T + k, D, w.in_ring(v))] += fs[k]
                bind[f"GH_{n}"] = GH
            elif v.kind == "op" and v.op != "slice":
                if w._has_full_grad(v):
                    Y = self.buf.get(f"Y_{n}")
                    if Y is not None and Y.shape == (T, B, v.size):
                        GF = Y  # the pre-loop half is spent after the forward loop: reuse its memory
                    else:
                        GF = self.alloc(f"GF_{n}", (T, B, v.size))
                    if post is not None:
                        GF[...] = post
                    elif w._post_grad(v):
                        GF[...] = 0
                    bind[f"GF_{n}"] = GF
                else:
                    bind[f"G_{n}"] = self.alloc(f"G_{n}", (B, v.size))
        # gradients the loop sends to pre vertices (and pre delays), one [T, B, F] buffer each
        for target, rng in w._contributions():
            if p.phase[target.name] != "core":
                n = w.names[target.name]
                key = f"GX_{n}"
                if key not in bind:
                    bind[key] = self.alloc(key, (T, B, target.size))
        if self.use_jit:
            self.eng.jit_namespace()
            w = self.eng._jit_writer  # its loops may use other temporaries than the NumPy loop's
        for width in w.temp_widths:
            bind[f"T{width}"] = self.alloc(f"T{width}", (B, width))
        for width in w.mask_widths:
            m = self.buf.get(f"M_{width}")
            if m is None or m.shape != (B, width):
                m = self.buf[f"M_{width}"] = np.empty((B, width), dtype=bool)
            bind[f"M_{width}"] = m
        self.bind = bind

    def _loop_param_grads(self) -> None:
        """Each loop weight's gradient as one product over all T*B rows; and the loop's gradients of pre vertices."""
        T, B, p, w = self.T, self.B, self.p, self.w
        TB = T * B
        for v in p.of("core"):
            n = w.names[v.name]
            if v.kind == "delay":
                continue
            if v.kind == "op" and v.op != "slice" and w._has_full_grad(v) and v.name not in p.depth:
                G = self.bind[f"GF_{n}"]
            elif v.name in p.depth:
                G = self.bind[f"GH_{n}"][p.depth[v.name]:]
            else:
                G = None
            if v.name in p.split:
                s = p.split[v.name]
                Gf = G.reshape(TB, v.size)
                for part, lo, hi in s.core:
                    X = _flat(self.value(part))
                    self.grads[s.W][:, lo:hi] += Gf.T @ X
                if s.pre:
                    X = self.X[f"prex:{v.name}"]
                    dWp = Gf.T @ X
                    for (part, lo, hi), off in zip(s.pre, _offsets(s.pre)):
                        self.grads[s.W][:, lo:hi] += dWp[:, off:off + hi - lo]
                    wanted = [(part, lo, hi, off) for (part, lo, hi), off in zip(s.pre, _offsets(s.pre))
                              if part.name in p.wants_grad]
                    if wanted:
                        gx = Gf @ _columns(self.params[s.W], s.pre_cols)
                        for part, lo, hi, off in wanted:
                            self._add_grad(part, gx[:, off:off + hi - lo].reshape(T, B, -1))
                if s.bias:
                    self.grads[s.bias] += Gf.sum(axis=0)
            elif v.kind == "op" and any(isinstance(a, Param) for a in v.args):
                args = [self.params[a.name] if isinstance(a, Param) else _flat(self.value(a)) for a in v.args]
                gs = OPS[v.op].vjp(G.reshape(TB, v.size), args, _flat(self.value(v)), dict(v.attrs, dtype=self.dtype))
                for a, ga in zip(v.args, gs):
                    if isinstance(a, Param) and ga is not None:
                        self.grads[a.name] += unbroadcast(ga, self.params[a.name].shape)
        outside = {t.name: t for t, _ in w._contributions() if p.phase[t.name] != "core"}
        for target in outside.values():
            self._add_grad(target, self.bind[f"GX_{w.names[target.name]}"])
        for name, D in p.depth.items():
            if p.phase[name] == "core":
                GH = self.bind[f"GH_{w.names[name]}"]
                ring = w.in_ring(self.g.vertices[name])
                first = GH[[_slot(k, D, ring) for k in range(D)]]
                self.init_grads[name] = self.init_grads.get(name, 0) + first

    def _finish(self, result: RunResult, combine: str) -> None:
        g, f, T = self.g, self.f, self.T
        # learned initial states: the parameter fills every initial slot it was not overridden in
        for name, D in self.p.depth.items():
            v = g.vertices[name]
            ig = self.init_grads.get(name)
            if ig is None or np.isscalar(ig):
                ig = np.zeros((D, self.B, v.size), dtype=self.dtype)
            self.init_grads[name] = ig
            if v.init == "learned" and name not in f.given_init:
                self.grads[g.init_param_name(name)] += ig.sum(axis=(0, 1))
        copies = self._copies()
        for name, grad in self.grads.items():
            if combine == "mean" and copies.get(name):
                grad = grad / copies[name]
            result.grads[name] = grad.astype(self.dtype, copy=False)
        for v in g.inputs:
            if v.kind == "input":
                gx = self.GX.get(v.name)
                result.input_grads[v.name] = (np.zeros((T, self.B, v.size), dtype=self.dtype) if gx is None
                                              else np.array(gx, dtype=self.dtype))
        for name, ig in self.init_grads.items():
            result.init_grads[name] = as_state(np.array(ig, dtype=self.dtype))

    def _copies(self) -> dict[str, int]:
        """How many copies of each parameter the unrolled graph has (the divisor of combine='mean')."""
        used = set()
        for v in self.g.vertices.values():
            if v.kind == "op":
                used.update(a.name for a in v.args if isinstance(a, Param))
        out = {name: self.T for name in used}
        for name, D in self.p.depth.items():
            v = self.g.vertices[name]
            if v.init == "learned" and name not in self.f.given_init:
                out[self.g.init_param_name(name)] = D
        return out


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def _columns(W: np.ndarray, cols: list[int]) -> np.ndarray:
    """A contiguous copy of ``W[:, cols]``: NumPy hands a strided view to a slow non-BLAS loop."""
    if cols and cols == list(range(cols[0], cols[-1] + 1)):
        return np.ascontiguousarray(W[:, cols[0]: cols[-1] + 1])
    return np.ascontiguousarray(W[:, cols])


def _slot(index: int, D: int, ring: bool) -> int:
    return index % (D + 1) if ring else index


def _one_hot_tokens(s: _Split):
    """The index input of a split product whose loop-free half is ``W · one_hot(tokens)``, else None."""
    if len(s.pre) == 1:
        part = s.pre[0][0]
        if part.kind == "op" and part.op == "one_hot":
            return part.args[0]
    return None


def _offsets(parts) -> list[int]:
    out, o = [], 0
    for _, lo, hi in parts:
        out.append(o)
        o += hi - lo
    return out
