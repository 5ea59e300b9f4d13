"""Generation of many rows on several threads: each thread its own rows, start to finish.

The rows of a batch being sampled are separate texts: each row reads its own
token, its own states and its own random numbers, and shares only the
weights. Above ``LOOP_ROWS`` rows a step's products go to BLAS, which can
spread one product over the cores, but the gate loops, the one-hot rows and
the sampling stay on one core, and every product of every step pays the
library's fork and join. Cut into parts of rows instead, each thread runs the
whole step loop over its rows with one-thread products, and the threads never
meet until the run ends.

The random numbers are drawn up front for the whole batch, so a row draws
from the same uniforms whichever part runs it. A product over a part's rows
may round differently from one over all of them (a library picks its kernels
by the number of rows), so a split run's text is that of its parts each run
alone, bit for bit (the tests hold it to that), and the same as one
thread's up to such rounding.
"""

from __future__ import annotations

from .feedsplit import thread_cap, usable_cores
from .kernels import onednn
from .kernels.blas import numpy_blas_on_one_thread
from .pinned import PinnedThreads, join

MIN_PART_ROWS = 4  # fewer rows a part and a part's run is mostly the step's own overhead


def choose(gen, B: int, threads: int | str = "auto") -> tuple[int, str]:
    """How many threads sample ``B`` rows (more than ``LOOP_ROWS``) with ``gen``, and why, in words."""
    if threads == 1:
        return 1, "threads=1"
    if not gen.use_jit:
        return 1, "the NumPy generator runs on one thread"
    if threads == "auto":
        cap = thread_cap()
        threads = min(usable_cores(), cap if cap is not None else usable_cores())
    n = min(int(threads), B // MIN_PART_ROWS)
    if n < 2:
        return 1, f"{B} rows: fewer than {MIN_PART_ROWS} rows a thread for two threads (feedrows.MIN_PART_ROWS)"
    return n, f"{B} rows split across {n} threads, {[hi - lo for lo, hi in parts(B, n)]} rows each, one-thread products"


def parts(B: int, n: int) -> list[tuple[int, int]]:
    """The row ranges ``[lo, hi)`` of ``n`` parts of ``B`` rows, as even as they come."""
    edges = [B * k // n for k in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def run(run_part, ranges: list[tuple[int, int]]) -> list:
    """``run_part(lo, hi)`` for each range, the first on the calling thread, each other on a worker
    thread of its own, every product on one thread; their results in the order of ``ranges``."""
    with numpy_blas_on_one_thread():  # the parts keep every core busy: NumPy's BLAS, process-wide, on one
        futures = [w.submit(run_part, lo, hi) for w, (lo, hi) in zip(_workers(len(ranges) - 1), ranges[1:])]
        try:
            with onednn.products_on_one_thread():
                first = run_part(*ranges[0])
        finally:
            join(futures)  # a worker writes buffers the caller returns: wait for it even when ours failed
    return [first] + [f.result() for f in futures]


_workers = PinnedThreads("unrolled-generate-rows", initializer=onednn.one_thread).first  # one-thread products
