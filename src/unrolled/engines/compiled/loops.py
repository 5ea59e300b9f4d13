"""The step loops of one recurrent core: generated Python over NumPy, or the same loops under Numba.

:class:`StepLoops` writes the two loops (forward, backward) from the plan
(``code``; ``jit_code`` for Numba, whose products call NumPy's own BLAS and
whose runs of elementwise vertices are one fused kernel each, fuse.py), and
runs a batch's rows through them (forward.py, backward.py). It chooses
between the NumPy and the Numba loop per batch size (:meth:`StepLoops.jit_choice`),
and how many steps a chunk of the loops holds (:meth:`StepLoops.steps_per_chunk`).
"""

from __future__ import annotations

import functools
import linecache

import numpy as np

from unrolled.engines.compiled.kernels.blas import product
from unrolled.engines.compiled.kernels.jitcache import jit_turned_off, load_jit_loops, load_module, numba_refusal
from unrolled.engines.runio import CopyCounts, Feeds, RunResult
from unrolled.graph.folded import Graph, Vertex
from unrolled.graph.ops import ELEMENTWISE

from . import fuse, weights
from .backward import Run
from .codegen import INLINE, Writer, header, with_arguments
from .forward import OPS, row_kernels
from .kernels.layouts import Kernel, step_kernels
from .plan import Plan, plan

JIT_AUTO_LIMIT = 4096  # "auto" JITs a run when rows x the widest core vertex is at most this: call-bound steps
CHUNK_BYTES = 4 << 20  # per-chunk buffers of the loops (Y, GF) stay below this: see StepLoops.steps_per_chunk
CHUNK_ROWS = 2048  # ... unless a chunk would hold fewer rows than this, which a weight product runs slowly on


