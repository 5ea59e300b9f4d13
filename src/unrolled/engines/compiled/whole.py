"""Whether a run takes the whole-run function, and running it there.

:class:`~unrolled.engines.compiled.wholestep.WholeRun` compiles a graph's
whole run (every step, forward and backward) into one Numba function.
:class:`WholeStrategy` decides whether a graph may take it at all, and for
which batch sizes it pays (:meth:`WholeStrategy.choose`): the function's own
loops beat a BLAS call only while a step's products are tiny, where the
call's fixed cost dominates; above, BLAS's blocked kernels win.
"""

from __future__ import annotations

import numpy as np

from unrolled.engines.compiled.kernels.jitcache import numba_refusal
from unrolled.engines.runio import Feeds, RunResult
from unrolled.graph.folded import Graph

# "auto" runs the whole run as one Numba function when rows x the multiply-adds of a step's products
# (dense, per row) is at most this. (A rule on rows x the widest vertex took the whole run where the
# loops were already faster.)
WHOLE_AUTO_MACS = 1 << 18


class WholeStrategy:
    """The whole run as one compiled function, where the graph and the batch size allow it.

    ``whole="auto"`` takes it for small runs when the engine chooses its own loops (``jit="auto"``)
    and Numba may run; ``True`` insists (for tests and for measuring); ``False`` never."""

    def __init__(self, graph: Graph, jit, whole):
        self.fn, self.why = _whole_run(graph, jit, whole)  # the WholeRun (or None), and why not in words
        self.forced = whole is True
        self.step_macs = step_macs(graph)

    def choose(self, B: int) -> tuple[bool, str]:
        """Whether a run of ``B`` rows takes the whole-run function, and why, in words."""
        if self.fn is None:
            return False, self.why
        if self.forced:
            return True, "whole=True"
        macs = B * self.step_macs
        if macs <= WHOLE_AUTO_MACS:
            return True, (f"{B} rows x {self.step_macs} multiply-adds a step = {macs} "
                          f"<= WHOLE_AUTO_MACS ({WHOLE_AUTO_MACS}): a step's products are tiny")
        return False, (f"{B} rows x {self.step_macs} multiply-adds a step = {macs} "
                       f"> WHOLE_AUTO_MACS ({WHOLE_AUTO_MACS}): BLAS's products win there")

    def run(self, params, feeds: Feeds, combine: str, backward: bool, scan: bool = False) -> RunResult:
        """The run, forward and (unless ``backward=False``) back, in the one compiled function;
        ``scan``: refuse NaN and infinities in the caller's arrays (see ``WholeRun.run``)."""
        with np.errstate(under="ignore", over="ignore"):
            return self.fn.run(params, feeds, combine, backward, scan)


def step_macs(graph: Graph) -> int:
    """Multiply-adds of one step's products for one row, counted dense (a one-hot input as a product)."""
    return sum(v.size * v.args[1].size for v in graph.step_order()
               if v.kind == "op" and v.op in ("matmul", "linear"))


def _whole_run(graph: Graph, jit, whole):
    """The graph's WholeRun when it may take one (else None), and why not, in words (None when it may).
    The whole-run module is imported only once Numba may run: with ``UNROLLED_JIT=0`` an engine's
    start never pays for it."""
    if whole is False:
        return None, "whole=False"
    if whole == "auto" and jit != "auto":
        return None, f"jit={jit!r}: the whole-run function is chosen only with jit='auto'"

    def unsupported():
        from . import wholestep

        return wholestep.unsupported(graph)

    why = numba_refusal(True if whole is True else "auto", unsupported, "the whole-run function")
    if why is not None:
        return None, why
    from . import wholestep

    return wholestep.WholeRun(graph), None
