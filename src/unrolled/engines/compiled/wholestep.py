"""A small graph's whole run, forward and BPTT, as one compiled function.

When a step is tiny (a batch of one, a hundred units: min-char-rnn), a run
costs calls, not arithmetic: the compiled engine's phases, each a handful of
NumPy calls, and the Python between them take ten times what its compiled
step loop does. For such runs this module writes the whole run as one Numba
function: the recurrent core's vertices step by step in the graph's step
order; then the vertices that read the core but never feed it (readouts,
losses), over all steps at once; their gradients likewise, then the core's
step by step in reverse; and after that loop each weight's gradient as one
product over all rows of all steps. The products over all steps go to BLAS
(``arrays.matmul_add``), whose blocked kernels beat the row kernels once a
product has the rows of every step; the step loop keeps its row kernels,
whose rows are one step's only. Python passes
the inputs, initial states, masks and parameters straight in and copies the
results out; the function zeroes and seeds the gradients itself.

Every value and gradient is kept for all steps (``[T, B, F]``, or
``[D + T, B, F]`` for a vertex read through delays: its initial states first)
in arrays kept between runs of one shape; at the sizes this serves that is a
few kilobytes. A product reads its weight in the weight's own layout, part
by part of its input: a dense part as dot products, a one-hot part as the
one column it picks (a concatenation or one-hot vector that only products
read is never built), so no transposed copy is made and a one-hot vector's
zeros cost nothing.

:func:`supports` says which graphs it runs (elementwise ops, products,
concatenations, slices, one-hot and embedding inputs, cross-entropy and MSE
losses); the compiled engine uses it for those, when Numba may run and the
run is small (see ``CompiledEngine.uses_whole``), and its own phases otherwise.
The tests hold it to the reference engine like the others.
"""

from __future__ import annotations

import math
import re

import numpy as np

from unrolled.engines.compiled.kernels.blas import aligned_empty, aligned_zeros
from unrolled.engines.runio import CopyCounts, Feeds, RunResult, as_state, scan_feeds
from unrolled.graph.folded import Graph, Param, Vertex
from unrolled.graph.ops import ELEMENTWISE, OPS

from .fuse import back_kernel, reads, row_kernels, takes_c

KEEP_WORKSPACES = 4  # runs of this many shapes (T, B, dtype) keep their arrays

def unsupported(graph: Graph) -> set[str]:
    """What in this graph :class:`WholeRun` cannot run (empty: it runs all of it). A delayed index
    input is refused: rare, and its history would need an integer buffer of its own."""
    out = {v.op for v in graph.step_order() if v.kind == "op" and v.op not in SUPPORTED}
    if any(graph.vertices[name].kind == "index" for name in graph.delayed()):
        out.add("a delayed index input")
    return out


def supports(graph: Graph) -> bool:
    return not unsupported(graph)


