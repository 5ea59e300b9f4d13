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
        self.products = {a.name for v in self.order if v.kind == "op" and v.op in ("matmul", "linear")
                         for a in v.args[:1]}  # weights read transposed, their gradients kept so
        self.code = _Writer(self).source()
        self.arguments = _arguments(self.code)  # the arrays whole_run takes, after T, B and backward
        self._fn = None

    # ---- running

    def run(self, params, f: Feeds, combine: str, backward: bool) -> RunResult:
        if self._fn is None:
            from .jitcache import _load_module

            self._fn = _load_module("import numba\nfrom unrolled.rowkernels import *  # noqa: F401,F403\n\n"
                                    + self.code, "whole")["whole_run"]
        arrays = self._arrays(params, f)
        self._fn(f.T, f.B, 1 if backward else 0, *[arrays[n] for n in self.arguments])
        return self._result(arrays, params, f, combine, backward)

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
                if v.op == "cross_entropy":  # the softmax its gradient needs
                    a[f"PR_{n}"] = np.empty((T, B, v.args[0].size), dtype=dt)
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
        self(f"# generated by unrolled.wholestep for graph '{w.g.name}'; kernels: unrolled.rowkernels")
        self("# names: " + ", ".join(f"{w.names[v.name]}={v.name}" for v in w.order))
        self("def whole_run(T, B, backward, ARGS):")
        self.indent = 1
        self("for t in range(T):")
        self("    for b in range(B):")
        self.indent = 3
        for v in w.order:
            if v.kind == "op":
                self(f"# {v.name} = {v.op}({', '.join(a.name for a in v.args)})")
                self._forward(v)
        self.indent = 1
        self("if backward == 0:")
        self("    return")
        self("for t in range(T - 1, -1, -1):")
        self("    for b in range(B):")
        self.indent = 3
        body = len(self.lines)
        for v in reversed(w.order):
            if v.kind == "op" and v.op != "one_hot":
                self(f"# d {v.name}")
                self._backward(v)
        if len(self.lines) == body:
            self("pass")
        text = "\n".join(self.lines) + "\n"
        names = sorted(set(_NAME.findall(text)))
        return ("@numba.njit(cache=True, nogil=True, error_model=\"numpy\")\n"
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
        y, op = self.row(v), v.op
        a = [self.row(x) for x in v.args]
        if op in ("matmul", "linear"):
            WT = f"PT_{self.w.pnames[v.args[0].name]}"
            self(f"linear_row({y}, {a[1]}, {WT}, {a[2]})" if op == "linear" else f"product_row({y}, {a[1]}, {WT})")
        elif op in ("add", "sub", "mul", "tanh", "sigmoid", "relu", "one_minus", "one_hot"):
            self(f"{op}_row({y}, {', '.join(a)})")
        elif op == "scale":
            self(f"scale_row({y}, {a[0]}, {v.attrs['c']!r})")
        elif op in ("identity", "slice", "concat"):
            starts = [v.attrs["start"]] if op == "slice" else [0] * len(a)
            at = 0
            for x, e, start in zip(v.args, a, starts):
                n = v.size if op == "slice" else x.size
                self(f"copy_row({y}, {at}, {e}, {start}, {n})")
                at += n
        elif op == "embedding":
            self(f"embedding_row({y}, {a[0]}, {a[1]})")
        elif op == "cross_entropy":
            self(f"cross_entropy_row({y}, {a[0]}, {a[1]}, PR_{self.w.names[v.name]}[t, b])")
        elif op == "mse":
            self(f"mse_row({y}, {a[0]}, {a[1]})")

    # ---- backward

    def _backward(self, v: Vertex) -> None:
        g, op = self.grow(v), v.op
        a = [self.row(x) for x in v.args]
        da = [self.grow(x) for x in v.args]
        if op in ("matmul", "linear"):
            pn = self.w.pnames[v.args[0].name]
            if da[1] is not None:
                self(f"product_dx_row({da[1]}, {g}, P_{pn})")
            self(f"product_dw_row(DT_{pn}, {a[1]}, {g})")
            if op == "linear":
                self(f"add_to_row({da[2]}, 0, {g}, 0, {v.size})")
        elif op == "cross_entropy":
            if da[0] is not None:
                self(f"cross_entropy_back_row({da[0]}, {g}[0], PR_{self.w.names[v.name]}[t, b], {a[1]})")
        elif op == "mse":
            F = v.args[0].size
            for d, sign in zip(da, ("", "-")):
                if d is not None:
                    self(f"mse_back_row({d}, {sign}2.0 * {g}[0] / {F}, {a[0]}, {a[1]})")
        elif op in ("identity", "slice", "concat", "add"):
            starts = [v.attrs["start"]] if op == "slice" else [0] * len(a)
            at = 0
            for x, d, start in zip(v.args, da, starts):
                n = v.size if op in ("slice", "add") else x.size
                if d is not None:
                    self(f"add_to_row({d}, {start}, {g}, {at}, {n})")
                at += 0 if op == "add" else n
        elif op == "sub":
            if da[0] is not None:
                self(f"add_to_row({da[0]}, 0, {g}, 0, {v.size})")
            if da[1] is not None:
                self(f"sub_from_row({da[1]}, {g})")
        elif op == "mul":
            for d, other in zip(da, reversed(a)):
                if d is not None:
                    self(f"mul_back_row({d}, {g}, {other})")
        elif op == "scale":
            if da[0] is not None:
                self(f"scale_back_row({da[0]}, {g}, {v.attrs['c']!r})")
        elif op in ("tanh", "sigmoid"):
            if da[0] is not None:
                self(f"{op}_back_row({da[0]}, {g}, {self.row(v)})")
        elif op == "relu":
            if da[0] is not None:
                self(f"relu_back_row({da[0]}, {g}, {a[0]})")
        elif op == "one_minus":
            if da[0] is not None:
                self(f"sub_from_row({da[0]}, {g})")
        elif op == "embedding":
            self(f"embedding_back_row({da[0]}, {a[1]}, {g})")


_NAME = re.compile(r"\b(?:(?:P|PT|D|DT)_p\d+|(?:H|GH|X|I|V|G|PR)_v\d+)\b")


def _arguments(code: str) -> list[str]:
    head = next(line for line in code.splitlines() if line.startswith("def whole_run("))
    return [s.strip() for s in head[head.index("(") + 1: head.rindex(")")].split(",")][3:]
