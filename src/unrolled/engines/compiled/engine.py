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
  show their lines). With Numba, the same loops are compiled
  (``engine.jit_code``): their products call NumPy's own BLAS (blas.py) and
  runs of elementwise vertices are one fused kernel each (fuse.py). That is
  the default at every size when NumPy's BLAS is found, and for small steps
  otherwise; the plain NumPy loops run everywhere else.
* **Rows in parallel.** Where oneDNN runs the products, a batch's rows are
  split across threads, each running its rows start to finish with
  one-thread products (rowsplit.py); ``threads=1`` keeps one run.

It returns exactly what the reference engine returns (``RunResult``), and
the tests hold the two to 1e-10 in float64 on random cyclic graphs.
"""

from __future__ import annotations

import functools
import linecache
import os
from dataclasses import dataclass, field

import numpy as np

from unrolled.engines.compiled.kernels.blas import aligned, aligned_empty, aligned_zeros, product
from unrolled.engines.compiled.kernels.jitcache import load_jit_loops, load_module, numba_refusal
from unrolled.engines.runio import Binding, Feeds, RunResult, as_state, check_combine, parameter_copies, prepare
from unrolled.graph.folded import Graph, Param, Vertex
from unrolled.graph.ops import ELEMENTWISE, unbroadcast, with_product

from . import fuse, rowsplit
from .codegen import INLINE, Writer, header, with_arguments
from .plan import Plan, Split, plan

OPS = with_product(product)  # the op table, its matmul and linear on blas.product


JIT_AUTO_LIMIT = 4096  # "auto" JITs a run when rows x the widest core vertex is at most this: call-bound steps
# "auto" runs the whole run as one Numba function when rows x the multiply-adds of a step's products
# (dense, per row) is at most this. The whole-run function's own loops beat a BLAS call only while a
# step's products are tiny, where the call's fixed cost dominates; above, BLAS's blocked kernels win.
# (A rule on rows x the widest vertex took the whole run where the loops were already faster.)
WHOLE_AUTO_MACS = 1 << 18
CHUNK_BYTES = 16 << 20  # per-chunk buffers of the loops (Y, GF) stay below this: see CompiledEngine.steps_per_chunk
# The ways a run can go, as CompiledEngine.strategies names them; tests/helpers.py runs a graph through each.
STRATEGIES = ("whole", "stages", "numba_loop", "numpy_loop", "fused", "row_split", "chunked")


# ------------------------------------------------------------------- engine


class CompiledEngine:
    """Runs a folded graph's forward pass and BPTT with generated step loops.

    Same interface and results as :class:`unrolled.engines.reference.ReferenceEngine`.
    ``engine.code`` is the generated loop source; ``engine.plan`` says which
    vertex runs in which phase. ``threads``: how many threads a batch's rows
    may be split across ("auto": as many as oneDNN uses, when it runs the
    products and each thread gets at least ``rowsplit.MIN_ROWS`` rows; 1: never).
    The engine runs the graph as it was when made: a graph changed since is
    refused (see :class:`unrolled.engines.runio.Binding`); make a new engine.
    ``engine.explain(T, B, dtype)`` says which strategy a run takes and why
    (one decision, :meth:`route`, serves it and :meth:`run`).
    """

    name = "compiled"

    def __init__(self, graph: Graph, jit: bool | str = "auto", chunk_steps: int | None = None,
                 whole: bool | str = "auto", threads: int | str = "auto"):
        self.graph = graph.check()
        self._binding = Binding.of(graph)
        if threads != "auto" and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be 'auto' or a whole number >= 1 (1: never split a batch's rows "
                             f"across threads), not {threads!r}")
        self.threads = threads  # a batch's rows split across threads (rowsplit.py): "auto", or at most this many
        from .stages import cut

        # the whole run as one Numba function, for small runs; else None, and why not in words
        self.whole, self._whole_why = _whole_run(graph, jit, whole)
        self._whole_forced = whole is True
        self._step_macs = _step_macs(graph)

        if chunk_steps is not None and (not isinstance(chunk_steps, int) or chunk_steps < 1):
            raise ValueError(f"chunk_steps must be a whole number of steps >= 1 (or None to size chunks "
                             f"by memory), not {chunk_steps!r}")
        self.chunk_steps = chunk_steps  # steps per chunk of the loops; None: as many as CHUNK_BYTES holds
        # several cycles run one after another, each in a loop of its own (see stages.py)
        parts = cut(graph)
        self.stages = ([(st, CompiledEngine(st.graph, jit=jit, chunk_steps=chunk_steps)) for st in parts]
                       if len(parts) > 1 else [])
        if self.stages:
            self.jit = jit
            self.code = "\n".join(eng.code for _, eng in self.stages)
            return
        self.plan = plan(graph)
        self.jit = jit  # True, False, or "auto": Numba for runs whose steps are small
        self._jit_why = _jit_refusal(jit, self.plan)  # why the Numba loop may not run, or None
        self._jit_ok = self._jit_why is None
        self._fuse_why = _fuse_refusal(jit)  # why the NumPy loop calls no fused kernels, or None
        self._writer = Writer(graph, self.plan, fused=self._fuse_why is None)
        fwd, bwd = self._writer.sources()
        self.code = header(self._writer) + fwd + "\n" + bwd
        self._namespace = self._compile(self.code)
        if self._writer.kernels.functions:
            self.kernel_code = self._writer.kernels.module()
            self._namespace.update(load_module(self.kernel_code, "fused"))
        self._jit_namespace: dict | None = None
        self._jit_code: str | None = None
        self._buffers: dict = {}  # part -> ((T, B, dtype), that run's arrays by name)
        self.picked_only = _picked_only(graph, self.plan, self._writer.skip)

    def uses_whole(self, B: int) -> bool:
        """Whether a run over batches of ``B`` rows is one compiled function (see wholestep.py)."""
        return self._whole_choice(B)[0]

    def _whole_choice(self, B: int) -> tuple[bool, str]:
        """Whether a run of ``B`` rows takes the whole-run function, and why, in words."""
        if self.whole is None:
            return False, self._whole_why
        if self._whole_forced:
            return True, "whole=True"
        macs = B * self._step_macs
        if macs <= WHOLE_AUTO_MACS:
            return True, (f"{B} rows x {self._step_macs} multiply-adds a step = {macs} "
                          f"<= WHOLE_AUTO_MACS ({WHOLE_AUTO_MACS}): a step's products are tiny")
        return False, (f"{B} rows x {self._step_macs} multiply-adds a step = {macs} "
                       f"> WHOLE_AUTO_MACS ({WHOLE_AUTO_MACS}): BLAS's products win there")

    def uses_jit(self, B: int) -> bool:
        """Whether a run over batches of ``B`` rows takes the Numba loop."""
        if self.stages:
            return any(eng.uses_jit(B) for _, eng in self.stages)
        return self._jit_choice(B)[0]

    def _jit_choice(self, B: int) -> tuple[bool, str]:
        """Whether this (one-stage) engine runs ``B`` rows on the Numba loop, and why, in words."""
        if not self._jit_ok:
            return False, self._jit_why
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

    def route(self, B: int, dtype) -> Route:
        """The one decision of how a run of ``B`` rows of ``dtype`` goes, with its reasons:
        :meth:`run` follows it and :meth:`explain` prints it, so the two cannot differ."""
        whole, why = self._whole_choice(B)
        if whole:
            return Route(True, None, [f"the whole-run function: {why}"])
        ranges, split_why = self._split(B, dtype)
        return Route(False, ranges, [f"not the whole-run function: {why}", split_why])

    def _split(self, B: int, dtype) -> tuple[list[tuple[int, int]] | None, str]:
        """The row ranges of :meth:`row_parts`, and why they are what they are, in words."""
        ranges = rowsplit.parts(B, dtype, self.threads)
        if ranges is None:
            return None, f"rows not split: {rowsplit.unsplit_reason(B, dtype, self.threads)}"
        # every stage: a stage on the NumPy loop would be shared by the parts
        if not all(e.uses_jit(hi - lo) for e in self._loop_engines() for lo, hi in ranges):
            return None, "rows not split: a part would run the NumPy loop, whose namespace the parts share"
        return ranges, f"rows split across {len(ranges)} threads: {[hi - lo for lo, hi in ranges]} rows each"

    def strategies(self, T: int, B: int, dtype) -> set[str]:
        """Which of :data:`STRATEGIES` a run of ``T`` steps over ``B`` rows of ``dtype`` takes:
        the whole-run function alone, or the step loops (Numba's or plain NumPy's, with fused
        kernels or not), per stage, per part of the rows, in one chunk of steps or several."""
        route = self.route(B, dtype)
        if route.whole:
            return {"whole"}
        out = {"stages"} if self.stages else set()
        ranges = route.ranges
        if ranges:
            out.add("row_split")
        for eng in self._loop_engines():
            for rows in ([hi - lo for lo, hi in ranges] if ranges else [B]):
                jit = eng.uses_jit(rows)
                out.add("numba_loop" if jit else "numpy_loop")
                if (eng.jit_kernels() if jit else eng._writer.kernels).functions:
                    out.add("fused")
                if eng.steps_per_chunk(T, rows, dtype) < T:
                    out.add("chunked")
        return out

    def explain(self, T: int, B: int, dtype=np.float32) -> str:
        """Which strategy a run of ``T`` steps over ``B`` rows of ``dtype`` takes, and why, in words.

        Read from :meth:`route` and the loops' own tests (``uses_jit``, ``steps_per_chunk``), the
        same the run follows; where a faster strategy cannot run the graph, it says what stops it.
        For the test suite's Elman network (``tests/helpers.py``), 10000 rows, oneDNN on two threads::

            >>> print(make_engine(elman()).explain(20, 10000))
            compiled engine, graph 'elman', 20 steps x 10000 rows of float32: numba_loop, row_split
            - not the whole-run function: 10000 rows x 40 multiply-adds a step = 400000 > WHOLE_AUTO_MACS (262144): ...
            - rows split across 2 threads: [5000, 5000] rows each
            - Numba loop, 5000 rows: its products call NumPy's own BLAS, which wins at every size
            - no fused kernels: no run of elementwise vertices to fuse
            - all 20 steps in one chunk

        With ``UNROLLED_JIT=0`` the same run says ``NumPy loop, 10000 rows: UNROLLED_JIT=0 turns Numba off``.
        """
        route = self.route(B, dtype)
        names = sorted(self.strategies(T, B, dtype), key=STRATEGIES.index)
        lines = [f"compiled engine, graph '{self.graph.name}', {T} steps x {B} rows of {np.dtype(dtype).name}: "
                 + ", ".join(names)]
        lines += [f"- {r}" for r in route.reasons]
        if route.whole:
            return "\n".join(lines)
        if self.stages:
            lines.append(f"- in {len(self.stages)} stages, one after another: the graph has {len(self.stages)} "
                         "recurrent cores that do not feed each other both ways (stages.py)")
        sizes = sorted({hi - lo for lo, hi in route.ranges}) if route.ranges else [B]
        for i, eng in enumerate(self._loop_engines()):
            stage = f"stage {i + 1}: " if self.stages else ""
            for rows in sizes:
                lines += [f"- {stage}{line}" for line in eng._loop_reasons(T, rows, dtype)]
        return "\n".join(lines)

    def _loop_reasons(self, T: int, B: int, dtype) -> list[str]:
        """How this one-stage engine's loops run ``B`` rows: which loop, fused kernels, chunks; and why."""
        jit, why = self._jit_choice(B)
        out = [f"{'Numba' if jit else 'NumPy'} loop, {B} rows: {why}"]
        kernels = self.jit_kernels() if jit else self._writer.kernels
        if kernels.functions:
            out.append(f"{len(kernels.functions)} fused kernel(s) for runs of elementwise vertices")
        elif not jit and self._fuse_why is not None:
            out.append(f"no fused kernels: {self._fuse_why}")
        else:
            out.append("no fused kernels: no run of elementwise vertices to fuse")
        k = self.steps_per_chunk(T, B, dtype)
        if k >= T:
            out.append(f"all {T} steps in one chunk")
        elif self.chunk_steps is not None:
            out.append(f"chunks of {k} of {T} steps: chunk_steps={self.chunk_steps}")
        else:
            out.append(f"chunks of {k} of {T} steps: CHUNK_BYTES ({CHUNK_BYTES} bytes) holds {k} steps "
                       "of the per-step buffers")
        return out

    def steps_per_chunk(self, T: int, B: int, dtype) -> int:
        """How many steps the loops run between two visits to the weights.

        The loop-free halves of split products (``Y``) and the gradients of
        every product's output (``GF``) are the only per-step buffers that
        nothing needs outside a stretch of steps: a chunk's ``Y`` is computed
        just before the forward loop runs it, and a chunk's weight gradients
        are taken just after the backward loop leaves it. Holding ``K`` steps
        of them instead of ``T`` is what keeps long sequences in memory
        (1000 steps of a 256-wide LSTM: 16 MiB instead of 125); ``K * B``
        rows are still plenty for the weight products to run at full speed.
        """
        if self.chunk_steps is not None:
            return min(T, self.chunk_steps)
        p, w = self.plan, self._writer
        width = sum(v.size for v in p.of("core") if v.kind == "op" and v.name not in p.depth
                    and (v.name in p.split or w.has_full_grad(v)))
        per_step = B * max(width, 1) * np.dtype(dtype).itemsize
        return max(1, min(T, CHUNK_BYTES // per_step))

    def jit_kernels(self):
        """The fused kernels the Numba loop calls (its writer's; written, not compiled, on first use)."""
        self.jit_code  # noqa: B018  (writes the Numba loops' text, and with it their writer)
        return self._jit_writer.kernels

    @property
    def jit_code(self) -> str:
        """The step loops as Numba compiles them (``code`` is the same loops in plain NumPy)."""
        if self.stages:
            return "\n".join(eng.jit_code for _, eng in self.stages)
        if self._jit_code is None:
            writer = self._jit_writer = Writer(self.graph, self.plan, jit=True, fused=fuse.available())
            fwd, bwd = writer.sources()
            kernels = writer.kernels.generic() + "\n" if writer.kernels.functions else ""
            self._jit_code = header(writer) + kernels + with_arguments(fwd) + "\n" + with_arguments(bwd)
        return self._jit_code

    def jit_namespace(self) -> dict:
        """The Numba-compiled loops, built on first use (compiling takes seconds; Numba caches it on disk)."""
        if self._jit_namespace is None:
            self._jit_namespace = load_jit_loops(self.jit_code)
        return self._jit_namespace

    def _compile(self, source: str) -> dict:
        filename = f"<unrolled compiled {self.graph.name} {id(self):x}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        ns = {name: getattr(np, name) for name in (
            "add", "subtract", "multiply", "negative", "exp", "reciprocal", "tanh", "maximum",
            "copyto", "concatenate", "greater")}
        ns["matmul"] = product  # the step products go where the whole-sequence ones go: one thread pool
        ns["matmul_add"] = lambda a, b, out: product(a, b, out=out, accumulate=True)
        for v in self.plan.of("core"):  # the ops whose NumPy rules the loops call (codegen's F_, J_)
            if v.kind == "op" and (v.op not in INLINE or v.op in ELEMENTWISE and v.op not in Writer.NATIVE):
                spec, attrs = OPS[v.op], dict(v.attrs)
                n = self._writer.names[v.name]
                ns[f"F_{n}"] = lambda args, spec=spec, attrs=attrs: spec.forward(args, attrs)
                ns[f"J_{n}"] = lambda g, args, out, spec=spec, attrs=attrs: spec.vjp(g, args, out, attrs)
        ns["add_rows"] = _row_kernels(self._writer.fuse)[0]
        exec(compile(source, filename, "exec"), ns)
        return ns

    # ------------------------------------------------------------- run

    def run(self, params, inputs=None, *, init_states=None, masks=None, combine: str = "sum",
            per_copy: bool = False, backward: bool = True, steps=None, batch=None,
            final_state_grads=None, output_grads=None, check_finite: bool = True) -> RunResult:
        """Forward and (unless ``backward=False``) BPTT; the arguments are :func:`unrolled.engines.reference.run`'s.

        ``init_states`` and ``RunResult.final_states`` are keyed by the vertex
        a delay reads and shaped by its deepest delay ``D``: ``[B, F]`` when
        D = 1, ``[D, B, F]`` (its last D values, oldest first) when D > 1.
        ``check_finite=False`` skips the scan of the caller's arrays for NaN
        and infinities (one pass over each; see :func:`unrolled.engines.runio.prepare`).
        """
        self._binding.check()
        check_combine(combine)
        if per_copy:
            raise ValueError("per-copy gradients come from the reference engine: use engine='reference'")
        feeds = prepare(self.graph, params, inputs, init_states, masks, steps=steps, batch=batch,
                        final_state_grads=final_state_grads, output_grads=output_grads,
                        check_finite=check_finite)
        params = feeds.params
        route = self.route(feeds.B, feeds.dtype)
        if route.whole:
            with np.errstate(under="ignore", over="ignore"):
                return self.whole.run(params, feeds, combine, backward)
        ranges = route.ranges
        if ranges:
            self._compiled_before_threads()
            return rowsplit.run(lambda part, i: self._run(params, part, combine, backward, i), feeds, ranges)
        return self._run(params, feeds, combine, backward)

    def row_parts(self, B: int, dtype) -> list[tuple[int, int]] | None:
        """The row ranges a run of ``B`` rows splits into across threads (rowsplit.py), or None.

        Only where the Numba loops run: the plain-NumPy loops share one namespace."""
        return self._split(B, dtype)[0]

    def _loop_engines(self) -> list[CompiledEngine]:
        """The engines whose loops a run runs: each stage's, or this one's."""
        return [e for _, e in self.stages] or [self]

    def _compiled_before_threads(self) -> None:
        """Load the Numba loops here, once, not in each thread at the same time."""
        for eng in self._loop_engines():
            eng.jit_namespace()

    def _run(self, params, feeds: Feeds, combine: str, backward: bool, part: int = 0) -> RunResult:
        """One run over the rows of ``feeds``, in this thread; ``part`` picks its set of buffers."""
        with np.errstate(under="ignore", over="ignore"):
            if self.stages:
                return self._run_stages(params, feeds, combine, backward, part)
            state = _RunState(self, params, feeds, part)
            state.forward()
            result = state.collect()
            if backward:
                state.backward(result, combine)
        return result

    def _run_stages(self, params, feeds: Feeds, combine, backward, part: int) -> RunResult:
        """Forward through the stages in order, then BPTT back through them in reverse: the
        gradient a stage sends to an input it imported is an output gradient of the stage before."""
        values = dict(feeds.inputs)
        runs = []
        for st, eng in self.stages:
            g = eng.graph
            sub = prepare(
                g, {k: params[k] for k in g.params}, {n: values[n] for n in st.imports},
                {k: v for k, v in feeds.init.items() if k in st.delayed and k in feeds.given_init},
                {k: v for k, v in feeds.masks.items() if k in g.vertices}, steps=feeds.T, batch=feeds.B,
                final_state_grads={k: v for k, v in feeds.final_state_grads.items() if k in st.delayed},
                output_grads={k: v for k, v in feeds.output_grads.items() if k in st.outputs},
                check_finite=False)  # the whole run's arrays were scanned
            sub.norms = {k: feeds.norms[k] for k in sub.norms}  # a part of the rows keeps the batch's divisors
            state = _RunState(eng, {k: params[k] for k in g.params}, sub, part)
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

    def buffers(self, T: int, B: int, dtype, part: int = 0) -> dict:
        """The arrays of a run over ``T`` steps of ``B`` rows, kept for the next run of that shape.

        One set per part of a batch split across threads (``part``), each for
        the last shape it ran: a training run keeps one shape."""
        key = (T, B, np.dtype(dtype).str)
        held = self._buffers.get(part)
        if held is None or held[0] != key:
            held = self._buffers[part] = (key, {})
        return held[1]


