"""Which of a weight's two layouts a step product reads faster, measured on this machine.

A core product's step reads its weight twice: ``y = x · Wᵀ`` going forward,
``dx = g · W`` going back. The step loops hold the weight both as it is kept
(``W``, ``[out, in]``) and as a transposed copy made once a run (``WT``,
``[in, out]``), so each product can read either: the copy as it is, or the
other one through a transposed view (BLAS's transpose flag). The library
picks a different kernel for each, and which is faster depends on the
processor and on the shape: on the AVX-512 machine the loops were tuned on,
the copy read straight was the faster; on an AVX2 machine, oneDNN ran W3's
forward step product (32 rows) far more slowly that way, while its large
products did not care (benchmarks/RESULTS.md).

So the loops take a flag per product and direction (codegen's ``FT_`` and
``BT_``: read the other array transposed), and :func:`reads_transposed` sets
it by timing both layouts, in turns, the first time a shape runs in a
process. The copy stays the default: the transposed view is taken only when
it wins clearly, so noise cannot flip a choice back and forth between runs.
Products too small to reach oneDNN (``onednn.SMALL``) are not measured.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from . import onednn
from .blas import aligned_empty, product

MARGIN = 0.95  # the transposed view is taken when its median time is below this fraction of the copy's
ROUNDS = 5  # turns each layout gets; the decision is on the median of the rounds' ratios
ROUND_SECONDS = 2e-3  # a turn repeats the product for at least about this long
STEPS = 4  # inputs a turn cycles through

_choices: dict[tuple, bool] = {}
_lock = threading.Lock()  # the parts of a row split ask at once: one measures, the other waits for it


def reads_transposed(rows: int, inner: int, cols: int, dtype) -> bool:
    """Whether ``x [rows, inner] · B [inner, cols]`` runs faster with ``B`` a transposed view of a
    ``[cols, inner]`` array than as a ``[inner, cols]`` array read as it is, on this thread's
    product threads; measured once per shape and thread count in a process."""
    dtype = np.dtype(dtype)
    if onednn.SGEMM is None or dtype != np.float32 or rows * inner * cols < onednn.SMALL:
        return False
    key = (rows, inner, cols, dtype.str, onednn.threads())
    with _lock:
        if key not in _choices:
            _choices[key] = choose(*_measure(rows, inner, cols, dtype))
        return _choices[key]


def step_layouts(rows: int, inputs: int, outputs: int, dtype) -> tuple[bool, bool]:
    """Which layout a core product's step reads, ``(forward, backward)``: going forward
    ``x [rows, inputs] · Wᵀ``, going back ``g [rows, outputs] · W``; ``True`` where the
    transposed view wins (:func:`reads_transposed`)."""
    return reads_transposed(rows, inputs, outputs, dtype), reads_transposed(rows, outputs, inputs, dtype)


def choose(straight: list[float], transposed: list[float]) -> bool:
    """Whether the transposed view wins: its time over the copy's, round by round, has a median
    below ``MARGIN``."""
    ratios = sorted(t / s for s, t in zip(straight, transposed))
    return ratios[len(ratios) // 2] < MARGIN


def chosen() -> dict[tuple, bool]:
    """Every decision made so far: ``(rows, inner, cols, dtype, threads) -> reads transposed``."""
    with _lock:
        return dict(_choices)


def _measure(rows: int, inner: int, cols: int, dtype) -> tuple[list[float], list[float]]:
    """Seconds per product of each layout, one figure per round, the layouts taking turns."""
    rng = np.random.default_rng(0)
    xs = aligned_empty((STEPS, rows, inner), dtype)  # a new input each call, as a loop's steps bring
    xs[...] = rng.standard_normal(xs.shape)
    copy = aligned_empty((inner, cols), dtype)
    copy[...] = rng.standard_normal(copy.shape)
    kept = aligned_empty((cols, inner), dtype)
    kept[...] = copy.T
    out = aligned_empty((rows, cols), dtype)
    layouts = (copy, kept.T)
    return time_in_turns([lambda j, b=b: product(xs[j % STEPS], b, out=out) for b in layouts])


def time_in_turns(calls) -> tuple[list[float], ...]:
    """Seconds per call of each of ``calls`` (each ``call(j)``, ``j`` counting its repeats), one
    figure per round, the calls taking turns; each is called once first, which sets up a
    library's kernel for the shape."""
    for call in calls:
        call(0)
    start = time.perf_counter()
    calls[0](1)
    reps = max(1, int(ROUND_SECONDS / max(time.perf_counter() - start, 1e-7)))
    times: tuple[list[float], ...] = tuple([] for _ in calls)
    for r in range(ROUNDS):
        for i in range(len(calls)) if r % 2 == 0 else reversed(range(len(calls))):
            start = time.perf_counter()
            for j in range(reps):
                calls[i](j)
            times[i].append((time.perf_counter() - start) / reps)
    return times