class StepLoops:
    """One recurrent core's step loops: written once, run on NumPy or (where it pays) on Numba.

    ``jit``: True, False, "auto" (Numba for runs whose steps are small, or at every size when
    its products reach NumPy's BLAS), or "fuse" (the NumPy loops, calling fused Numba kernels);
    ``chunk_steps``: steps per chunk (None: as many as ``CHUNK_BYTES`` holds)."""

    def __init__(self, graph: Graph, jit: bool | str = "auto", chunk_steps: int | None = None):
        self.graph = graph
        self.chunk_steps = chunk_steps
        self.plan = plan(graph)
        self.copies = CopyCounts(graph)  # combine="mean"'s divisors, per (T, given_init)
        self.jit = jit
        self.jit_why = _jit_refusal(jit, self.plan)  # why the Numba loop may not run, or None
        self.fuse_why = _fuse_refusal(jit)  # why the NumPy loop calls no fused kernels, or None
        self.writer = Writer(graph, self.plan, fused=self.fuse_why is None)
        fwd, bwd = self.writer.sources()
        self.code = header(self.writer) + fwd + "\n" + bwd
        if self.writer.kernels.functions:
            self.kernel_code = self.writer.kernels.module()
        self._namespace: dict | None = None  # the NumPy loops, built on first use (see namespace)
        self.jit_writer = None  # the Numba loops' writer, made with jit_code
        self._jit_namespace: dict | None = None
        self._jit_code: str | None = None
        self._buffers: dict = {}  # part -> ((T, B, dtype), that run's arrays by name)
        self._weight_arrays: dict = {}  # the weights' pieces (weights.py), rewritten by each run
        self.picked_only = _picked_only(graph, self.plan, self.writer.skip)

    @property
    def cores(self) -> list[StepLoops]:
        """The step loops a run runs: this one's (a staged run has one per stage)."""
        return [self]

    def uses_jit(self, B: int) -> bool:
        """Whether a run over batches of ``B`` rows takes the Numba loop."""
        return self.jit_choice(B)[0]

    def jit_choice(self, B: int) -> tuple[bool, str]:
        """Whether these loops run ``B`` rows on the Numba loop, and why, in words."""
        if self.jit_why is not None:
            return False, self.jit_why
        if self.jit is True:
            return True, "jit=True"
        # Numba calling NumPy's own BLAS wins at every size (no interpreter between the steps, one
        # thread pool); through SciPy's BLAS, or without BLAS, only where calls cost more than products
        if _views_to_blas():
            return True, "its products call NumPy's own BLAS, which wins at every size"
        widest = max((v.size for v in self.plan.of("core")), default=0)
        n = B * widest
        if n <= JIT_AUTO_LIMIT:
            return True, f"{B} rows x the widest core vertex {widest} = {n} <= JIT_AUTO_LIMIT ({JIT_AUTO_LIMIT})"
        return False, (f"{B} rows x the widest core vertex {widest} = {n} > JIT_AUTO_LIMIT ({JIT_AUTO_LIMIT}) "
                       f"and the Numba loop's products do not reach NumPy's BLAS")

    def reasons(self, T: int, B: int, dtype) -> list[str]:
        """How these loops run ``B`` rows: which loop, fused kernels, chunks; and why."""
        jit, why = self.jit_choice(B)
        out = [f"{'Numba' if jit else 'NumPy'} loop, {B} rows: {why}"]
        kernels = self.jit_kernels() if jit else self.writer.kernels
        if kernels.functions:
            out.append(f"{len(kernels.functions)} fused kernel(s) for runs of elementwise vertices")
        elif not jit and self.fuse_why is not None:
            out.append(f"no fused kernels: {self.fuse_why}")
        else:
            out.append("no fused kernels: no run of elementwise vertices to fuse")
        k, why = self._chunk(T, B, dtype)
        out.append(f"all {T} steps in one chunk" if k >= T else f"chunks of {k} of {T} steps: {why}")
        return out

    def layout_reasons(self, B: int, dtype) -> list[str]:
        """Which layout of its weight each core product's step reads, forward and back, and on which
        library, in words: what the Numba loop runs over ``B`` rows on this thread's product
        threads, measured now where not yet (kernels/layouts.py). The plain NumPy loops read the
        copies."""
        if not self.uses_jit(B):
            return []
        out = []
        for name, s in self.plan.split.items():
            fwd, bwd = step_kernels(B, len(s.core_cols), self.graph.vertices[name].size, dtype)
            ahead = ("W through a transposed view" if fwd.transposed else "its transposed copy") + _on(fwd)
            back = ("the copy through a transposed view" if bwd.transposed else "W as kept") + _on(bwd)
            out.append(f"step products of {name}: forward reads {ahead}, backward {back} (the faster on "
                       f"this machine where a product is large enough to time: kernels/layouts.py)")
        return out

    def steps_per_chunk(self, T: int, B: int, dtype) -> int:
        """How many steps the loops run between two visits to the weights.

        The loop-free halves of split products (``Y``) and the gradients of
        every product's output (``GF``) are the only per-step buffers that
        nothing needs outside a stretch of steps: a chunk's ``Y`` is computed
        just before the forward loop runs it, and a chunk's weight gradients
        are taken just after the backward loop leaves it. Holding ``K`` steps
        of them instead of ``T`` is what keeps long sequences in memory
        (1000 steps of a 256-wide LSTM: 8 MiB instead of 125), and a small
        chunk is one that stays in the caches between the loop that writes it
        and the weight product that reads it. ``K * B`` rows are kept at
        ``CHUNK_ROWS`` or more, so that the weight products still run at full
        speed, and the chunks of a run are of one length (within a step).
        """
        return self._chunk(T, B, dtype)[0]

    def _chunk(self, T: int, B: int, dtype) -> tuple[int, str]:
        """:meth:`steps_per_chunk`, and which bound set it, in words (for :meth:`reasons`)."""
        if self.chunk_steps is not None:
            return min(T, self.chunk_steps), f"chunk_steps={self.chunk_steps}"
        p, w = self.plan, self.writer
        width = sum(v.size for v in p.of("core") if v.kind == "op" and v.name not in p.depth
                    and (v.name in p.split or w.has_full_grad(v)))
        in_bytes = CHUNK_BYTES // (B * max(width, 1) * np.dtype(dtype).itemsize)
        for_rows = -(-CHUNK_ROWS // B)
        k = max(1, min(T, max(in_bytes, for_rows)))
        k = -(-T // -(-T // k))  # the same number of chunks, of equal length: no short last one
        if for_rows > max(1, in_bytes):
            return k, f"a weight product needs CHUNK_ROWS ({CHUNK_ROWS}) rows, {k} steps of {B}"
        return k, f"CHUNK_BYTES ({CHUNK_BYTES} bytes) holds {k} steps of the per-step buffers"

    def jit_kernels(self):
        """The fused kernels the Numba loop calls (its writer's; written, not compiled, on first use)."""
        self.jit_code  # noqa: B018  (writes the Numba loops' text, and with it their writer)
        return self.jit_writer.kernels

    @property
    def jit_code(self) -> str:
        """The step loops as Numba compiles them (``code`` is the same loops in plain NumPy)."""
        if self._jit_code is None:
            writer = self.jit_writer = Writer(self.graph, self.plan, jit=True, fused=fuse.available())
            fwd, bwd = writer.sources()
            kernels = writer.kernels.generic() + "\n" if writer.kernels.functions else ""
            self._jit_code = header(writer) + kernels + with_arguments(fwd) + "\n" + with_arguments(bwd)
        return self._jit_code

    def jit_namespace(self) -> dict:
        """The Numba-compiled loops, built on first use (compiling takes seconds; Numba caches it on disk)."""
        if self._jit_namespace is None:
            self._jit_namespace = load_jit_loops(self.jit_code)
        return self._jit_namespace

    @property
    def namespace(self) -> dict:
        """The plain NumPy loops and what they call, built on first use: loading their fused kernels
        imports Numba, which an engine that starts on other loops (background.py) need not pay for."""
        if self._namespace is None:
            ns = self._compile(self.code)
            if self.writer.kernels.functions:
                ns.update(load_module(self.kernel_code, "fused"))
            self._namespace = ns
        return self._namespace

    def _compile(self, source: str) -> dict:
        filename = f"<unrolled compiled {self.graph.name} {id(self):x}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        ns = {name: getattr(np, name) for name in (
            "add", "subtract", "multiply", "negative", "exp", "reciprocal", "tanh", "maximum",
            "copyto", "concatenate", "greater")}
        ns["matmul"] = product  # the step products go where the whole-sequence ones go: one thread pool
        ns["matmul_add"] = lambda a, b, out: product(a, b, out=out, accumulate=True)
        ns["step_matmul"] = lambda lib, a, b, out: product(a, b, out=out)  # the flags: always 0 here
        ns["step_matmul_add"] = lambda lib, a, b, out: product(a, b, out=out, accumulate=True)
        for v in self.plan.of("core"):  # the ops whose NumPy rules the loops call (codegen's F_, J_)
            if v.kind == "op" and (v.op not in INLINE or v.op in ELEMENTWISE and v.op not in Writer.NATIVE):
                spec, attrs = OPS[v.op], dict(v.attrs)
                n = self.writer.names[v.name]
                ns[f"F_{n}"] = lambda args, spec=spec, attrs=attrs: spec.forward(args, attrs)
                ns[f"J_{n}"] = lambda g, args, out, spec=spec, attrs=attrs: spec.vjp(g, args, out, attrs)
        ns["add_rows"] = row_kernels(self.writer.fuse)[0]
        exec(compile(source, filename, "exec"), ns)
        return ns

    def compile_jit(self) -> None:
        """Load the Numba loops now (a row split does, once, before its threads would each try)."""
        self.jit_namespace()

    def weights(self, params, dtype, backward: bool) -> dict[str, np.ndarray]:
        """The pieces of the weights a run's products read (weights.py), from ``params``."""
        return weights.derive(self.plan, self.writer.names, params, dtype, backward, self._weight_arrays)

    def run(self, params, feeds: Feeds, combine: str, backward: bool, part: int = 0,
            shared: dict[str, np.ndarray] | None = None) -> RunResult:
        """One run over the rows of ``feeds``, in this thread; ``part`` picks its set of buffers;
        ``shared``: the weights' pieces (:meth:`weights`) when made once for several parts."""
        with np.errstate(under="ignore", over="ignore"):
            if shared is None:
                shared = self.weights(params, feeds.dtype, backward)
            run = Run(self, params, feeds, shared, part)
            run.forward()
            result = run.collect()
            if backward:
                run.backward(result, combine)
        return result

    def buffers(self, T: int, B: int, dtype, part: int = 0) -> dict:
        """The arrays of a run over ``T`` steps of ``B`` rows, kept for the next run of that shape.

        One set per part of a batch split across threads (``part``), each for
        the last shape it ran: a training run keeps one shape."""
        key = (T, B, np.dtype(dtype).str)
        held = self._buffers.get(part)
        if held is None or held[0] != key:
            held = self._buffers[part] = (key, {})
        return held[1]


