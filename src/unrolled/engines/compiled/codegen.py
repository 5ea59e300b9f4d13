"""Writing the compiled engine's step loops as Python source.

The forward loop computes the recurrent core one step at a time into
preallocated buffers with ``out=`` arguments; the backward loop walks the
steps in reverse, carrying only the gradients of core values, accumulating
each gradient in place (assigned by its first contribution in a step, added
by the others), and leaving weight gradients to one product after the loop.
The same text runs on NumPy, or, with buffers as arguments, under Numba.
"""

from __future__ import annotations

import re

from unrolled.graph.folded import Graph, Param, Vertex
from unrolled.graph.ops import ELEMENTWISE, OPS

from . import fuse
from .plan import Plan
from .ufunc_calls import spell, spells

# How the loops spell the calls of op formulas (ufunc_calls.py): NumPy's ufuncs, or the array
# kernels of the same names under Numba, which also have a sigmoid of their own.
_CALLS = {"tanh": "tanh({0}, out={dst})", "exp": "exp({0}, out={dst})", "max": "maximum({0}, {1}, out={dst})"}
_SIGMOID = {True: "sigmoid({0}, out={dst})",
            False: "negative({0}, out={dst}); exp({dst}, out={dst}); add({dst}, 1, out={dst}); reciprocal({dst}, out={dst})"}


def loop_calls(jit: bool) -> dict[str, str]:
    """The loops' spellings of the formulas' calls, under Numba (``jit``) or NumPy."""
    return {**_CALLS, "sigmoid": _SIGMOID[jit]}


_NAME = re.compile(r"\b(?:(?:H|V|S|X|Y|W|WT|FT|BT|FL|BL|WX|TOK|C|CG|G|GH|GF|GX)_v\d+|P_p\d+|T\d+|M_\d+|KIND)\b")


def forward_weight(n: str) -> str:
    """The weight operand of core product ``n``'s forward step, ``x · Wᵀ``: the transposed copy
    ``WT`` as it is, or the kept ``W`` through a transposed view, as the flag ``FT`` says
    (kernels/layouts.py measures which this machine reads faster)."""
    return f"(W_{n}.T if FT_{n} else WT_{n})"


def backward_weight(n: str) -> str:
    """The weight operand of core product ``n``'s backward step, ``g · W``: ``W`` as it is, or the
    copy ``WT`` through a transposed view, as the flag ``BT`` says (see :func:`forward_weight`)."""
    return f"(WT_{n}.T if BT_{n} else W_{n})"


def forward_product(n: str, x: str, dst: str, add: bool = False) -> str:
    """Core product ``n``'s forward step ``dst (+)= x · Wᵀ``, on the library the flag ``FL`` names
    (see :func:`forward_weight`)."""
    return f"step_matmul{'_add' if add else ''}(FL_{n}, {x}, {forward_weight(n)}, {dst})"


def backward_product(n: str, g: str, dst: str, add: bool = False) -> str:
    """Core product ``n``'s backward step ``dst (+)= g · W``, on the library the flag ``BL`` names."""
    return f"step_matmul{'_add' if add else ''}(BL_{n}, {g}, {backward_weight(n)}, {dst})"


# ------------------------------------------------------------ code writing


