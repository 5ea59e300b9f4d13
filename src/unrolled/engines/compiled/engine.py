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

The strategies, one class each, one module each: :class:`~.whole.WholeStrategy`
(whole.py), :class:`~.loops.StepLoops` (loops.py: the NumPy or Numba loops of
one recurrent core, with forward.py and backward.py running one batch through
them), :class:`~.stages.StagedRun` (stages.py) and :class:`~.rowsplit.RowSplit`
(rowsplit.py). :class:`CompiledEngine` builds them and chooses among them in one
place, :meth:`CompiledEngine.route`; ``explain`` prints that choice.

It returns exactly what the reference engine returns (``RunResult``), and
the tests hold the two to 1e-10 in float64 on random cyclic graphs.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import numpy as np

from unrolled.engines.runio import Binding, Feeds, RunResult, check_combine, prepare, scan_feeds
from unrolled.graph.folded import Graph

from .background import WarmStart
from .kernels.jitcache import jit_turned_off
from .loops import StepLoops
from .rowsplit import RowSplit, products_as_in_a_part
from .stages import StagedRun, cut
from .whole import WholeStrategy

# The ways a run can go, as CompiledEngine.strategies names them; tests/helpers.py runs a graph through each.
STRATEGIES = ("whole", "stages", "numba_loop", "numpy_loop", "fused", "row_split", "chunked")