@functools.cache  # asked on every run; the answer is fixed at import (and importing Numba is deferred)
def _views_to_blas() -> bool:
    """Whether the Numba loops' products reach NumPy's BLAS, which takes strided and transposed views."""
    from unrolled.engines.compiled.kernels.arrays import BLAS_NAME

    return BLAS_NAME == "numpy"


def _jit_refusal(jit, p: Plan) -> str | None:
    """Why this graph may not take the Numba loop, or None. (``jit="fuse"`` allows fused kernels only.)"""
    if jit == "fuse":
        return "jit='fuse': the NumPy loops, with fused kernels"
    unsupported = {v.op for v in p.of("core") if v.kind == "op" and v.op not in INLINE}
    return numba_refusal(jit, unsupported, "the JIT loop, inside the recurrent core,")


def _fuse_refusal(jit) -> str | None:
    """Why the plain NumPy loop calls no fused kernels, or None when it may (fuse.py)."""
    if jit is False:
        return "jit=False"
    if jit_turned_off():
        return "UNROLLED_JIT=0 turns Numba off"
    if not fuse.available():
        return 'Numba is not installed (pip install "unrolled[fast]")'
    return None


def _picked_only(g: Graph, p: Plan, unbuilt: set[str]) -> set[str]:
    """One-hot vertices read only as the row picks of split products (directly or through concatenations
    the loop never builds): never built as ``[T*B, V]`` matrices."""
    picked = {s.pre[0][0].name for s in p.split.values() if s.tokens is not None}
    picked -= {v.name for v in g.outputs}
    for u in p.order:
        if u.kind == "delay":
            picked.discard(u.source.name)
        elif u.kind == "op" and u.name not in unbuilt and (u.name not in p.split or p.split[u.name].tokens is None):
            picked -= {a.name for a in u.args if isinstance(a, Vertex)}
    return picked


def _on(kernel: Kernel) -> str:
    """The library a step product runs on, in words, where not the default."""
    return " on NumPy's BLAS" if kernel.numpy_blas else ""