def _step_macs(graph: Graph) -> int:
    """Multiply-adds of one step's products for one row, counted dense (a one-hot input as a product)."""
    return sum(v.size * v.args[1].size for v in graph.step_order()
               if v.kind == "op" and v.op in ("matmul", "linear"))


def _whole_run(graph: Graph, jit, whole):
    """The graph's :class:`~unrolled.engines.compiled.wholestep.WholeRun` when it may take one (else None), and
    why not, in words (None when it may).

    ``whole="auto"`` takes it for small runs when the engine chooses its own loops (``jit="auto"``)
    and Numba may run; ``True`` insists (for tests and for measuring); ``False`` never."""
    from . import wholestep

    if whole is False:
        return None, "whole=False"
    if whole == "auto" and jit != "auto":
        return None, f"jit={jit!r}: the whole-run function is chosen only with jit='auto'"
    why = numba_refusal(True if whole is True else "auto", wholestep.unsupported(graph), "the whole-run function",
                        env_refuses=("0", "fuse"))
    if why is not None:
        return None, why
    return wholestep.WholeRun(graph), None


@functools.cache  # asked on every run; the answer is fixed at import (and importing Numba is deferred)
def _views_to_blas() -> bool:
    """Whether the Numba loops' products reach NumPy's BLAS, which takes strided and transposed views."""
    from unrolled.engines.compiled.kernels.arrays import BLAS_NAME

    return BLAS_NAME == "numpy"


