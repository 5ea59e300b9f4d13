"""A batch's rows in parallel: one thread per slice of rows, one-thread products in each.

Every op of the table works row by row, so the rows of a batch are
independent runs that share only the weights: their losses and weight
gradients add up, everything else (outputs, states, input gradients) is
theirs alone. The compiled engine uses that on machines where oneDNN runs
the products. Left as one run, a step spends part of its time on work only
one core does (the fused gate kernels, the loop's own calls) while oneDNN's
other threads wait, and every product pays OpenMP's fork and join. Split,
each core runs its rows start to finish with one-thread products, and
nothing waits. (benchmarks/RESULTS.md has what it measured.)

The loss of a part is divided by the whole batch's divisor (``Feeds.norms``),
so the parts' losses and gradients are summed, not averaged, and the result
is the one a single run computes, up to the order of the sums.

Only oneDNN's threads can be told apart per calling thread (OpenMP's thread
count is a per-thread setting); OpenBLAS's pool is shared by the whole
process, so without oneDNN the rows stay in one run. While the parts run,
NumPy's OpenBLAS is set to one thread, process-wide, and where it runs a
product faster than oneDNN on one thread the parts use it (a weight
gradient: kernels/libraries.py; a step product: kernels/layouts.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import numpy as np

from unrolled.engines.runio import Feeds, RunResult

from .kernels import onednn
from .kernels.blas import numpy_blas_on_one_thread
from .pinned import PinnedThreads, join

MIN_ROWS = 16  # fewer rows a part and a one-thread product no longer pays for its thread's start and merge


def parts(B: int, dtype, threads: int | str = "auto") -> list[tuple[int, int]] | None:
    """The row ranges a run of ``B`` rows splits into, or None to run it whole.

    ``threads``: "auto" takes as many threads as oneDNN would use for one
    product (``OMP_NUM_THREADS``, else the cores); a number caps that; 1 never splits."""
    return _split(B, dtype, threads)[0]


def unsplit_reason(B: int, dtype, threads: int | str = "auto") -> str | None:
    """Why :func:`parts` runs ``B`` rows whole, in words (None: it splits them)."""
    return _split(B, dtype, threads)[1]


def _split(B: int, dtype, threads) -> tuple[list[tuple[int, int]] | None, str | None]:
    """:func:`parts` and :func:`unsplit_reason` in one rule: the row ranges, or None and why."""
    if np.dtype(dtype) != np.float32:
        return None, f"{np.dtype(dtype).name}: only float32 products run on oneDNN, one pool per thread"
    if onednn.SGEMM is None:
        return None, "oneDNN is not loaded (no per-thread products to split the rows across)"
    n = onednn.threads() if threads == "auto" else min(int(threads), onednn.threads())
    if n < 2:
        return None, f"threads={threads!r} with oneDNN on {onednn.threads()} thread(s): one thread"
    n = min(n, B // MIN_ROWS)
    if n < 2:
        return None, f"{B} rows: fewer than rowsplit.MIN_ROWS ({MIN_ROWS}) rows a thread for two threads"
    return even(B, n), None


def even(B: int, n: int) -> list[tuple[int, int]]:
    """The row ranges ``[lo, hi)`` of ``n`` parts of ``B`` rows, as even as they come."""
    edges = [B * k // n for k in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


class RowSplit:
    """A batch's rows split across threads, each part run start to finish by the same step loops.

    ``loops`` is a :class:`~unrolled.engines.compiled.loops.StepLoops` or a
    :class:`~unrolled.engines.compiled.stages.StagedRun`: this class decides
    whether its rows split (:meth:`choose`) and runs the parts (:meth:`run`)."""

    def __init__(self, loops, threads: int | str = "auto"):
        self.loops, self.threads = loops, threads

    def choose(self, B: int, dtype) -> tuple[list[tuple[int, int]] | None, str]:
        """The row ranges a run of ``B`` rows splits into (None: one run), and why, in words."""
        ranges = parts(B, dtype, self.threads)
        if ranges is None:
            return None, f"rows not split: {unsplit_reason(B, dtype, self.threads)}"
        # every stage: a stage on the NumPy loop would be shared by the parts
        if not all(c.uses_jit(hi - lo) for c in self.loops.cores for lo, hi in ranges):
            return None, "rows not split: a part would run the NumPy loop, whose namespace the parts share"
        return ranges, (f"rows split across {len(ranges)} threads: {[hi - lo for lo, hi in ranges]} rows each, "
                        "NumPy's BLAS on one thread while they run, each weight gradient on the library "
                        "measured faster there (kernels/libraries.py)")

    def run(self, params, feeds: Feeds, combine: str, backward: bool, ranges: list[tuple[int, int]]) -> RunResult:
        """The run of ``feeds`` as one run per range of rows, merged. The Numba loops are loaded
        here first, once, not in each thread at the same time; the weights' pieces the products
        read are made here too, once for all parts (weights.py says why)."""
        self.loops.compile_jit()
        shared = self.loops.weights(params, feeds.dtype, backward)
        return run(lambda part, i: self.loops.run(params, part, combine, backward, i, shared), feeds, ranges)


def rows(feeds: Feeds, lo: int, hi: int) -> Feeds:
    """The run's arrays for rows ``lo:hi`` only; each loss keeps the whole batch's divisor."""
    def cut(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[:, lo:hi])

    return Feeds(
        T=feeds.T, B=hi - lo, dtype=feeds.dtype,
        inputs={k: cut(a) for k, a in feeds.inputs.items()},
        init={k: cut(a) for k, a in feeds.init.items()},
        masks={k: cut(a) for k, a in feeds.masks.items()},
        norms=dict(feeds.norms),
        final_state_grads={k: cut(a) for k, a in feeds.final_state_grads.items()},
        output_grads={k: cut(a) for k, a in feeds.output_grads.items()},
        given_init=feeds.given_init,
        params=feeds.params,
    )


def run(run_part, feeds: Feeds, ranges: list[tuple[int, int]]) -> RunResult:
    """``run_part(part_feeds, index)`` for each range of rows, merged: the first part on the calling
    thread, each other part on a worker thread of its own, products on one thread in each."""
    return merge(in_parts([functools.partial(run_part, rows(feeds, lo, hi), i) for i, (lo, hi) in enumerate(ranges)],
                          _workers))


def in_parts(calls: list, workers) -> list:
    """Each of ``calls`` (no arguments), the first on the calling thread, each other on a thread of
    ``workers(n)`` (a :class:`~.pinned.PinnedThreads`' ``first``), every product on one thread;
    their results in order. The generator's row split (feedrows.py) runs its parts here too."""
    pool = workers(len(calls) - 1)
    with numpy_blas_on_one_thread():  # the parts keep every core busy: NumPy's BLAS too runs on one
        # each part in a copy of the caller's context: NumPy's error settings (np.errstate) are in it
        futures = [w.submit(contextvars.copy_context().run, call) for w, call in zip(pool, calls[1:])]
        try:
            with onednn.products_on_one_thread():
                first = calls[0]()
        finally:
            join(futures)  # a worker's buffers are not free until its part is done, even when ours failed
    return [first] + [f.result() for f in futures]


@contextlib.contextmanager
def products_as_in_a_part():
    """Products on one thread while inside, as a part runs them: oneDNN's for this thread, NumPy's
    BLAS for the whole process (as :func:`run` sets it while its parts run)."""
    with numpy_blas_on_one_thread(), onednn.products_on_one_thread():
        yield


def merge(results: list[RunResult]) -> RunResult:
    """One run's result from its parts' (in row order): sums of what the rows share, the rest side by side."""
    first = results[0]
    grads = first.grads  # each part's gradients are its own new arrays: the first part's take the sum
    for r in results[1:]:
        for k, g in r.grads.items():
            grads[k] += g

    def side_by_side(field: str, axis: int) -> dict[str, np.ndarray]:
        return {k: np.concatenate([getattr(r, field)[k] for r in results], axis=axis) for k in getattr(first, field)}

    return RunResult(
        loss=sum(r.loss for r in results),
        grads=grads,
        input_grads=side_by_side("input_grads", 1),  # [T, B, F]
        init_grads=side_by_side("init_grads", -2),  # [B, F], or [D, B, F]
        final_states=side_by_side("final_states", -2),
        outputs=side_by_side("outputs", 1),
        step_losses=side_by_side("step_losses", 1),  # [T, B]
    )


_workers = PinnedThreads("unrolled-rows", initializer=onednn.one_thread).first  # their products run on one thread