class WholeRun:
    """The generated function for one graph (``code``), and the Python that feeds it."""

    def __init__(self, graph: Graph):
        self.g = graph
        self.depth = graph.delayed()
        self.order = graph.step_order()
        self.names = {v.name: f"v{i}" for i, v in enumerate(self.order)}
        self.pnames = {name: f"p{i}" for i, name in enumerate(graph.params)}
        self.feeds = _feeds(self)  # (argument, what of the Feeds it is, whose), after the parameters
        self.code = Writer(self).source()
        self.kernel_code = row_kernels({v.op for v in self.order if v.kind == "op"} & ELEMENTWISE)
        self.arguments = _arguments(self.code)  # the workspace arrays, after the feeds
        self._fn = None
        self._workspaces: dict[tuple, _Workspace] = {}
        self._copies = CopyCounts(graph)

    def locate(self, v: Vertex) -> tuple[str, str, int | None]:
        """Where ``v``'s steps live: (array kind, short name, first step's row). A vertex read through
        delays, or a delay of one, lives in its history ``H`` (its gradient in ``GH``) from that row;
        any other in ``X`` (dense input), ``I`` (index input) or ``V`` (gradient ``G``) from row 0,
        the row then None."""
        shift = 0
        if v.kind == "delay":
            v, shift = v.source, v.depth
        n = self.names[v.name]
        if v.name in self.depth:
            return "H", n, self.depth[v.name] - shift
        return {"input": "X", "index": "I"}.get(v.kind, "V"), n, None

    # ---- running

    def run(self, params, f: Feeds, combine: str, backward: bool, scan: bool = False) -> RunResult:
        """The run; ``scan``: refuse NaN and infinities in the caller's arrays, as
        :func:`~unrolled.engines.runio.scan_feeds` does. The function looks for them in one
        compiled pass and, only when it finds one, the scan runs to name it."""
        if self._fn is None:
            from unrolled.engines.compiled.kernels.jitcache import load_module

            self._fn = load_module("import numba\nfrom unrolled.engines.compiled.kernels.arrays import matmul_add  # noqa: F401\n"
                                   "from unrolled.engines.compiled.kernels.rows import *  # noqa: F401,F403\n\n"
                                   + self.kernel_code + self.code, "whole")["whole_run"]
        ws = self._workspace(f)
        args = [*[params[name] for name in self.pnames], *ws.feed_args(f), *ws.args]
        loss = self._fn(f.T, f.B, 1 if backward else 0, 1 if scan else 0, *args)
        if scan and ws.flag[0]:
            scan_feeds(f)  # raises, naming the array and the place
            loss = self._fn(f.T, f.B, 1 if backward else 0, 0, *args)  # pragma: no cover - the scan found one
        return self._result(ws, f, loss, combine, backward)

    def _workspace(self, f: Feeds) -> "_Workspace":
        """The arrays of runs shaped like ``f``, made on the first such run and kept: a small run
        would otherwise spend more time allocating them than computing. Like the phase engine's
        buffers, they serve one run at a time: an engine is not to be run from two threads at once."""
        key = (f.T, f.B, f.dtype.str)
        ws = self._workspaces.pop(key, None) or _Workspace(self, f.T, f.B, f.dtype)
        self._workspaces[key] = ws  # most recently used last
        while len(self._workspaces) > KEEP_WORKSPACES:
            del self._workspaces[next(iter(self._workspaces))]
        return ws

    def _result(self, ws: "_Workspace", f: Feeds, loss: float, combine: str, backward: bool) -> RunResult:
        """Copies out of the workspace (the next run overwrites it), through the views the
        workspace made once (``_Workspace.views``): a small run's result is most of its Python."""
        views = ws.views
        step_losses = {name: rows * f.masks[name] for name, rows in views.losses}
        outputs = {name: (ws.inputs[name] if view is None else view).copy() for name, view in views.outputs}
        finals = {name: as_state(view.copy()) for name, view in views.finals}
        r = RunResult(loss=float(loss), outputs=outputs, step_losses=step_losses, final_states=finals)
        if not backward:
            return r
        flat = ws.param_grads.copy()  # one copy, one view per parameter
        grads = {name: flat[at:at + size].reshape(shape) for name, at, size, shape in ws.param_slices}
        for name, view, learned in views.init_grads:
            r.init_grads[name] = as_state(view.copy())
            if learned is not None and name not in f.given_init:
                grads[learned] += view.sum(axis=(0, 1))
        if combine == "mean":
            for name, copies in self._copies(f.T, f.given_init).items():
                grads[name] /= copies
        r.grads = grads
        r.input_grads = {name: view.copy() for name, view in views.input_grads}
        return r


def _feeds(w: WholeRun) -> list[tuple[str, str, str]]:
    """What ``whole_run`` takes of each run's :class:`Feeds`, in argument order: index and dense
    inputs, initial states, each loss's mask and divisor, output and final-state gradients."""
    out = []
    for v in w.g.inputs:
        out.append((f"{'I' if v.kind == 'index' else 'X'}_{w.names[v.name]}", "input", v.name))
    out += [(f"IN_{w.names[name]}", "init", name) for name in w.depth]
    for l in w.g.losses:
        out += [(f"M_{w.names[l.vertex.name]}", "mask", l.name), (f"N_{w.names[l.vertex.name]}", "norm", l.name)]
    out += [(f"OG_{i}", "output_grad", v.name) for i, v in enumerate(w.g.outputs)]  # may be a delay
    out += [(f"FS_{w.names[name]}", "final_state_grad", name) for name in w.depth]
    return out