def _jit_refusal(jit, p: Plan) -> str | None:
    """Why this graph may not take the Numba loop, or None. ("fuse" in UNROLLED_JIT allows fused kernels only.)"""
    unsupported = {v.op for v in p.of("core") if v.kind == "op" and v.op not in INLINE}
    return numba_refusal(jit, unsupported, "the JIT loop, inside the recurrent core,", env_refuses=("0", "fuse"))


def _fuse_refusal(jit) -> str | None:
    """Why the plain NumPy loop calls no fused kernels, or None when it may (fuse.py)."""
    if jit is False:
        return "jit=False"
    if os.environ.get("UNROLLED_JIT", "1") == "0":
        return "UNROLLED_JIT=0 turns Numba off"
    if not fuse.available():
        return "Numba is not installed (pip install numba)"
    return None


@dataclass
class Route:
    """How a run goes, as :meth:`CompiledEngine.route` decides: the whole-run function, or the
    step loops over these row ranges (None: all rows in one run), and the reasons, in words."""

    whole: bool
    ranges: list[tuple[int, int]] | None
    reasons: list[str] = field(default_factory=list)


class _RunState:
    """One run's arrays: the batched phases run here, the loops in generated code."""

    def __init__(self, eng: CompiledEngine, params, feeds: Feeds, part: int = 0):
        self.eng, self.params, self.f = eng, params, feeds
        self.p, self.w, self.g = eng.plan, eng._writer, eng.graph
        self.T, self.B, self.dtype = feeds.T, feeds.B, feeds.dtype
        self.buf = eng.buffers(self.T, self.B, self.dtype, part)
        self.use_jit = eng.uses_jit(self.B)
        self.X: dict[str, np.ndarray] = {}  # pre/post values, [T, B, F] (or [T, B] indices)
        self.K = eng.steps_per_chunk(self.T, self.B, self.dtype)
        self.chunks = [(t0, min(t0 + self.K, self.T)) for t0 in range(0, self.T, self.K)]

    # ---- buffers

    def alloc(self, name: str, shape) -> np.ndarray:
        a = self.buf.get(name)
        if a is None or a.shape != tuple(shape):
            a = self.buf[name] = aligned_empty(shape, self.dtype)
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
        if self.p.is_view(v):
            return self.value(v.args[0])[:, :, v.attrs["start"]:v.attrs["stop"]]
        n = self.w.names[v.name]
        if D is not None:
            return self.buf[f"H_{n}"][D:]
        return self.buf[f"V_{n}"]

    # ---- forward

    def forward(self) -> None:
        picked = self.eng.picked_only
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
                self.eng.jit_namespace()[fn](t0, t1, self.bind)
            else:
                # buffers and parameters become globals of the generated functions: the fastest lookup there is
                ns = self.eng._namespace
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
        args = [self.params[a.name] if isinstance(a, Param) else _flat(self.value(a)) for a in v.args]
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
            elif v.kind == "op" and not p.is_view(v):
                bind[f"S_{n}"] = self.alloc(f"S_{n}", (B, v.size))
            if v.name in p.split:
                s = p.split[v.name]
                W = self.params[s.W]
                # copied (unless the weight already is its own loop half, on a cache line): a BLAS
                # product reads a row-strided view of the columns more slowly than a contiguous copy,
                # and SciPy's BLAS takes only C-contiguous operands; it reads a transposed view more
                # slowly still, so the transpose is copied too (once a run, against every step's
                # product), and the Numba loops compile for one layout
                Wc = aligned(_column_view(W, s.core_cols))
                bind[f"W_{n}"], bind[f"WT_{n}"] = Wc, aligned(Wc.T)
                if len(s.core) > 1:
                    bind[f"C_{n}"] = self.alloc(f"C_{n}", (B, len(s.core_cols)))
                    bind[f"CG_{n}"] = self.alloc(f"CG_{n}", (B, len(s.core_cols)))
                if s.tokens is not None:
                    WX = bind[f"WX_{n}"] = aligned_empty((len(s.pre_cols), v.size), self.dtype)
                    np.add(_column_view(W, s.pre_cols).T, self.params[s.bias] if s.bias else 0, out=WX)
                    bind[f"TOK_{n}"] = np.ascontiguousarray(self.value(s.tokens), dtype=np.intp)
                elif s.pre:
                    bind[f"Y_{n}"] = self.alloc(f"Y_{n}", (self.K, B, v.size))
                    self.pre_products.append((v, s))
        for v in p.order:
            if p.phase[v.name] == "pre" and v.kind != "index" and v.name not in self.eng.picked_only:
                bind[f"X_{w.names[v.name]}"] = self.X[v.name]
        self.bind = bind

    def _pre_product(self, v: Vertex, s: Split, t0: int, t1: int) -> None:
        """The loop-free half of a split product for steps t0..t1-1: ``W[:, pre] · x_pre + b``, into ``Y``."""
        n = self.w.names[v.name]
        Y = self.bind[f"Y_{n}"][:t1 - t0].reshape(-1, v.size)
        product(self._pre_inputs(v, s)[t0 * self.B: t1 * self.B], self._pre_weights(v, s), out=Y)
        if s.bias:
            Y += self.params[s.bias]

    def _pre_weights(self, v: Vertex, s: Split) -> np.ndarray:
        """``W[:, pre]``, transposed and contiguous: the operand the forward product reads (BLAS
        reads a transposed view more slowly than the copy, made once a run)."""
        key = f"WpT:{v.name}"
        if key not in self.X:
            self.X[key] = aligned(_column_view(self.params[s.W], s.pre_cols).T)
        return self.X[key]

    def _pre_columns(self, v: Vertex, s: Split) -> np.ndarray:
        """``W[:, pre]``, contiguous: the operand of the gradient the loop sends to its pre vertices."""
        key = f"Wp:{v.name}"
        if key not in self.X:
            self.X[key] = aligned(_column_view(self.params[s.W], s.pre_cols))
        return self.X[key]

    def _pre_inputs(self, v: Vertex, s: Split) -> np.ndarray:
        """``x_pre`` for all steps, ``[T*B, F]``: what the product reads, and its weight gradient too."""
        key = f"prex:{v.name}"
        if key not in self.X:
            for part, _, _ in s.pre:
                if part.name not in self.X:  # a one-hot matrix the loop did without (picked_only)
                    self._batched_forward(part)
            xs = [_flat(self.value(part)) for part, _, _ in s.pre]
            self.X[key] = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=1)
        return self.X[key]

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
            dZ = np.empty_like(probs)
            cross_entropy_back_rows(dZ, np.ascontiguousarray(_flat(g), dtype=self.dtype), probs, K)
            if v.args[0].name in self.p.wants_grad:
                self._add_grad(v.args[0], dZ.reshape(T, B, -1))
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
            if v.name in p.depth:
                D = p.depth[v.name]
                GH = self.buf[f"GH_{n}"]  # zeroed, holding the post-phase gradients (see backward)
                if v.name in f.final_state_grads:
                    fs = f.final_state_grads[v.name]
                    for k in range(D):  # the last D steps, at indexes T .. T+D-1
                        GH[_slot(T + k, D, w.in_ring(v))] += fs[k]
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
                m = self.buf[f"M_{width}"] = aligned_empty((B, width), bool)
            bind[f"M_{width}"] = m
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
                elif w._post_grad(v):
                    GF[...] = 0

    def _loop_param_grads(self, t0: int, t1: int) -> None:
        """Each loop weight's gradient over a chunk's steps, as one product over its rows; and the
        loop's gradients of pre vertices through split products."""
        p, w, B = self.p, self.w, self.B
        rows = slice(t0 * B, t1 * B)
        for v in p.of("core"):
            n = w.names[v.name]
            if v.kind == "delay":
                continue
            if v.kind == "op" and not p.is_view(v) and w.has_full_grad(v) and v.name not in p.depth:
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
                    product(Gf.T, _flat(self.value(part))[rows], out=self.grads[s.W][:, lo:hi], accumulate=True)
                if s.pre:
                    self._pre_param_grads(v, s, Gf, t0, t1)
                if s.bias:
                    self.grads[s.bias] += Gf.sum(axis=0)
            elif v.kind == "op" and any(isinstance(a, Param) for a in v.args):
                args = [self.params[a.name] if isinstance(a, Param) else _flat(self.value(a))[rows] for a in v.args]
                gs = OPS[v.op].vjp(G.reshape(-1, v.size), args, _flat(self.value(v))[rows],
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
        scatter = _row_kernels(self.w.fuse)[1]
        if s.tokens is not None and scatter is not None:
            # one-hot rows: each row's gradient lands on its token's column, no product with zeros
            dWpT = np.zeros((len(s.pre_cols), v.size), dtype=self.dtype)
            scatter(dWpT, self.bind[f"TOK_{self.w.names[v.name]}"][t0:t1].reshape(-1), Gf)
            self._add_pre_columns(s, dWpT, transposed=True)
        elif len(s.pre) == 1:
            _, lo, hi = s.pre[0]
            product(Gf.T, self._pre_inputs(v, s)[t0 * B: t1 * B], out=self.grads[s.W][:, lo:hi], accumulate=True)
        else:
            self._add_pre_columns(s, product(Gf.T, self._pre_inputs(v, s)[t0 * B: t1 * B]))
        wanted = [(part, off, hi - lo) for (part, lo, hi), off in zip(s.pre, _offsets(s.pre))
                  if part.name in p.wants_grad]
        for part, off, width in wanted:
            key = (v.name, off)
            if key not in self.pre_grads:
                self.pre_grads[key] = (part, aligned_empty((self.T, B, width), self.dtype))
        if len(wanted) == 1 and wanted[0][2] == len(s.pre_cols):  # the input's gradient is the whole product
            steps = self.pre_grads[(v.name, wanted[0][1])][1][t0:t1]
            product(Gf, self._pre_columns(v, s), out=steps.reshape(-1, steps.shape[2]))
        elif wanted:
            gx = product(Gf, self._pre_columns(v, s)).reshape(t1 - t0, B, -1)
            for part, off, width in wanted:
                self.pre_grads[(v.name, off)][1][t0:t1] = gx[:, :, off:off + width]

    def _add_pre_columns(self, s: Split, dWp: np.ndarray, transposed: bool = False) -> None:
        """Add the loop-free half's weight gradient ``[out, pre columns]`` (``transposed``: ``[pre
        columns, out]``, as the one-hot scatter makes it) into the weight's columns."""
        for (part, lo, hi), off in zip(s.pre, _offsets(s.pre)):
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
            if not isinstance(ig, np.ndarray):  # none sent (np.isscalar costs more than the rest)
                ig = np.zeros((D, self.B, v.size), dtype=self.dtype)
            self.init_grads[name] = ig
            if v.init == "learned" and name not in f.given_init:
                self.grads[g.init_param_name(name)] += ig.sum(axis=(0, 1))
        copies = self._copies() if combine == "mean" else {}
        for name, grad in self.grads.items():
            if copies.get(name):
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
        return parameter_copies(self.g, self.T, self.f.given_init)


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def _column_view(W: np.ndarray, cols: list[int]) -> np.ndarray:
    """``W[:, cols]`` as a view when the columns are one run (BLAS takes its row stride), else a copy."""
    if cols and cols == list(range(cols[0], cols[-1] + 1)):
        return W[:, cols[0]: cols[-1] + 1]
    return W[:, cols]


def _slot(index: int, D: int, ring: bool) -> int:
    return index % (D + 1) if ring else index


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


def _row_kernels(numba_ok: bool):
    """(add_rows, scatter_add_rows): Numba's where the engine may use it; else NumPy's pick and no scatter
    (NumPy's ``add.at`` is slower than the dense product with the one-hot rows it would replace)."""
    if numba_ok:
        from unrolled.engines.compiled.kernels.arrays import add_rows, scatter_add_rows

        return add_rows, scatter_add_rows
    return (lambda out, W, idx: np.add(out, W[idx], out=out)), None


def _offsets(parts) -> list[int]:
    out, o = [], 0
    for _, lo, hi in parts:
        out.append(o)
        o += hi - lo
    return out
