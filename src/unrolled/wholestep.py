"""A small graph's whole run, forward and BPTT, as one compiled function.

When a step is tiny (a batch of one, a hundred units: min-char-rnn), a run
costs calls, not arithmetic: the compiled engine's phases, each a handful of
NumPy calls, and the Python between them take ten times what its compiled
step loop does. For such runs this module writes the whole run as one Numba
function: every vertex, step by step in the graph's step order, the losses,
then every vertex's gradient step by step in reverse, each weight's gradient
added where its step leaves it. Python only fills the inputs and the seeds in
and reads the results out.

Every value and gradient is kept for all steps (``[T, B, F]``, or
``[D + T, B, F]`` for a vertex read through delays: its initial states first);
at the sizes this serves that is a few kilobytes. A product reads its weight
transposed (``[in, out]``) so that each input adds one contiguous row, and a
zero input (a one-hot vector's 74 zeros) adds nothing; its weight gradient
accumulates in the same layout for the same reason.

:func:`supports` says which graphs it runs (elementwise ops, products,
concatenations, slices, one-hot and embedding inputs, cross-entropy and MSE
losses); the compiled engine uses it for those, when Numba may run and the
run is small (see ``CompiledEngine.uses_whole``), and its own phases otherwise.
The tests hold it to the reference engine like the others.
"""

from __future__ import annotations

import re

import numpy as np

from .graph import Graph, Param, Vertex
from .runio import Feeds, RunResult, as_state, parameter_copies

SUPPORTED = frozenset({"matmul", "linear", "add", "sub", "mul", "scale", "one_minus", "tanh", "sigmoid", "relu",
                       "identity", "concat", "slice", "one_hot", "embedding", "cross_entropy", "mse"})


def supports(graph: Graph) -> bool:
    """Can :class:`WholeRun` run every vertex of this graph? (Not a delayed index input: rare, and
    its history would need an integer buffer of its own.)"""
    return (all(v.op in SUPPORTED for v in graph.step_order() if v.kind == "op")
            and all(graph.vertices[name].kind != "index" for name in graph.delayed()))


