"""One run of the step loops, backward: BPTT over the arrays the forward pass kept.

:class:`Run` is a :class:`~unrolled.engines.compiled.forward.ForwardRun` that can
also back-propagate: the backward loop carries only gradients of core values,
and each weight gradient is one product over a chunk's rows after it.
"""

from __future__ import annotations

import functools

import numpy as np

from unrolled.engines.compiled.kernels.blas import aligned_empty, aligned_zeros, kept, product
from unrolled.engines.compiled.kernels.libraries import weight_gradient
from unrolled.engines.runio import RunResult, as_state
from unrolled.graph.folded import Param, Vertex
from unrolled.graph.ops import unbroadcast

from .forward import OPS, ForwardRun, flat, row_kernels, slot
from .plan import Split
from .weights import offsets, wanted


class Run(ForwardRun):
    """One run over a batch's rows: :meth:`forward`, :meth:`collect`, then (for gradients) :meth:`backward`."""

    def backward(self, result: RunResult, combine: str) -> None:
        T, B, p, w, f = self.T, self.B, self.p, self.w, self.f
        self.GX: dict[str, np.ndarray] = {}  # gradient of pre/post vertices, [T, B, F]
        self.grads = {k: aligned_zeros(v.shape, self.dtype) for k, v in self.params.items()}  # products write there
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
        self.pre_grads: dict[tuple, tuple] = {}  # (vertex, offset) -> (pre part, [T, B, F]): the loop's gradients of pre vertices through split products
        for t0, t1 in reversed(self.chunks):
            self._start_chunk(t0, t1)
            self._call("backward_loop", t0, t1)
            self._loop_param_grads(t0, t1)
        self._loop_outside_grads()
        for v in reversed(p.batched("pre")):
            self._batched_backward(v)
        self._finish(result, combine)

    def _add_grad(self, v: Vertex, g: np.ndarray) -> None:
        """Accumulate a whole-sequence gradient ``[T, B, F]`` into vertex ``v`` (or what it slices)."""
        if self.p.is_view(v) and self.p.phase[v.name] == "core":
            base, (lo, hi) = self.p.viewed(v)
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
        kept = self.X.get(f"softmax:{v.name}")
        if kept is not None:  # cross-entropy from the softmax (and targets) its forward pass kept
            from unrolled.engines.compiled.kernels.rows import cross_entropy_back_rows

            probs, K = kept
            dZ = probs  # the softmax is read once, here: its gradient takes its place (row by row, in order)
            del self.X[f"softmax:{v.name}"]
            cross_entropy_back_rows(dZ, np.ascontiguousarray(flat(g), dtype=self.dtype), probs, K)
            if v.args[0].name in self.p.wants_grad:
                self._add_grad(v.args[0], dZ.reshape(T, B, -1))
            return
        if self._product_into_history(v, g):
            return
        args = [self.params[a.name] if isinstance(a, Param) else flat(self.value(a)) for a in v.args]
        try:
            grads = OPS[v.op].vjp(flat(g), args, flat(self.value(v)), dict(v.attrs, dtype=self.dtype))
        except (FloatingPointError, ValueError) as e:
            raise RuntimeError(f"while differentiating vertex '{v.name}' = {v.op}(...): {e}") from e
        for a, ga in zip(v.args, grads):
            if ga is None:
                continue
            if isinstance(a, Param):
                self.grads[a.name] += unbroadcast(ga, self.params[a.name].shape)
            elif a.name in self.p.wants_grad:
                self._add_grad(a, ga.reshape(T, B, -1))

    def _product_into_history(self, v: Vertex, g: np.ndarray) -> bool:
        """A post-phase product of a weight and a delayed core vertex (an output layer reading a
        state): its input gradient is added by the product itself into the vertex's gradient
        history, and its weight gradient into the weight's, so no ``[T, B, F]`` array of its own
        is made for either. (Beside a long run's kept values it was the largest one.)"""
        if v.op not in ("matmul", "linear") or not all(isinstance(a, Param) for a in v.args[::2]):
            return False
        x = v.args[1]
        if not isinstance(x, Vertex) or x.name not in self.p.wants_grad or self.p.phase[x.name] != "core" \
                or x.name not in self.p.depth or self.p.is_view(x) or self.w.in_ring(x):
            return False
        D, T, B = self.p.depth[x.name], self.T, self.B
        history = self.buf[f"GH_{self.w.names[x.name]}"][D:D + T]  # zeroed and sized in backward()
        gf = np.ascontiguousarray(flat(g), dtype=self.dtype)
        W = v.args[0].name
        product(gf, self.params[W], out=history.reshape(T * B, x.size), accumulate=True)
        weight_gradient(gf, flat(self.value(x)), self.grads[W])
        if v.op == "linear":
            add_column_sums(gf, self.grads[v.args[2].name])
        return True

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
            if v.name in p.depth:
                D = p.depth[v.name]
                GH = self.buf[f"GH_{n}"]  # zeroed, holding the post-phase gradients (see backward)
                if v.name in f.final_state_grads:
                    fs = f.final_state_grads[v.name]
                    for k in range(D):  # the last D steps, at indexes T .. T+D-1
                        GH[slot(T + k, D, w.in_ring(v))] += fs[k]
                bind[f"GH_{n}"] = GH
            elif v.kind == "op" and not p.is_view(v):
                if w.has_full_grad(v):
                    Y = self.buf.get(f"Y_{n}")
                    if Y is not None and Y.shape == (self.K, B, v.size):
                        GF = Y  # the pre-loop half is spent after the forward loop: reuse its memory
                    else:
                        GF = self.alloc(f"GF_{n}", (self.K, B, v.size))
                    bind[f"GF_{n}"] = GF
                else:
                    bind[f"G_{n}"] = self.alloc(f"G_{n}", (B, v.size))
        # gradients the loop sends to pre vertices (and pre delays), one [T, B, F] buffer each
        for target, rng in w.contributions():
            if p.phase[target.name] != "core":
                n = w.names[target.name]
                key = f"GX_{n}"
                if key not in bind:
                    bind[key] = self.alloc(key, (T, B, target.size))
        if self.use_jit:
            self.loops.jit_namespace()
            w = self.loops.jit_writer  # its loops may use other temporaries than the NumPy loop's
        for width in w.temp_widths:
            bind[f"T{width}"] = self.alloc(f"T{width}", (B, width))
        for width in w.mask_widths:
            bind[f"M_{width}"] = kept(self.buf, f"M_{width}", (B, width), bool)
        self.bind = bind

    def _start_chunk(self, t0: int, t1: int) -> None:
        """Seed a chunk's product-output gradients: what the post phase sent to steps t0..t1-1, else zeros."""
        w = self.w
        for v in self.p.of("core"):
            if v.kind == "op" and not self.p.is_view(v) and v.name not in self.p.depth and w.has_full_grad(v):
                GF = self.bind[f"GF_{w.names[v.name]}"][:t1 - t0]
                post = self.core_grad.get(v.name)
                if post is not None:
                    GF[...] = post[t0:t1]
                elif w.post_grad(v):
                    GF[...] = 0

    def _loop_param_grads(self, t0: int, t1: int) -> None:
        """Each loop weight's gradient over a chunk's steps, as one product over its rows; and the
        loop's gradients of pre vertices through split products."""
        p, w, B = self.p, self.w, self.B
        rows = slice(t0 * B, t1 * B)
        for v in p.weighted():
            n = w.names[v.name]
            if not p.is_view(v) and w.has_full_grad(v) and v.name not in p.depth:
                G = self.bind[f"GF_{n}"][:t1 - t0]
            elif v.name in p.depth:
                D = p.depth[v.name]
                G = self.bind[f"GH_{n}"][D + t0: D + t1]
            else:
                G = None
            if v.name in p.split:
                s = p.split[v.name]
                Gf = G.reshape(-1, v.size)
                for part, lo, hi in s.core:
                    weight_gradient(Gf, flat(self.value(part))[rows], self.grads[s.W][:, lo:hi])
                if s.pre:
                    self._pre_param_grads(v, s, Gf, t0, t1)
                if s.bias:
                    add_column_sums(Gf, self.grads[s.bias])
            else:
                args = [self.params[a.name] if isinstance(a, Param) else flat(self.value(a))[rows] for a in v.args]
                gs = OPS[v.op].vjp(G.reshape(-1, v.size), args, flat(self.value(v))[rows],
                                   dict(v.attrs, dtype=self.dtype))
                for a, ga in zip(v.args, gs):
                    if isinstance(a, Param) and ga is not None:
                        self.grads[a.name] += unbroadcast(ga, self.params[a.name].shape)

    def _pre_param_grads(self, v: Vertex, s: Split, Gf: np.ndarray, t0: int, t1: int) -> None:
        """The loop-free half's weight gradient over a chunk, and its gradient to the pre vertices that want one.

        With one pre part (a layer's input), both products write where their
        result goes: the weight gradient added into its columns, the input's
        gradient into its steps."""
        p, B = self.p, self.B
        scatter = row_kernels(self.w.fuse)[1]
        if s.tokens is not None and scatter is not None:
            # one-hot rows: each row's gradient lands on its token's column, no product with zeros
            dWpT = np.zeros((len(s.pre_cols), v.size), dtype=self.dtype)
            scatter(dWpT, self.bind[f"TOK_{self.w.names[v.name]}"][t0:t1].reshape(-1), Gf)
            self._add_pre_columns(s, dWpT, transposed=True)
        elif len(s.pre) == 1:
            _, lo, hi = s.pre[0]
            weight_gradient(Gf, self._pre_inputs(v, s)[t0 * B: t1 * B], self.grads[s.W][:, lo:hi])
        else:
            self._add_pre_columns(s, product(Gf.T, self._pre_inputs(v, s)[t0 * B: t1 * B]))
        want = wanted(p, s)
        for part, off, width in want:
            key = (v.name, off)
            if key not in self.pre_grads:
                self.pre_grads[key] = (part, aligned_empty((self.T, B, width), self.dtype))
        if not want:
            return
        Wp = self.weights[f"Wp_{self.w.names[v.name]}"]
        if len(want) == 1 and want[0][2] == len(s.pre_cols):  # the input's gradient is the whole product
            steps = self.pre_grads[(v.name, want[0][1])][1][t0:t1]
            product(Gf, Wp, out=steps.reshape(-1, steps.shape[2]))
        else:
            gx = product(Gf, Wp).reshape(t1 - t0, B, -1)
            for part, off, width in want:
                self.pre_grads[(v.name, off)][1][t0:t1] = gx[:, :, off:off + width]

    def _add_pre_columns(self, s: Split, dWp: np.ndarray, transposed: bool = False) -> None:
        """Add the loop-free half's weight gradient ``[out, pre columns]`` (``transposed``: ``[pre
        columns, out]``, as the one-hot scatter makes it) into the weight's columns."""
        for (part, lo, hi), off in zip(s.pre, offsets(s.pre)):
            if transposed:  # NumPy's add of a transposed view strides through memory; the kernel blocks it
                from unrolled.engines.compiled.kernels.arrays import add_transposed

                add_transposed(self.grads[s.W][:, lo:hi], dWp[off:off + hi - lo])
            else:
                self.grads[s.W][:, lo:hi] += dWp[:, off:off + hi - lo]

    def _loop_outside_grads(self) -> None:
        """After all chunks: the gradients the loop sent outside it, and to the initial states."""
        p, w = self.p, self.w
        for part, g in self.pre_grads.values():
            self._add_grad(part, g)
        outside = {t.name: t for t, _ in w.contributions() if p.phase[t.name] != "core"}
        for target in outside.values():
            self._add_grad(target, self.bind[f"GX_{w.names[target.name]}"])
        for name, D in p.depth.items():
            if p.phase[name] == "core":
                # the initial states' slots, 0 .. D-1 in a ring (slot(k) = k for k < D) as in a history;
                # a view: _finish copies it out
                first = self.bind[f"GH_{w.names[name]}"][:D]
                ig = self.init_grads.get(name)
                self.init_grads[name] = first if ig is None else ig + first

    def _finish(self, result: RunResult, combine: str) -> None:
        g, f, T = self.g, self.f, self.T
        # learned initial states: the parameter fills every initial slot it was not overridden in
        for name, D in self.p.depth.items():
            v = g.vertices[name]
            ig = self.init_grads.get(name)
            if not isinstance(ig, np.ndarray):  # none sent (np.isscalar costs more than the rest)
                ig = np.zeros((D, self.B, v.size), dtype=self.dtype)
            self.init_grads[name] = ig
            if v.init == "learned" and name not in f.given_init:
                self.grads[g.init_param_name(name)] += ig.sum(axis=(0, 1))
        copies = self.loops.copies(T, f.given_init) if combine == "mean" else {}
        for name, grad in self.grads.items():
            if copies.get(name):
                grad /= copies[name]  # the run's own array, made in backward()
            result.grads[name] = grad.astype(self.dtype, copy=False)
        for v in g.inputs:
            if v.kind == "input":
                gx = self.GX.get(v.name)
                result.input_grads[v.name] = (np.zeros((T, self.B, v.size), dtype=self.dtype) if gx is None
                                              else np.array(gx, dtype=self.dtype))
        for name, ig in self.init_grads.items():
            result.init_grads[name] = as_state(np.array(ig, dtype=self.dtype))


def add_column_sums(G: np.ndarray, out: np.ndarray) -> None:
    """``out += G.sum(axis=0)`` (a bias's gradient over all rows), as the product of a row of ones
    and ``G`` added into ``out`` by BLAS itself: NumPy's reduction over rows adds row after row
    into a new array, slower on a chunk's few thousand rows (benchmarks/RESULTS.md)."""
    product(_ones_row(G.shape[0], G.dtype.str), G, out=out.reshape(1, -1), accumulate=True)


@functools.lru_cache(maxsize=8)
def _ones_row(n: int, dtype: str) -> np.ndarray:
    ones = np.ones((1, n), dtype=dtype)
    ones.flags.writeable = False  # shared by every run of this many rows
    return ones