class _Workspace:
    """Every array ``whole_run`` keeps between its phases, for runs of one ``T``, ``B`` and dtype.

    Values are ``[T, B, F]`` (``[D + T, B, F]`` for a vertex read through delays: its initial
    states first); gradients are views of one flat buffer (``GRADS``, zeroed by the run itself),
    the parameters' first. ``args`` is the argument list in the generated function's order.
    """

    def __init__(self, w: WholeRun, T: int, B: int, dtype: np.dtype):
        self.w, self.T = w, T
        a: dict[str, np.ndarray] = {}
        grad_shapes: dict[str, tuple] = {f"D_{pn}": w.g.params[name].shape for name, pn in w.pnames.items()}
        for v in w.order:
            n = w.names[v.name]
            D = w.depth.get(v.name)
            if D is not None:
                a[f"H_{n}"] = aligned_empty((D + T, B, v.size), dtype)
                grad_shapes[f"GH_{n}"] = (D + T, B, v.size)
            elif v.kind == "op":
                a[f"V_{n}"] = aligned_empty((T, B, v.size), dtype)
                grad_shapes[f"G_{n}"] = (T, B, v.size)
                if v.op == "cross_entropy":  # the softmax its gradient needs
                    a[f"PR_{n}"] = aligned_empty((T, B, v.args[0].size), dtype)
            elif v.kind == "input":
                grad_shapes[f"G_{n}"] = (T, B, v.size)
        self.grads = a["GRADS"] = aligned_zeros((sum(math.prod(s) for s in grad_shapes.values()),), dtype)
        self.flag = a["FLAG"] = np.zeros(1, dtype=np.int8)  # set by a scan that found NaN or an infinity
        at, starts = 0, {}
        for key, shape in grad_shapes.items():
            size = math.prod(shape)
            a[key], starts[key] = self.grads[at:at + size].reshape(shape), at
            at += size
        self.param_slices = [(name, starts[f"D_{pn}"], a[f"D_{pn}"].size, a[f"D_{pn}"].shape)
                             for name, pn in w.pnames.items()]
        self.param_grads = self.grads[:sum(size for _, _, size, _ in self.param_slices)]
        self.arrays = a
        self.args = [a[n] for n in w.arguments]
        self.views = _ResultViews(self)
        # read-only zeros for the output and final-state gradients a run does not give
        self.no_grad = {n: np.zeros(self._feed_shape(kind, name, T, B), dtype=dtype)
                        for n, kind, name in w.feeds if kind in ("output_grad", "final_state_grad")}

    def _feed_shape(self, kind: str, name: str, T: int, B: int) -> tuple:
        v = self.w.g.vertices[name]
        return (T, B, v.size) if kind == "output_grad" else (self.w.depth[name], B, v.size)

    def feed_args(self, f: Feeds) -> list:
        self.inputs = f.inputs  # a dense input's values are the caller's own (an output may be one)
        out = []
        for n, kind, name in self.w.feeds:
            if kind == "input":
                out.append(np.ascontiguousarray(f.inputs[name]))
            elif kind == "init":
                out.append(np.ascontiguousarray(f.init[name]))
            elif kind == "mask":
                out.append(f.masks[name])
            elif kind == "norm":
                out.append(float(f.norms[name]))
            else:
                given = (f.output_grads if kind == "output_grad" else f.final_state_grads).get(name)
                out.append(self.no_grad[n] if given is None else np.ascontiguousarray(given))
        return out

    def value_of(self, v: Vertex) -> np.ndarray:
        """``v``'s values for all steps, ``[T, B, F]`` (a delay: its source's history, shifted)."""
        return self._steps("H", "V", v)

    def grad_of(self, v: Vertex) -> np.ndarray:
        return self._steps("GH", "G", v)

    def _steps(self, history: str, plain: str, v: Vertex) -> np.ndarray:
        kind, n, at = self.w.locate(v)
        if at is not None:
            return self.arrays[f"{history}_{n}"][at:at + self.T]
        if plain == "V" and kind == "X":
            return self.inputs[v.name]
        return self.arrays[f"{plain}_{n}"]