class WholeRun:
    """The generated function for one graph (``code``), and the Python that feeds it."""

    def __init__(self, graph: Graph):
        self.g = graph
        self.depth = graph.delayed()
        self.order = graph.step_order()
        self.names = {v.name: f"v{i}" for i, v in enumerate(self.order)}
        self.pnames = {name: f"p{i}" for i, name in enumerate(graph.params)}
        self.products = {a.name for v in self.order if v.kind == "op" and v.op in ("matmul", "linear")
                         for a in v.args[:1]}  # weights read transposed, their gradients kept so
        self.code = _Writer(self).source()
        self._fn = None

    # ---- running

    def run(self, params, f: Feeds, combine: str, backward: bool) -> RunResult:
        if self._fn is None:
            from .jitcache import _load_module

            self._fn = _load_module("import numba\nimport numpy as np\nfrom unrolled.jitkernels import "
                                    "_tanh1, _sigmoid1, _cast\n\n" + self.code, "whole")["whole_run"]
        arrays = self._arrays(params, f)
        self._fn(f.T, f.B, 1 if backward else 0, *[arrays[n] for n in self._argnames()])
        return self._result(arrays, params, f, combine, backward)

    def _argnames(self) -> list[str]:
        if not hasattr(self, "_args"):
            self._args = _arguments(self.code)
        return self._args

    def _arrays(self, params, f: Feeds) -> dict[str, np.ndarray]:
        T, B, dt = f.T, f.B, f.dtype
        a: dict[str, np.ndarray] = {}
        for name, pn in self.pnames.items():
            p = params[name]
            a[f"P_{pn}"] = p
            if name in self.products:
                a[f"PT_{pn}"] = np.ascontiguousarray(p.T)
                a[f"DT_{pn}"] = np.zeros(p.shape[::-1], dtype=dt)
            else:
                a[f"D_{pn}"] = np.zeros(p.shape, dtype=dt)
        for v in self.order:
            n = self.names[v.name]
            if v.kind == "index":
                a[f"I_{n}"] = f.inputs[v.name]
                continue
            D = self.depth.get(v.name)
            if D is not None:
                H = a[f"H_{n}"] = np.empty((D + T, B, v.size), dtype=dt)
                H[:D] = f.init[v.name]
                if v.kind == "input":
                    H[D:] = f.inputs[v.name]
                a[f"GH_{n}"] = np.zeros((D + T, B, v.size), dtype=dt)
            elif v.kind == "input":
                a[f"X_{n}"] = f.inputs[v.name]
                a[f"G_{n}"] = np.zeros((T, B, v.size), dtype=dt)
            else:
                a[f"V_{n}"] = np.empty((T, B, v.size), dtype=dt)
                a[f"G_{n}"] = np.zeros((T, B, v.size), dtype=dt)
        for l in self.g.losses:  # the seeds: d total / d loss[t, b]
            a[f"G_{self.names[l.vertex.name]}"][:, :, 0] = f.masks[l.name] / f.norms[l.name]
        for name, og in f.output_grads.items():
            self._grad_of(a, self.g.vertices[name], T)[...] += og
        for name, fs in f.final_state_grads.items():
            a[f"GH_{self.names[name]}"][T:] += fs
        return a

    def _value_of(self, a, v: Vertex, T: int) -> np.ndarray:
        """``v``'s values for all steps, ``[T, B, F]`` (a delay: its source's history, shifted)."""
        return self._steps(a, "H", "V", v, T)

    def _grad_of(self, a, v: Vertex, T: int) -> np.ndarray:
        return self._steps(a, "GH", "G", v, T)

    def _steps(self, a, history: str, plain: str, v: Vertex, T: int) -> np.ndarray:
        shift = 0
        if v.kind == "delay":
            v, shift = v.source, v.depth
        n = self.names[v.name]
        if v.name in self.depth:
            start = self.depth[v.name] - shift
            return a[f"{history}_{n}"][start:start + T]
        if plain == "V" and v.kind == "input":
            return a[f"X_{n}"]
        return a[f"{plain}_{n}"]

    def _result(self, a, params, f: Feeds, combine: str, backward: bool) -> RunResult:
        g, T = self.g, f.T
        step_losses = {l.name: self._value_of(a, l.vertex, T)[:, :, 0] * f.masks[l.name] for l in g.losses}
        loss = sum(float(step_losses[l.name].sum(dtype=np.float64)) / f.norms[l.name] for l in g.losses)
        outputs = {v.name: np.array(self._value_of(a, v, T)) for v in g.outputs}
        finals = {name: as_state(np.array(a[f"H_{self.names[name]}"][T:T + D])) for name, D in self.depth.items()}
        r = RunResult(loss=loss, outputs=outputs, step_losses=step_losses, final_states=finals)
        if not backward:
            return r
        grads = {}
        for name, pn in self.pnames.items():
            grads[name] = a[f"DT_{pn}"].T.copy() if name in self.products else a[f"D_{pn}"]
        for name, D in self.depth.items():
            ig = a[f"GH_{self.names[name]}"][:D]
            r.init_grads[name] = as_state(np.array(ig))
            if g.vertices[name].init == "learned" and name not in f.given_init:
                grads[g.init_param_name(name)] += ig.sum(axis=(0, 1))
        if combine == "mean":
            for name, copies in parameter_copies(g, T, f.given_init).items():
                grads[name] = grads[name] / copies
        r.grads = {name: grads[name].astype(f.dtype, copy=False) for name in g.params}
        for v in g.inputs:
            if v.kind == "input":
                r.input_grads[v.name] = np.array(self._grad_of(a, v, T))
        return r


# ------------------------------------------------------------ code writing