class CompiledEngine:
    """Runs a folded graph's forward pass and BPTT by the fastest strategy that can run it.

    Same interface and results as :class:`unrolled.engines.reference.ReferenceEngine`.
    ``engine.code`` is the generated loop source (``jit_code``: as Numba compiles it).
    ``jit``: True, False, "auto" (Numba where it pays), or "fuse" (the NumPy loops with fused
    Numba kernels: what "auto" runs where the Numba loop cannot); ``whole``: the whole-run function
    (True, False, "auto"); ``chunk_steps``: steps per chunk of the loops (None: by memory);
    ``threads``: how many threads a batch's rows may be split across ("auto": as many as
    oneDNN uses, when it runs the products and each thread gets at least ``rowsplit.MIN_ROWS``
    rows; 1: never). The engine runs the graph as it was when made: a graph changed since is
    refused (see :class:`unrolled.engines.runio.Binding`); make a new engine.
    ``engine.explain(T, B, dtype)`` says which strategy a run takes and why
    (one decision, :meth:`route`, serves it and :meth:`run`). With ``jit="auto"`` the first runs
    of a kind go to the plain NumPy loops while a child process compiles (``engine.warm_start``,
    see background.py).
    """

    name = "compiled"

    def __init__(self, graph: Graph, jit: bool | str = "auto", chunk_steps: int | None = None,
                 whole: bool | str = "auto", threads: int | str = "auto"):
        self.graph = graph.check()
        self._binding = Binding.of(graph)
        if threads != "auto" and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be 'auto' or a whole number >= 1 (1: never split a batch's rows "
                             f"across threads), not {threads!r}")
        if chunk_steps is not None and (not isinstance(chunk_steps, int) or chunk_steps < 1):
            raise ValueError(f"chunk_steps must be a whole number of steps >= 1 (or None to size chunks "
                             f"by memory), not {chunk_steps!r}")
        self._options = dict(jit=jit, chunk_steps=chunk_steps, whole=whole, threads=threads)
        # jit="auto" leaves the choice to the engine: a first run need not wait for Numba (background.py)
        self.warm_start = (WarmStart(graph, dict(self._options), lambda: _loops(graph, False, chunk_steps))
                           if jit == "auto" else None)
        if self.warm_start is None:  # the engine's own route runs from the first run on: built now
            _ = self.loops, self._whole
        else:  # refused here, not at the first compiled run: a bad UNROLLED_JIT, an insisted-on whole run
            jit_turned_off()
            if whole is True:
                _ = self._whole

    # Under jit="auto" the engine's own strategies are built when first asked for, not here: the
    # first runs go to the plain NumPy loops while a child compiles (background.py), and a start
    # that built them too would be slower than the plain NumPy engine's, which builds only those.

    @functools.cached_property
    def loops(self):
        """The step loops (:class:`~.loops.StepLoops`, or :class:`~.stages.StagedRun` stage by stage)."""
        return _loops(self.graph, self._options["jit"], self._options["chunk_steps"])

    @functools.cached_property
    def _whole(self) -> WholeStrategy:
        return WholeStrategy(self.graph, self._options["jit"], self._options["whole"])

    @functools.cached_property
    def _rows(self) -> RowSplit:
        return RowSplit(self.loops, self._options["threads"])

    @property
    def code(self) -> str:
        """The generated step loops, plain NumPy (each stage's, one after another)."""
        return self.loops.code

    @property
    def jit_code(self) -> str:
        """The step loops as Numba compiles them."""
        return self.loops.jit_code

    @property
    def whole(self):
        """The :class:`~unrolled.engines.compiled.wholestep.WholeRun` this graph may take, or None."""
        return self._whole.fn

    @property
    def stages(self) -> list:
        """``(Stage, StepLoops)`` for each stage of a graph run stage by stage; else empty."""
        return getattr(self.loops, "stages", [])

    def uses_whole(self, B: int) -> bool:
        """Whether a run over batches of ``B`` rows is one compiled function (see whole.py)."""
        return self._whole.choose(B)[0]

    def uses_jit(self, B: int) -> bool:
        """Whether a run over batches of ``B`` rows takes the Numba loop (in any stage)."""
        return self.loops.uses_jit(B)

    def row_parts(self, B: int, dtype) -> list[tuple[int, int]] | None:
        """The row ranges a run of ``B`` rows splits into across threads (rowsplit.py), or None."""
        return self._rows.choose(B, dtype)[0]

    def route(self, B: int, dtype) -> Route:
        """The one decision of how a run of ``B`` rows of ``dtype`` goes, with its reasons:
        :meth:`run` follows it and :meth:`explain` prints it, so the two cannot differ.

        In order: the whole-run function when it may run the graph and the batch is small
        (:meth:`WholeStrategy.choose <unrolled.engines.compiled.whole.WholeStrategy.choose>`);
        else the step loops (of each stage), over the batch's rows split across threads when
        oneDNN runs the products and every part takes the Numba loop (:meth:`RowSplit.choose
        <unrolled.engines.compiled.rowsplit.RowSplit.choose>`), else in one run. Each loop picks
        Numba or NumPy (:meth:`StepLoops.jit_choice <unrolled.engines.compiled.loops.StepLoops.jit_choice>`)."""
        whole, why = self._whole.choose(B)
        if whole:
            return Route(True, None, [f"the whole-run function: {why}"])
        ranges, split_why = self._rows.choose(B, dtype)
        return Route(False, ranges, [f"not the whole-run function: {why}", split_why])

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
        for loops in self.loops.cores:
            for rows in ([hi - lo for lo, hi in ranges] if ranges else [B]):
                jit = loops.uses_jit(rows)
                out.add("numba_loop" if jit else "numpy_loop")
                if (loops.jit_kernels() if jit else loops.writer.kernels).functions:
                    out.add("fused")
                if loops.steps_per_chunk(T, rows, dtype) < T:
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
            - rows split across 2 threads: [5000, 5000] rows each, NumPy's BLAS on one thread while ...
            - Numba loop, 5000 rows: its products call NumPy's own BLAS, which wins at every size
            - no fused kernels: no run of elementwise vertices to fuse
            - all 20 steps in one chunk
            - step products of a: forward reads its transposed copy, backward W as kept (...)

        The last lines say which layout of its weight each step product reads (kernels/layouts.py):
        asking may time the two, on the product threads the run's loops would have. With
        ``UNROLLED_JIT=0`` the same run says ``NumPy loop, 10000 rows: UNROLLED_JIT=0 turns Numba off``.
        """
        route = self.route(B, dtype)
        names = sorted(self.strategies(T, B, dtype), key=STRATEGIES.index)
        lines = [f"compiled engine, graph '{self.graph.name}', {T} steps x {B} rows of {np.dtype(dtype).name}: "
                 + ", ".join(names)]
        if self.warm_start is not None and self.warm_start.pending(B, dtype):
            lines.append("- first, until a child process has compiled what follows: the plain NumPy loops "
                         "(background.py; background.set_enabled(False) waits for the compiler instead)")
        lines += [f"- {r}" for r in route.reasons]
        if route.whole:
            return "\n".join(lines)
        if self.stages:
            lines.append(f"- in {len(self.stages)} stages, one after another: the graph has {len(self.stages)} "
                         "recurrent cores that do not feed each other both ways (stages.py)")
        sizes = sorted({hi - lo for lo, hi in route.ranges}) if route.ranges else [B]
        for i, loops in enumerate(self.loops.cores):
            stage = f"stage {i + 1}: " if self.stages else ""
            for rows in sizes:
                lines += [f"- {stage}{line}" for line in loops.reasons(T, rows, dtype)]
                # asked on the product threads the run's loops have: one each when the rows split
                with products_as_in_a_part() if route.ranges else contextlib.nullcontext():
                    lines += [f"- {stage}{line}" for line in loops.layout_reasons(rows, dtype)]
        return "\n".join(lines)

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
                        check_finite=False)
        return self.run_feeds(feeds, combine, backward, scan=check_finite)

    def run_feeds(self, feeds: Feeds, combine: str = "sum", backward: bool = True, scan: bool = False) -> RunResult:
        """:meth:`run` on arrays :func:`~unrolled.engines.runio.prepare` has checked: the route
        (:meth:`route`), or the plain NumPy loops while a child process compiles (background.py).

        ``scan``: refuse NaN and infinities in the caller's arrays first (:func:`~unrolled.engines.runio.scan_feeds`).
        The whole-run function looks for them itself, in the pass that reads them, and only when it
        finds one does the scan run, to name it: for the small runs it serves, the scan's calls
        cost as much as a fifth of the run."""
        if self.warm_start is not None and self.warm_start.waiting(feeds, combine, backward):
            if scan:
                scan_feeds(feeds)
            return self.warm_start.run_numpy(feeds, combine, backward)
        route = self.route(feeds.B, feeds.dtype)
        if route.whole:
            return self._whole.run(feeds.params, feeds, combine, backward, scan=scan)
        if scan:
            scan_feeds(feeds)
        if route.ranges:
            return self._rows.run(feeds.params, feeds, combine, backward, route.ranges)
        return self.loops.run(feeds.params, feeds, combine, backward)


def _loops(graph: Graph, jit, chunk_steps):
    """The step loops of ``graph``: several cycles run one after another, each in a loop of its own
    (see stages.py)."""
    parts = cut(graph)
    return StagedRun(graph, parts, jit, chunk_steps) if len(parts) > 1 else StepLoops(graph, jit, chunk_steps)


@dataclass
class Route:
    """How a run goes, as :meth:`CompiledEngine.route` decides: the whole-run function, or the
    step loops over these row ranges (None: all rows in one run), and the reasons, in words."""

    whole: bool
    ranges: list[tuple[int, int]] | None
    reasons: list[str] = field(default_factory=list)
