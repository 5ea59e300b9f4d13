"""One run of the step loops, forward: the batched phases here, the loops in generated code.

The plan (plan.py) splits the graph into ``pre`` (computed once for all ``T*B``
rows before the loop), the recurrent ``core`` (the generated step loops) and
``post`` (once after). :class:`ForwardRun` holds one run's arrays and runs the
forward pass over them; :class:`unrolled.engines.compiled.backward.Run` adds
BPTT. The loops it calls are a :class:`unrolled.engines.compiled.loops.StepLoops`'s,
handed down to it: this module imports nothing above it.
"""

from __future__ import annotations

import functools

import numpy as np

from unrolled.engines.compiled.kernels.blas import kept, product
from unrolled.engines.compiled.kernels.layouts import DEFAULT, step_kernels
from unrolled.engines.runio import Feeds, RunResult, as_state
from unrolled.graph.folded import Param, Vertex
from unrolled.graph.ops import with_product

from .plan import Split

OPS = with_product(product)  # the op table, its matmul and linear on blas.product


class ForwardRun:
    """One run's arrays and its forward pass: the batched phases run here, the loops in generated code."""

    def __init__(self, loops, params, feeds: Feeds, weights: dict[str, np.ndarray], part: int = 0):
        """``loops``: the :class:`~unrolled.engines.compiled.loops.StepLoops` whose generated loops,
        plan and kept buffers this run uses (``part``: which set of buffers, one per thread);
        ``weights``: the pieces of its weights the products read (weights.py), shared by the parts
        of a row split."""
        self.loops, self.params, self.f, self.weights = loops, params, feeds, weights
        self.p, self.w, self.g = loops.plan, loops.writer, loops.graph
        self.T, self.B, self.dtype = feeds.T, feeds.B, feeds.dtype
        self.buf = loops.buffers(self.T, self.B, self.dtype, part)
        self.use_jit = loops.uses_jit(self.B)
        self.X: dict[str, np.ndarray] = {}  # pre/post values, [T, B, F] (or [T, B] indices)
        self.K = loops.steps_per_chunk(self.T, self.B, self.dtype)
        self.chunks = [(t0, min(t0 + self.K, self.T)) for t0 in range(0, self.T, self.K)]

    # ---- buffers

    def alloc(self, name: str, shape) -> np.ndarray:
        return kept(self.buf, name, shape, self.dtype)

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
        if self.p.is_view(v):
            return self.value(v.args[0])[:, :, v.attrs["start"]:v.attrs["stop"]]
        n = self.w.names[v.name]
        if D is not None:
            return self.buf[f"H_{n}"][D:]
        return self.buf[f"V_{n}"]

    # ---- forward

    def forward(self) -> None:
        picked = self.loops.picked_only
        for v in self.p.batched("pre"):
            if v.name not in picked:
                self._batched_forward(v)
        self._prepare_loop()
        for t0, t1 in self.chunks:
            for v, s in self.pre_products:
                self._pre_product(v, s, t0, t1)
            self._call("forward_loop", t0, t1)
        for v in self.p.batched("post"):
            self._batched_forward(v)

    def _call(self, fn: str, t0: int, t1: int) -> None:
        try:
            if self.use_jit:
                self.loops.jit_namespace()[fn](t0, t1, self.bind)
            else:
                # buffers and parameters become globals of the generated functions: the fastest lookup there is
                ns = self.loops.namespace
                ns.update(self.bind)
                ns[fn](t0, t1, self.B, self.buf, self.params)
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
        args = [self.params[a.name] if isinstance(a, Param) else flat(self.value(a)) for a in v.args]
        if v.op == "cross_entropy" and self.w.fuse:  # the softmax kept: its gradient is one Numba pass
            from unrolled.engines.compiled.kernels.rows import cross_entropy_rows

            Z, K = args[0], np.ascontiguousarray(args[1].reshape(-1), dtype=np.int64)
            nll, probs = np.empty((Z.shape[0], 1), dtype=Z.dtype), np.empty_like(Z)
            cross_entropy_rows(nll, Z, K, probs)
            self.X[v.name], self.X[f"softmax:{v.name}"] = nll.reshape(T, B, 1), (probs, K)
            return
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
        self.pre_products: list[tuple[Vertex, Split]] = []  # (vertex, split) whose Y each chunk fills
        suffix = "f32" if self.dtype == np.float32 else "f64"
        bind["KIND"] = np.float32 if self.dtype == np.float32 else np.float64  # the Numba loop's kernels' precision
        for name in w.kernels.names():  # fused kernels come in the run's precision
            bind[name] = self.loops.namespace[f"{name}_{suffix}"]
        for v in p.of("core"):
            n = w.names[v.name]
            if v.name in p.depth:
                D = p.depth[v.name]
                H = self.alloc(f"H_{n}", (D + T, B, v.size))
                H[:D] = self.f.init[v.name]
                bind[f"H_{n}"] = H
            elif v.name in p.stored:
                bind[f"V_{n}"] = self.alloc(f"V_{n}", (T, B, v.size))
            elif v.kind == "op" and not p.is_view(v):
                bind[f"S_{n}"] = self.alloc(f"S_{n}", (B, v.size))
            if v.name in p.split:
                s = p.split[v.name]
                bind[f"W_{n}"], bind[f"WT_{n}"] = self.weights[f"W_{n}"], self.weights[f"WT_{n}"]
                # which one each reads, and on which library, as measured on this machine
                # (kernels/layouts.py); the plain NumPy loops, which run while Numba compiles, read
                # the copies and measure nothing
                fwd, bwd = step_kernels(B, len(s.core_cols), v.size, self.dtype) if self.use_jit else (DEFAULT,) * 2
                bind[f"FT_{n}"], bind[f"BT_{n}"] = int(fwd.transposed), int(bwd.transposed)
                bind[f"FL_{n}"], bind[f"BL_{n}"] = int(fwd.numpy_blas), int(bwd.numpy_blas)
                if len(s.core) > 1:
                    bind[f"C_{n}"] = self.alloc(f"C_{n}", (B, len(s.core_cols)))
                    bind[f"CG_{n}"] = self.alloc(f"CG_{n}", (B, len(s.core_cols)))
                if s.tokens is not None:
                    bind[f"WX_{n}"] = self.weights[f"WX_{n}"]
                    bind[f"TOK_{n}"] = np.ascontiguousarray(self.value(s.tokens), dtype=np.intp)
                elif s.pre:
                    bind[f"Y_{n}"] = self.alloc(f"Y_{n}", (self.K, B, v.size))
                    self.pre_products.append((v, s))
        for v in p.order:
            if p.phase[v.name] == "pre" and v.kind != "index" and v.name not in self.loops.picked_only:
                bind[f"X_{w.names[v.name]}"] = self.X[v.name]
        self.bind = bind

    def _pre_product(self, v: Vertex, s: Split, t0: int, t1: int) -> None:
        """The loop-free half of a split product for steps t0..t1-1: ``W[:, pre] · x_pre + b``, into ``Y``."""
        n = self.w.names[v.name]
        Y = self.bind[f"Y_{n}"][:t1 - t0].reshape(-1, v.size)
        product(self._pre_inputs(v, s)[t0 * self.B: t1 * self.B], self.weights[f"WpT_{n}"], out=Y)
        if s.bias:
            Y += self.params[s.bias]

    def _pre_inputs(self, v: Vertex, s: Split) -> np.ndarray:
        """``x_pre`` for all steps, ``[T*B, F]``: what the product reads, and its weight gradient too."""
        key = f"prex:{v.name}"
        if key not in self.X:
            for part, _, _ in s.pre:
                if part.name not in self.X:  # a one-hot matrix the loop did without (picked_only)
                    self._batched_forward(part)
            xs = [flat(self.value(part)) for part, _, _ in s.pre]
            self.X[key] = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=1)
        return self.X[key]

    def collect(self, outputs=None) -> RunResult:
        """The run's result; ``outputs``: the names of the outputs to hand out (all the graph's when
        None). A stage's exports are not among them: the next stage reads them in place."""
        g, T, f = self.g, self.T, self.f
        step_losses = {l.name: self.value(l.vertex)[:, :, 0] * f.masks[l.name] for l in g.losses}
        loss = sum(float(step_losses[l.name].sum(dtype=np.float64)) / f.norms[l.name] for l in g.losses)
        wanted = g.outputs if outputs is None else [g.vertices[n] for n in outputs]
        outputs = {v.name: self._output(v) for v in wanted}
        finals = {}
        for name, D in self.p.depth.items():
            v = g.vertices[name]
            hist = self.buf[f"H_{self.w.names[name]}"] if self.p.phase[name] == "core" else self._history(v)
            finals[name] = as_state(np.array(hist[T:T + D]))
        return RunResult(loss=loss, outputs=outputs, step_losses=step_losses, final_states=finals)

    def _output(self, v: Vertex) -> np.ndarray:
        """``v``'s value for the caller: a copy where it shares memory with a buffer the next run
        writes over, or with what the caller passed in; a vertex computed after the loop is
        usually a new array of this run, handed over as it is (at long runs, a copy of
        ``[T, B, F]`` logits is as large as a kept state)."""
        value = self.value(v)
        if self.p.phase[v.name] != "post" or any(np.may_share_memory(value, a) for a in self._owned()):
            return np.array(value)
        return value

    def _owned(self):
        """Every array the run did not make for itself: kept buffers, the caller's inputs and parameters."""
        f = self.f
        yield from self.buf.values()
        for group in (f.inputs, f.init, self.params):
            yield from group.values()


def flat(a: np.ndarray) -> np.ndarray:
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def slot(index: int, D: int, ring: bool) -> int:
    return index % (D + 1) if ring else index


@functools.cache  # asked on every run: its import statement costs more than the lookup
def row_kernels(numba_ok: bool):
    """(add_rows, scatter_add_rows): Numba's where the engine may use it; else NumPy's pick and no scatter
    (NumPy's ``add.at`` is slower than the dense product with the one-hot rows it would replace)."""
    if numba_ok:
        from unrolled.engines.compiled.kernels.arrays import add_rows, scatter_add_rows

        return add_rows, scatter_add_rows
    return (lambda out, W, idx: np.add(out, W[idx], out=out)), None
