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

import functools

from . import rowsplit
from .feedsplit import thread_cap, usable_cores
from .kernels import onednn
from .pinned import PinnedThreads

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
    return n, (f"{B} rows split across {n} threads, {[hi - lo for lo, hi in rowsplit.even(B, n)]} rows each, "
               "one-thread products")


def run(run_part, ranges: list[tuple[int, int]]) -> list:
    """``run_part(lo, hi)`` for each range, the first on the calling thread, each other on a worker
    thread of its own, every product on one thread (rowsplit.in_parts); their results in order."""
    return rowsplit.in_parts([functools.partial(run_part, lo, hi) for lo, hi in ranges], _workers)


_workers = PinnedThreads("unrolled-generate-rows", initializer=onednn.one_thread).first  # one-thread products