class _ResultViews:
    """Where a run's results lie in a workspace, found once: ``(name, view)`` for each loss's
    ``[T, B]`` values, each output (view None: a dense input, the caller's own array), each final
    state and each dense input's gradient; ``(name, view, learned)`` for each initial state's
    gradient, ``learned`` the parameter it also adds to (None when the state is not learned)."""

    def __init__(self, ws: "_Workspace"):
        w, T, a, g = ws.w, ws.T, ws.arrays, ws.w.g
        self.losses = [(l.name, ws.value_of(l.vertex)[:, :, 0]) for l in g.losses]
        self.outputs = [(v.name, None if w.locate(v)[0] == "X" else ws.value_of(v)) for v in g.outputs]
        self.finals = [(name, a[f"H_{w.names[name]}"][T:T + D]) for name, D in w.depth.items()]
        self.init_grads = [(name, a[f"GH_{w.names[name]}"][:D],
                            g.init_param_name(name) if g.vertices[name].init == "learned" else None)
                           for name, D in w.depth.items()]
        self.input_grads = [(v.name, ws.grad_of(v)) for v in g.inputs if v.kind == "input"]


# ------------------------------------------------------------ code writing


class Writer:
    """Writes ``whole_run(T, B, backward, arrays...)`` for a :class:`WholeRun`."""

    def __init__(self, w: WholeRun):
        self.w = w
        self.lines: list[str] = []
        self.after: list[str] = []  # lines for after the backward loop
        self.indent = 0
        self.skipped = _read_only_by_products(w)
        self.post = _over_all_steps(w, self.skipped)
        self.in_loop = [v for v in w.order if v.kind == "op" and v.name not in self.skipped and v not in self.post]
        self.batched: list[str] | None = None  # while writing a post vertex: its whole-array products

    def __call__(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def source(self) -> str:
        w = self.w
        self(f"# generated by unrolled.engines.compiled.wholestep for graph '{w.g.name}'; kernels: unrolled.engines.compiled.kernels.rows")
        self("# names: " + ", ".join(f"{w.names[v.name]}={v.name}" for v in w.order))
        head = ["T", "B", "backward", "scan"] + [f"P_{pn}" for pn in w.pnames.values()] + [n for n, _, _ in w.feeds]
        self(f"def whole_run({', '.join(head)}ARGS):")
        self.indent = 1
        self._scan(head)
        for name in w.depth:  # the histories start with the initial states (and hold a dense input)
            n = w.names[name]
            self(f"copy_steps(H_{n}[:{w.depth[name]}], IN_{n})")
            if w.g.vertices[name].kind == "input":
                self(f"copy_steps(H_{n}[{w.depth[name]}:], X_{n})")
        self("for t in range(T):")
        self("    for b in range(B):")
        self.indent = 3
        for v in self.in_loop:
            self(f"# {_said(v)}")
            self._forward(v)
        for v in self.post:
            self._all_steps(v, _said(v), self._forward)
        self.indent = 1
        self("total = 0.0")
        for l in w.g.losses:
            n = w.names[l.vertex.name]
            self(f"total += masked_sum(V_{n}, M_{n}) / N_{n}")
        self("if backward == 0:")
        self("    return total")
        self("GRADS[:] = 0")
        for l in w.g.losses:  # the seeds: d total / d loss[t, b]
            n = w.names[l.vertex.name]
            self(f"seed_loss(G_{n}, M_{n}, N_{n})")
        for i, v in enumerate(w.g.outputs):
            self(f"add_steps({self.steps(v, grad=True)}, OG_{i})")
        for name, D in w.depth.items():
            self(f"add_steps(GH_{w.names[name]}[T:], FS_{w.names[name]})")
        for v in reversed(self.post):
            if BACKWARD.get(v.op, True) is not None:
                self._all_steps(v, f"d {v.name}", self._backward)
        self.indent = 1
        self("for t in range(T - 1, -1, -1):")
        self("    for b in range(B):")
        self.indent = 3
        body = len(self.lines)
        for v in reversed(self.in_loop):
            if BACKWARD.get(v.op, True) is not None:
                self(f"# d {v.name}")
                self._backward(v)
        if len(self.lines) == body:
            self("pass")
        self.indent = 1
        for line in self.after:  # weight and bias gradients: sums over all rows of all steps
            self(line)
        self("return total")
        text = "\n".join(self.lines) + "\n"
        names = sorted(set(_NAME.findall(text)) - set(head))
        return ("@numba.njit(cache=True, nogil=True, error_model=\"numpy\")\n"
                + text.replace("ARGS", "".join(", " + n for n in names)))

    def _all_steps(self, v: Vertex, comment: str, rule) -> None:
        """Post vertex ``v``'s ``rule`` (forward or backward) over all rows of all steps, in a loop of
        its own: its products with dense operands as one matrix product each (``self.batched``),
        where the step loop would make ``T·B`` matrix-vector products reading the weight every time;
        the rest row by row."""
        self.indent = 1
        self(f"# {comment}, all steps")
        head = len(self.lines)
        self("for t in range(T):")
        self("    for b in range(B):")
        self.indent, self.batched = 3, []
        rule(v)
        self.indent = 1
        if len(self.lines) == head + 2:  # every part went to a whole-array product
            del self.lines[head:]
        for line in self.batched:
            self(line)
        self.batched = None

    def every_step(self, v, grad: bool = False) -> str | None:
        """While writing a post vertex: ``v``'s values (or gradients) for all steps as one matrix of
        ``T·B`` rows, when ``v`` is a vertex; else None (row by row, as in the step loop)."""
        if self.batched is None or not isinstance(v, Vertex):
            return None
        return f"{self.steps(v, grad)}.reshape(T * B, {v.size})"

    def _scan(self, head: list[str]) -> None:
        """With ``scan``, a NaN or infinity in a parameter, a dense input, an initial state or a
        gradient given from outside ends the run at once, ``FLAG[0]`` set: the caller then names it."""
        checked = [n for n in head if n.split("_")[0] in ("P", "X", "IN", "OG", "FS")]
        if not checked:
            return
        self("if scan != 0:")
        self("    if not (" + " and ".join(f"all_finite({n})" for n in checked) + "):")
        self("        FLAG[0] = 1")
        self("        return 0.0")
        self("    FLAG[0] = 0")

    # ---- where things are

    def row(self, v, t: str = "t") -> str:
        """The expression of vertex (or parameter) ``v``'s row b at step t."""
        if isinstance(v, Param):
            return f"P_{self.w.pnames[v.name]}"
        kind, n, at = self.w.locate(v)
        return f"H_{n}[{t} + {at}, b]" if at is not None else f"{kind}_{n}[{t}, b]"

    def steps(self, v, grad: bool = False) -> str:
        """The expression of vertex ``v``'s values (or gradients) for all steps, ``[T, B, F]``."""
        kind, n, at = self.w.locate(v)
        if at is not None:
            return f"{'GH' if grad else 'H'}_{n}[{at}:{at} + T]"
        return f"G_{n}" if grad else f"{kind}_{n}"

    def parts(self, x) -> list[tuple]:
        """A product's input as (part, first column): a concatenation's parts, else the input whole.
        The product reads and differentiates the parts directly; the concatenation's own value and
        gradient still serve any other vertex that reads it."""
        if isinstance(x, Vertex) and x.kind == "op" and x.op == "concat":
            out, at = [], 0
            for part in x.args:
                out.append((part, at))
                at += part.size
            return out
        return [(x, 0)]

    @staticmethod
    def picks(part) -> bool:
        """Whether ``part`` is a one-hot vector of an index input (a product with it is a column)."""
        return isinstance(part, Vertex) and part.kind == "op" and part.op == "one_hot"

    def grow(self, v, t: str = "t") -> str | None:
        """Where vertex (or parameter) ``v``'s gradient (row b at step t) accumulates; None: nowhere."""
        if isinstance(v, Param):
            return f"D_{self.w.pnames[v.name]}"
        kind, n, at = self.w.locate(v)
        if kind == "I" or (v.kind == "op" and v.op == "one_hot"):
            return None
        return f"GH_{n}[{t} + {at}, b]" if at is not None else f"G_{n}[{t}, b]"

    # ---- forward

    def _forward(self, v: Vertex) -> None:
        if v.op in ELEMENTWISE:
            a = [self.row(x) for x in v.args]
            self(f"{v.op}_row({self.row(v)}, {', '.join(a + ([repr(v.attrs['c'])] if takes_c(v.op) else []))})")
        else:
            FORWARD[v.op](self, v)

    def _forward_product(self, v: Vertex) -> None:
        y = self.row(v)
        self(f"set_row({y}, {self.row(v.args[2])})" if v.op == "linear" else f"zero_row({y})")
        W = f"P_{self.w.pnames[v.args[0].name]}"
        for part, at in self.parts(v.args[1]):
            if self.picks(part):  # a one-hot vector picks one column
                self(f"add_column({y}, {W}, {at} + {self.row(part.args[0])})")
            # after the rows' biases and columns, which the loop sets first
            elif (x := self.every_step(part)) is not None:
                self.batched.append(f"matmul_add({x}, {W}[:, {at}:{at + part.size}].T, {self.every_step(v)})")
            else:
                self(f"add_dot_rows({y}, {W}, {at}, {self.row(part)}, {part.size}, {v.size})")

    def _forward_copies(self, v: Vertex) -> None:
        """slice and concat: copies of columns."""
        y, op = self.row(v), v.op
        starts = [v.attrs["start"]] if op == "slice" else [0] * len(v.args)
        at = 0
        for x, start in zip(v.args, starts):
            n = v.size if op == "slice" else x.size
            self(f"copy_row({y}, {at}, {self.row(x)}, {start}, {n})")
            at += n

    def _forward_kernel(self, v: Vertex) -> None:
        """one_hot, embedding, mse: one row kernel, ``{op}_row(y, operands...)``."""
        self(f"{ROW_KERNELS[v.op]}({', '.join([self.row(v)] + [self.row(x) for x in v.args])})")

    def _forward_cross_entropy(self, v: Vertex) -> None:
        a = [self.row(x) for x in v.args]
        self(f"cross_entropy_row({self.row(v)}, {a[0]}, {a[1]}, PR_{self.w.names[v.name]}[t, b])")

    # ---- backward

    def _backward(self, v: Vertex) -> None:
        if v.op in ELEMENTWISE:
            self._backward_elementwise(v)
        else:
            BACKWARD[v.op](self, v)

    def _backward_product(self, v: Vertex) -> None:
        g = self.grow(v)
        W = f"P_{self.w.pnames[v.args[0].name]}"
        D = self.grow(v.args[0])
        for part, at in self.parts(v.args[1]):
            if self.picks(part):
                self.after.append(f"product_dw_picks({D}, {at}, {self.steps(part.args[0])}, "
                                  f"{self.steps(v, grad=True)})")
                continue
            d = self.grow(part)
            dx = self.every_step(part, grad=True) if d is not None else None
            if dx is not None:
                self.batched.append(f"matmul_add({self.every_step(v, grad=True)}, {W}[:, {at}:{at + part.size}], {dx})")
            elif d is not None:
                self(f"product_dx_row({d}, {g}, {W}, {at}, {part.size}, {v.size})")
            if isinstance(part, Param):
                self(f"product_dw_row({D}, {at}, {self.row(part)}, {g})")
            else:
                g_all, x_all = (f"{self.steps(u, grad=u is v)}.reshape(T * B, {u.size})" for u in (v, part))
                self.after.append(f"matmul_add({g_all}.T, {x_all}, {D}[:, {at}:{at + part.size}])")
        if v.op == "linear":
            if isinstance(v.args[2], Param):
                self.after.append(f"add_rows_to({self.grow(v.args[2])}, {self.steps(v, grad=True)})")
            else:
                self(f"add_to_row({self.grow(v.args[2])}, 0, {g}, 0, {v.size})")

    def _backward_cross_entropy(self, v: Vertex) -> None:
        d = self.grow(v.args[0])
        if d is not None:
            self(f"cross_entropy_back_row({d}, {self.grow(v)}[0], PR_{self.w.names[v.name]}[t, b], "
                 f"{self.row(v.args[1])})")

    def _backward_mse(self, v: Vertex) -> None:
        g, F, a = self.grow(v), v.args[0].size, [self.row(x) for x in v.args]
        for x, sign in zip(v.args, ("", "-")):
            d = self.grow(x)
            if d is not None:
                self(f"mse_back_row({d}, {sign}2.0 * {g}[0] / {F}, {a[0]}, {a[1]})")

    def _backward_copies(self, v: Vertex) -> None:
        """slice and concat: each operand's columns of the gradient added back."""
        g, op = self.grow(v), v.op
        starts = [v.attrs["start"]] if op == "slice" else [0] * len(v.args)
        at = 0
        for x, start in zip(v.args, starts):
            n, d = (v.size if op == "slice" else x.size), self.grow(x)
            if d is not None:
                self(f"add_to_row({d}, {start}, {g}, {at}, {n})")
            at += n

    def _backward_embedding(self, v: Vertex) -> None:
        self(f"embedding_back_row({self.grow(v.args[0])}, {self.row(v.args[1])}, {self.grow(v)})")

    def _backward_elementwise(self, v: Vertex) -> None:
        """Each operand's share through the row kernels rendered from the op's VJP formulas."""
        g, op = self.grow(v), v.op
        rows = {**{f"x{i}": self.row(x) for i, x in enumerate(v.args)}, "y": self.row(v),
                "c": repr(v.attrs.get("c"))}
        for i, x in enumerate(v.args):
            d = self.grow(x)
            if d is not None:
                needed = reads(OPS[op].formula.vjp[i])
                self(f"{back_kernel(op, i)}({', '.join([d, g] + [rows[n] for n in needed])})")


# The structural ops the whole-run function writes, each by its rule above (row kernels of
# kernels/rows.py), looked up by op name; every elementwise op runs too, through row kernels
# rendered from its formula (fuse.row_kernels). None: the op passes no gradient.
FORWARD = {"matmul": Writer._forward_product, "linear": Writer._forward_product,
           "slice": Writer._forward_copies, "concat": Writer._forward_copies,
           "one_hot": Writer._forward_kernel, "embedding": Writer._forward_kernel,
           "mse": Writer._forward_kernel, "cross_entropy": Writer._forward_cross_entropy}
BACKWARD = {"matmul": Writer._backward_product, "linear": Writer._backward_product,
            "slice": Writer._backward_copies, "concat": Writer._backward_copies, "one_hot": None,
            "embedding": Writer._backward_embedding, "mse": Writer._backward_mse,
            "cross_entropy": Writer._backward_cross_entropy}
ROW_KERNELS = {"one_hot": "one_hot_row", "embedding": "embedding_row", "mse": "mse_row"}
SUPPORTED = ELEMENTWISE | frozenset(FORWARD)  # the ops a whole-run function runs


_NAME = re.compile(r"\b(?:D_p\d+|(?:H|GH|V|G|PR)_v\d+|GRADS|FLAG)\b")


def _said(v: Vertex) -> str:
    """A vertex as the generated code's comments name it: ``name = op(arguments)``."""
    return f"{v.name} = {v.op}({', '.join(a.name for a in v.args)})"


def _read_only_by_products(w: WholeRun) -> set[str]:
    """Concatenations and one-hot vectors that only products read: the products read their parts
    (and pick columns for one-hot parts) directly, so these need no value and pass no gradient."""
    readers: dict[str, list[tuple[Vertex, int]]] = {}
    for v in w.order:
        for i, a in enumerate(getattr(v, "args", ()) or ()):
            if isinstance(a, Vertex):
                readers.setdefault(a.name, []).append((v, i))
    for d in w.g.delays:
        readers.setdefault(d.source.name, []).append((d, 0))
    kept = {v.name for v in w.g.outputs} | set(w.depth)
    skipped: set[str] = set()
    for op in ("concat", "one_hot"):  # a concatenation first: a one-hot part may then go too
        for v in w.order:
            if v.kind == "op" and v.op == op and v.name not in kept and all(
                    (r.kind == "op" and r.op in ("matmul", "linear") and i == 1) or r.name in skipped
                    for r, i in readers.get(v.name, [])):
                skipped.add(v.name)
    return skipped


def _over_all_steps(w: WholeRun, skipped: set[str]) -> list[Vertex]:
    """The vertices the whole-run function runs over all steps at once, after the step loop (their
    gradients before the backward loop): those that read the recurrent core but never feed it
    (readouts, losses; plan.py's 'post'), in step order. None when one of them is read through a
    delay: its steps would then depend on each other, and the loop keeps them all."""
    from .plan import phases

    phase = phases(w.g)
    post = [v for v in w.order if v.kind == "op" and phase[v.name] == "post" and v.name not in skipped]
    return [] if any(v.name in w.depth for v in post) else post


def _arguments(code: str) -> list[str]:
    """The workspace arrays ``whole_run`` takes, after ``T, B, backward``, the parameters and the feeds."""
    head = next(line for line in code.splitlines() if line.startswith("def whole_run("))
    names = [s.strip() for s in head[head.index("(") + 1: head.rindex(")")].split(",")]
    return [n for n in names if _NAME.fullmatch(n)]