class _Code:
    def __init__(self):
        self.lines: list[str] = []
        self.indent = 0

    def __call__(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Writer:
    """Emits the forward and backward step loops for a plan."""

    # Elementwise ops the loops spell as NumPy calls with ``out=``, derived from their formulas
    # (ufunc_calls.py); any other elementwise op runs as a fused kernel rendered from its formula
    # (fuse.py), or, unfused, through the op table's NumPy rules (``F_``, ``J_``).
    NATIVE = frozenset(op for op in ELEMENTWISE if spells(OPS[op].formula, loop_calls(True)))

    def __init__(self, graph: Graph, p: Plan, jit: bool = False, fused: bool = False):
        self.g, self.p, self.jit = graph, p, jit
        self.fuse = fused
        self.calls = loop_calls(jit)
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
        if self.p.is_view(v):
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
        c("def forward_loop(t0, t1, B, buf, P):")
        c.indent = 1
        c("for t in range(t0, t1):")
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
        rule = FORWARD.get(v.op)
        if rule is not None:
            rule(self, c, v)
            return
        dst, a = self.val(v), [self.arg(x) for x in v.args]
        if v.op in self.NATIVE:
            c("; ".join(spell(OPS[v.op].formula.forward, self.operands(v), dst, self.calls)))
        else:
            c(f"{dst}[...] = F_{self.names[v.name]}([{', '.join(a)}])")

    def operands(self, v: Vertex) -> dict[str, str]:
        """What an elementwise formula's names stand for in the loop: operands and the attribute c."""
        return {**{f"x{i}": self.arg(x) for i, x in enumerate(v.args)}, "c": repr(v.attrs.get("c"))}

    def _forward_product(self, c: _Code, v: Vertex) -> None:
        dst, s, n = self.val(v), self.p.split[v.name], self.names[v.name]
        xs = [self.val(part) for part, _, _ in s.core]
        x = xs[0] if len(xs) == 1 else f"C_{n}"
        if len(xs) > 1:
            self._concat(c, xs, [part.size for part, _, _ in s.core], x)
        if s.pre and s.tokens is None and dst == f"S_{n}":
            # nothing keeps this step's value but the step: the product adds itself onto its
            # loop-free half where that lies (Y[t]), which then holds the value
            c(f"{dst} = Y_{n}[t - t0]  # Y holds this chunk's steps only")
            c(forward_product(n, x, dst, add=True))
            return
        c(forward_product(n, x, dst))
        if s.tokens is not None:
            # W · one_hot(k) + b is row k of WX = (W[:, pre] + b) transposed: picked in the loop
            c(f"add_rows({dst}, WX_{n}, TOK_{n}[t])")
        elif s.pre:
            c(f"add({dst}, Y_{n}[t - t0], out={dst})")  # Y holds this chunk's steps only
        elif s.bias:
            c(f"add({dst}, P_{self.pnames[s.bias]}, out={dst})")

    def _forward_slice(self, c: _Code, v: Vertex) -> None:
        """Delayed, so not a view (Plan.is_view): its history gets a copy of its columns."""
        c(f"copyto({self.val(v)}, {self.arg(v.args[0])}[:, {v.attrs['start']}:{v.attrs['stop']}])")

    def _forward_concat(self, c: _Code, v: Vertex) -> None:
        self._concat(c, [self.arg(x) for x in v.args], [x.size for x in v.args], self.val(v))

    # ---- backward

    def backward(self) -> str:
        c = _Code()
        c("def backward_loop(t0, t1, B, buf, P):")
        c.indent = 1
        c("for t in range(t1 - 1, t0 - 1, -1):")
        c.indent = 2
        self.assigned: dict[str, list[tuple[int, int]]] = {}
        self.zero_fill = self._zero_fill_targets()
        body_start = len(c.lines)
        for key in sorted(self.zero_fill):
            c(f"{self.zero_fill[key]}.fill(0)")
        self._recompute(c)
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

    def _recompute(self, c: _Code) -> None:
        """Step t's values that the forward loop did not keep (Plan.recomputed), computed again into
        their step buffers as the forward loop computed them: in a fused kernel where it fused them."""
        fused = {v.name for item in self._body() if isinstance(item, fuse.Region) for v in item.vertices}
        for k, name in enumerate(self.p.recomputed):
            v = self.g.vertices[name]
            c(f"# {v.name} = {v.op}({', '.join(a.name for a in v.args)}) again: not kept for every step")
            if name in fused:
                fuse.emit_forward(self, fuse.Region(f"again{k}", [v]), self.kernels, c)
            else:
                self._emit_forward(c, v)

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
        if self.has_full_grad(v):
            key = f"GF_{n}"  # holds this chunk's steps only
            return f"{key}[{t} - t0]", key, self.post_grad(v)
        return f"G_{n}", f"G_{n}", False

    def _gh_index(self, src: Vertex, index: str) -> str:
        """A gradient history is a ring of D + 1 slots when nothing needs it after the loop."""
        return f"({index}) % {self.p.depth[src.name] + 1}" if self.in_ring(src) else index

    def in_ring(self, src: Vertex) -> bool:
        """Whether the loop may keep only the last D + 1 gradients of delayed ``src``:
        no outside gradient arrives over all steps, and no weight needs them after the loop."""
        return not (self.post_grad(src) or self.has_full_grad(src))

    def has_full_grad(self, v: Vertex) -> bool:
        """Does the loop keep ``v``'s gradient for every step of a chunk (``GF``)? Asked ~90 times a
        run (and twice that with the rows split), so remembered like :meth:`post_grad`."""
        memo = self.p.memo.setdefault("full_grad", {})
        full = memo.get(v.name)
        if full is None:
            full = memo[v.name] = v.name in self.p.split or self.post_grad(v) or (
                v.kind == "op" and any(isinstance(a, Param) for a in v.args))
        return full

    def post_grad(self, v: Vertex) -> bool:
        """Does ``v`` receive gradient from outside the loop (post phase, output seeds)?"""
        memo = self.p.memo.setdefault("post_grad", {})
        if v.name not in memo:
            memo[v.name] = self._find_post_grad(v)
        return memo[v.name]

    def _find_post_grad(self, v: Vertex) -> bool:
        def reads(a) -> bool:  # a is v, or a slice or a delay of it, or a slice of a delay of it, ...
            if isinstance(a, Param):
                return False
            base = self.p.viewed(a)[0]
            while base.kind == "delay":
                base = self.p.viewed(base.source)[0]
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

    def contributions(self):
        """(target vertex, column range or None) for every gradient the loop body produces, in order."""
        if "contributions" not in self.p.memo:
            self.p.memo["contributions"] = self._find_contributions()
        return self.p.memo["contributions"]

    def _find_contributions(self):
        out = []
        for v in reversed(self.core):
            if v.kind != "op" or self.p.is_view(v) or v.name in self.skip:
                continue
            for target, rng in self._targets(v):
                out.append((target, rng))
        return out

    def _targets(self, v: Vertex):
        res = []
        if v.name in self.p.split:
            for part, _, _ in self.p.split[v.name].core:
                if part.name in self.p.wants_grad:
                    base, rng = self.p.viewed(part)
                    res.append((base, rng) if rng else (part, None))
            return res
        if v.op == "slice":  # a delayed slice: its gradient goes to its columns of what it slices
            return [self._slice_target(v)] if v.args[0].name in self.p.wants_grad else []
        for a in v.args:
            if isinstance(a, Param) or a.name not in self.p.wants_grad:
                continue
            base, rng = self.p.viewed(a)
            res.append((base, rng) if rng else (a, None))
        return res

    def _slice_target(self, v: Vertex):
        """(vertex, column range) where the gradient of slice ``v`` (one that is not a view) lands."""
        base, rng = self.p.viewed(v.args[0])
        off = rng[0] if rng else 0
        return base, (off + v.attrs["start"], off + v.attrs["stop"])

    def _zero_fill_targets(self) -> dict[str, str]:
        """Per-step gradient buffers that cannot be written assign-first: zero them each step."""
        covered: dict[str, list] = {}
        bad: set[str] = set()
        widths: dict[str, int] = {}
        exprs: dict[str, str] = {}
        for target, rng in self.contributions():
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
            if v.kind == "op" and not self.p.is_view(v) and v.name not in self.skip:
                expr, key, add_only = self.grad(v)
                if not add_only and key not in covered:
                    bad.add(key)
                    exprs[key] = expr
        return {key: exprs[key] for key in bad}

    def _add_to(self, c: _Code, target: Vertex, rng, expr_into: callable, expr_onto: callable = None) -> None:
        """Emit ``grad(target)[rng] (+)= value``; ``expr_into(dst)`` writes the value into ``dst``,
        ``expr_onto(dst)``, where given, adds it onto ``dst`` (a product does, without a temporary)."""
        base, key, add_only = self.grad(target)
        lo, hi = rng or (0, target.size)
        where = base if rng is None else f"{base}[:, {lo}:{hi}]"
        fresh = not add_only and key not in self.zero_fill and not any(
            s[0] < hi and lo < s[1] for s in self.assigned.get(key, []))
        if fresh:
            self.assigned.setdefault(key, []).append((lo, hi))
            expr_into(c, where)
        elif expr_onto is not None:
            expr_onto(c, where)
        else:
            tmp = f"T{hi - lo}"
            self.temp_widths.add(hi - lo)
            expr_into(c, tmp)
            c(f"add({where}, {tmp}, out={where})")

    def _emit_backward(self, c: _Code, v: Vertex) -> None:
        if self.p.is_view(v) or v.name not in self.p.wants_grad:
            return
        rule = BACKWARD.get(v.op)
        if rule is not None:
            rule(self, c, v)
        elif v.op in self.NATIVE:
            self._backward_spelled(c, v)
        else:
            g, _, _ = self.grad(v)
            a = [self.arg(x) for x in v.args]
            c(f"_gs = J_{self.names[v.name]}({g}, [{', '.join(a)}], {self.val(v)})")
            self._each_operand(c, v, lambda cc, dst, i: cc(f"copyto({dst}, _gs[{i}])"))

    def _each_operand(self, c: _Code, v: Vertex, write) -> None:
        """``write(c, dst, i)`` for each operand i that wants a gradient, into where it accumulates."""
        for i, a in enumerate(v.args):
            if isinstance(a, Param) or a.name not in self.p.wants_grad:
                continue
            base, rng = self.p.viewed(a)
            self._add_to(c, base if rng else a, rng, lambda cc, dst, i=i: write(cc, dst, i))

    def _backward_spelled(self, c: _Code, v: Vertex) -> None:
        """An elementwise op's VJPs as ufunc calls, spelled from its formulas (ufunc_calls.py)."""
        g, _, _ = self.grad(v)
        names, mask = {**self.operands(v), "g": g, "y": self.val(v)}, f"M_{v.size}"

        def write(cc, dst, i):
            lines = spell(OPS[v.op].formula.vjp[i], names, dst, self.calls, mask)
            if any(mask in line for line in lines):
                self.mask_widths.add(v.size)
            cc("; ".join(lines))

        self._each_operand(c, v, write)

    def _backward_slice(self, c: _Code, v: Vertex) -> None:
        """Delayed, so not a view: its gradient is copied back into its columns."""
        g, _, _ = self.grad(v)
        base, rng = self._slice_target(v)
        self._add_to(c, base, rng, lambda cc, dst: cc(f"copyto({dst}, {g})"))

    def _backward_concat(self, c: _Code, v: Vertex) -> None:
        g, _, _ = self.grad(v)
        offs, o = [], 0
        for a in v.args:
            offs.append(o)
            o += a.size
        self._each_operand(c, v, lambda cc, dst, i: cc(f"copyto({dst}, {g}[:, {offs[i]}:{offs[i] + v.args[i].size}])"))

    def _backward_product(self, c: _Code, v: Vertex) -> None:
        """The input's gradient ``g · W``, sent to the product's loop parts (W's own: after the loop)."""
        g, _, _ = self.grad(v)
        s, n = self.p.split[v.name], self.names[v.name]
        wanted = [part for part, _, _ in s.core if part.name in self.p.wants_grad]
        if len(s.core) == 1 and wanted:
            base, rng = self.p.viewed(wanted[0])
            self._add_to(c, base if rng else wanted[0], rng,
                         lambda cc, dst: cc(backward_product(n, g, dst)),
                         lambda cc, dst: cc(backward_product(n, g, dst, add=True)))
        elif wanted:
            c(backward_product(n, g, f"CG_{n}"))
            off = 0
            for part, a0, b0 in s.core:
                w = b0 - a0
                if part.name in self.p.wants_grad:
                    base, rng = self.p.viewed(part)
                    self._add_to(c, base if rng else part, rng,
                                 lambda cc, dst, o=off, w=w: cc(f"copyto({dst}, CG_{n}[:, {o}:{o + w}])"))
                off += w

    # ---- shared

    def _body(self) -> list:
        """The loop body in order: vertices, or fused Regions of them when fusing."""
        if self.fuse:
            return fuse.regions(self)
        return [v for v in self.core if v.kind == "op" and not self.p.is_view(v) and v.name not in self.skip]

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


# The structural ops the step loops write, each by its rule above, looked up by op name. Every
# elementwise op runs too: spelled as ufunc calls from its formula where it fits one buffer
# (Writer.NATIVE), else a fused kernel or the op table's NumPy rule. Any other op runs through
# the table's NumPy rule outside the loop only (Plan's pre and post phases).
FORWARD = {"matmul": Writer._forward_product, "linear": Writer._forward_product,
           "slice": Writer._forward_slice, "concat": Writer._forward_concat}
BACKWARD = {"matmul": Writer._backward_product, "linear": Writer._backward_product,
            "slice": Writer._backward_slice, "concat": Writer._backward_concat}
INLINE = ELEMENTWISE | frozenset(FORWARD)  # the ops a step loop runs


def _coverage(spans) -> int:
    total, end = 0, -1
    for lo, hi in sorted(spans):
        if hi <= end:
            continue
        total += hi - max(lo, end if end > lo else lo)
        end = hi
    return total


def with_arguments(source: str) -> str:
    """Numba freezes globals at compile time, so every buffer becomes an argument instead."""
    names = sorted(set(_NAME.findall(source)), key=lambda n: (n.split("_")[0], n))
    head, _, body = source.partition("\n")
    fn = head.split("(")[0]
    return f"@numba.njit(cache=True, nogil=True, error_model=\"numpy\", fastmath={{\"contract\"}})\n{fn}(t0, t1, {', '.join(names)}):\n{body}"


def header(w: Writer) -> str:
    lines = [f"# generated by unrolled.engines.compiled.engine for graph '{w.g.name}'",
             "# core (step by step): " + ", ".join(v.name for v in w.p.of("core")),
             "# pre (all steps at once, before the loop): " + ", ".join(v.name for v in w.p.of("pre")),
             "# post (all steps at once, after the loop): " + ", ".join(v.name for v in w.p.of("post")),
             "# names: " + ", ".join(f"{w.names[v.name]}={v.name}" for v in w.p.order), ""]
    return "\n".join(lines) + "\n"