class _Writer:
    """Writes ``whole_run(T, B, backward, arrays...)`` for a :class:`WholeRun`."""

    def __init__(self, w: WholeRun):
        self.w = w
        self.lines: list[str] = []
        self.indent = 0

    def __call__(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def source(self) -> str:
        w = self.w
        self(f"# generated by unrolled.wholestep for graph '{w.g.name}'")
        self("# names: " + ", ".join(f"{w.names[v.name]}={v.name}" for v in w.order))
        self("def whole_run(T, B, backward, ARGS):")
        self.indent = 1
        self("for t in range(T):")
        self.indent = 2
        for v in w.order:
            if v.kind == "op":
                self(f"# {v.name} = {v.op}({', '.join(a.name for a in v.args)})")
                self("for b in range(B):")
                self.indent += 1
                self._forward(v)
                self.indent -= 1
        self.indent = 1
        self("if backward == 0:")
        self("    return")
        self("for t in range(T - 1, -1, -1):")
        self.indent = 2
        body = len(self.lines)
        for v in reversed(w.order):
            if v.kind == "op" and v.op != "one_hot":
                self(f"# d {v.name}")
                self("for b in range(B):")
                self.indent += 1
                self._backward(v)
                self.indent -= 1
        if len(self.lines) == body:
            self("pass")
        text = "\n".join(self.lines) + "\n"
        names = sorted(set(_NAME.findall(text)))
        return ("@numba.njit(cache=True, nogil=True, error_model=\"numpy\", fastmath={\"contract\"})\n"
                + text.replace("ARGS", ", ".join(names)))

    # ---- where things are

    def row(self, v, t: str = "t") -> str:
        """The expression of vertex (or parameter) ``v``'s row b at step t."""
        w = self.w
        if isinstance(v, Param):
            return f"P_{w.pnames[v.name]}"
        if v.kind == "delay":
            src = v.source
            return f"H_{w.names[src.name]}[{t} + {w.depth[src.name] - v.depth}, b]"
        n = w.names[v.name]
        if v.name in w.depth:
            return f"H_{n}[{t} + {w.depth[v.name]}, b]"
        if v.kind == "input":
            return f"X_{n}[{t}, b]"
        if v.kind == "index":
            return f"I_{n}[{t}, b]"
        return f"V_{n}[{t}, b]"

    def grow(self, v, t: str = "t") -> str | None:
        """Where vertex (or parameter) ``v``'s gradient (row b at step t) accumulates; None: nowhere."""
        w = self.w
        if isinstance(v, Param):
            return f"D_{w.pnames[v.name]}"
        if v.kind == "delay":
            src = v.source
            return None if src.kind == "index" else f"GH_{w.names[src.name]}[{t} + {w.depth[src.name] - v.depth}, b]"
        if v.kind == "index" or (v.kind == "op" and v.op == "one_hot"):
            return None
        n = w.names[v.name]
        if v.name in w.depth:
            return f"GH_{n}[{t} + {w.depth[v.name]}, b]"
        return f"G_{n}[{t}, b]"

    # ---- forward

    def _forward(self, v: Vertex) -> None:
        y, F, op = self.row(v), v.size, v.op
        a = [self.row(x) for x in v.args]
        if op in ("matmul", "linear"):
            WT = f"PT_{self.w.pnames[v.args[0].name]}"
            self(f"y = {y}; x = {a[1]}")
            self(f"for j in range({F}):")
            self(f"    y[j] = {a[2]}[j]" if op == "linear" else "    y[j] = 0")
            self(f"for k in range({v.args[1].size}):")
            self("    xk = x[k]")
            self("    if xk != 0:")
            self(f"        for j in range({F}):")
            self(f"            y[j] += {WT}[k, j] * xk")
        elif op in ("add", "sub", "mul"):
            sym = {"add": "+", "sub": "-", "mul": "*"}[op]
            self(f"y = {y}; a0 = {a[0]}; a1 = {a[1]}")
            self(f"for j in range({F}):")
            self(f"    y[j] = a0[j] {sym} a1[j]")
        elif op in ("scale", "one_minus", "tanh", "sigmoid", "relu", "identity"):
            formula = {"scale": f"x[j] * _cast({v.attrs.get('c')!r}, x[j])", "one_minus": "_cast(1.0, x[j]) - x[j]",
                       "tanh": "_tanh1(x[j])", "sigmoid": "_sigmoid1(x[j])",
                       "relu": "x[j] if x[j] > 0 else _cast(0.0, x[j])", "identity": "x[j]"}[op]
            self(f"y = {y}; x = {a[0]}")
            self(f"for j in range({F}):")
            self(f"    y[j] = {formula}")
        elif op == "concat":
            self(f"y = {y}")
            off = 0
            for x, e in zip(v.args, a):
                self(f"x = {e}")
                self(f"for j in range({x.size}):")
                self(f"    y[{off} + j] = x[j]")
                off += x.size
        elif op == "slice":
            self(f"y = {y}; x = {a[0]}")
            self(f"for j in range({F}):")
            self(f"    y[j] = x[{v.attrs['start']} + j]")
        elif op == "one_hot":
            self(f"y = {y}")
            self(f"for j in range({F}):")
            self("    y[j] = 0")
            self(f"y[{a[0]}] = 1")
        elif op == "embedding":
            self(f"y = {y}; k = {a[1]}")
            self(f"for j in range({F}):")
            self(f"    y[j] = {a[0]}[k, j]")
        elif op == "cross_entropy":
            n = v.args[0].size
            self(f"y = {y}; z = {a[0]}; k = {a[1]}")
            self("m = z[0]")
            self(f"for j in range(1, {n}):")
            self("    m = max(m, z[j])")
            self("s = 0.0")
            self(f"for j in range({n}):")
            self("    s += np.exp(z[j] - m)")
            self("y[0] = np.log(s) + m - z[k]")
        elif op == "mse":
            n = v.args[0].size
            self(f"y = {y}; p = {a[0]}; q = {a[1]}")
            self("s = 0.0")
            self(f"for j in range({n}):")
            self("    s += (p[j] - q[j]) * (p[j] - q[j])")
            self(f"y[0] = s / {n}")

    # ---- backward

    def _backward(self, v: Vertex) -> None:
        g, F, op = self.grow(v), v.size, v.op
        y = self.row(v)
        a = [self.row(x) for x in v.args]
        da = [self.grow(x) for x in v.args]
        self(f"g = {g}")
        if op in ("matmul", "linear"):
            pn = self.w.pnames[v.args[0].name]
            self(f"x = {a[1]}")
            if da[1] is not None:  # d x = W^T g, as rows of W scaled by g
                self(f"dx = {da[1]}")
                self(f"for j in range({F}):")
                self("    gj = g[j]")
                self("    if gj != 0:")
                self(f"        for k in range({v.args[1].size}):")
                self(f"            dx[k] += P_{pn}[j, k] * gj")
            self(f"for k in range({v.args[1].size}):")  # d W^T += x g^T, row by row of W^T
            self("    xk = x[k]")
            self("    if xk != 0:")
            self(f"        for j in range({F}):")
            self(f"            DT_{pn}[k, j] += xk * g[j]")
            if op == "linear":
                self(f"db = {da[2]}")
                self(f"for j in range({F}):")
                self("    db[j] += g[j]")
            return
        if op == "cross_entropy":
            n = v.args[0].size
            if da[0] is None:
                return
            self(f"z = {a[0]}; k = {a[1]}; dz = {da[0]}; gl = g[0]")
            self("m = z[0]")
            self(f"for j in range(1, {n}):")
            self("    m = max(m, z[j])")
            self("s = 0.0")
            self(f"for j in range({n}):")
            self("    s += np.exp(z[j] - m)")
            self(f"for j in range({n}):")
            self("    dz[j] += gl * (np.exp(z[j] - m) / s)")
            self("dz[k] -= gl")
            return
        if op == "mse":
            n = v.args[0].size
            self(f"p = {a[0]}; q = {a[1]}; c = g[0] * (2.0 / {n})")
            for i, sign in ((0, "+"), (1, "-")):
                if da[i] is not None:
                    self(f"d = {da[i]}")
                    self(f"for j in range({n}):")
                    self(f"    d[j] {sign}= c * (p[j] - q[j])")
            return
        if op == "concat":
            off = 0
            for x, d in zip(v.args, da):
                if d is not None:
                    self(f"d = {d}")
                    self(f"for j in range({x.size}):")
                    self(f"    d[j] += g[{off} + j]")
                off += x.size
            return
        if op == "slice":
            if da[0] is not None:
                self(f"d = {da[0]}")
                self(f"for j in range({F}):")
                self(f"    d[{v.attrs['start']} + j] += g[j]")
            return
        if op == "embedding":
            self(f"d = {da[0]}; k = {a[1]}")
            self(f"for j in range({F}):")
            self("    d[k, j] += g[j]")
            return
        rules = {  # d arg_i += rule, with y this vertex's row and a0, a1 its arguments' rows
            "add": ("g[j]", "g[j]"), "sub": ("g[j]", "-g[j]"), "mul": ("g[j] * a1[j]", "g[j] * a0[j]"),
            "scale": (f"g[j] * _cast({v.attrs.get('c')!r}, g[j])",), "one_minus": ("-g[j]",),
            "tanh": ("g[j] * (_cast(1.0, g[j]) - y[j] * y[j])",), "sigmoid": ("g[j] * y[j] * (_cast(1.0, g[j]) - y[j])",),
            "relu": ("g[j] if a0[j] > 0 else _cast(0.0, g[j])",), "identity": ("g[j]",),
        }[op]
        self(f"y = {y}; " + "; ".join(f"a{i} = {e}" for i, e in enumerate(a)))
        for i, rule in enumerate(rules):
            if da[i] is not None:
                self(f"d = {da[i]}")
                self(f"for j in range({F}):")
                self(f"    d[j] += {rule}")


_NAME = re.compile(r"\b(?:(?:P|PT|D|DT)_p\d+|(?:H|GH|X|I|V|G)_v\d+)\b")


def _arguments(code: str) -> list[str]:
    head = next(line for line in code.splitlines() if line.startswith("def whole_run("))
    return [s.strip() for s in head[head.index("(") + 1: head.rindex(")")].split(",")][3:]
