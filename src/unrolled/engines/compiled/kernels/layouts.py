"""Which layout of a weight a step product reads, and on which library, measured on this machine.

A core product's step reads its weight twice: ``y = x · Wᵀ`` going forward,
``dx = g · W`` going back. The step loops hold the weight both as it is kept
(``W``, ``[out, in]``) and as a transposed copy made once a run (``WT``,
``[in, out]``), so each product can read either: the copy as it is, or the
other one through a transposed view (BLAS's transpose flag). The library
picks a different kernel for each, and which is faster depends on the
processor and on the shape: on the AVX-512 machine the loops were tuned on,
the copy read straight was the faster; on an AVX2 machine, oneDNN ran W3's
forward step product (32 rows) far more slowly that way, while its large
products did not care (benchmarks/RESULTS.md). Where a product runs on one
thread, as in each part of a row split (rowsplit.py), NumPy's own OpenBLAS
is a third and fourth choice, and on that machine it ran W3's backward step
product faster than oneDNN in either layout.

So the loops take two flags per product and direction (codegen's ``FT_`` and
``BT_``: read the other array transposed; ``FL_`` and ``BL_``: on NumPy's
BLAS), runtime ints, and :func:`step_kernel` sets them by timing the
candidates, in turns, the first time a shape runs in a process. The copy on
oneDNN stays the default: another is taken only when it wins clearly, so
noise cannot flip a choice back and forth between runs. Products too small
to reach oneDNN (``onednn.SMALL``) are not measured.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

import numpy as np

from . import onednn
from .blas import GEMM, aligned_empty, numpy_blas_threads, on_numpy_blas, product

MARGIN = 0.95  # another kernel is taken when its median time is below this fraction of the default's
ROUNDS = 5  # turns each kernel gets; the decision is on the median of the rounds' ratios
ROUND_SECONDS = 2e-3  # a turn repeats the product for at least about this long
STEPS = 4  # inputs a turn cycles through


class Kernel(NamedTuple):
    """How a step product reads its weight."""
    transposed: bool  # the other array, through a transposed view (else the array as it is)
    numpy_blas: bool  # on NumPy's own BLAS (else as the loops' ``matmul``: oneDNN)


DEFAULT = Kernel(False, False)

_choices: dict[tuple, Kernel] = {}
_lock = threading.Lock()  # the parts of a row split ask at once: one measures, the other waits for it


def step_kernel(rows: int, inner: int, cols: int, dtype) -> Kernel:
    """How ``x [rows, inner] · B [inner, cols]`` runs fastest, on this thread's product threads:
    ``B`` a ``[inner, cols]`` array read as it is or a transposed view of a ``[cols, inner]`` one,
    on oneDNN or, where both run on one thread, on NumPy's BLAS; measured once per shape and
    thread count in a process."""
    dtype = np.dtype(dtype)
    if onednn.SGEMM is None or dtype != np.float32 or rows * inner * cols < onednn.SMALL:
        return DEFAULT
    numpy_too = GEMM is not None and onednn.threads() == 1 and numpy_blas_threads() == 1
    key = (rows, inner, cols, dtype.str, onednn.threads(), numpy_too)
    with _lock:
        if key not in _choices:
            kernels = candidates(numpy_too)
            _choices[key] = kernels[choose(_measure(rows, inner, cols, dtype, kernels))]
        return _choices[key]


def step_kernels(rows: int, inputs: int, outputs: int, dtype) -> tuple[Kernel, Kernel]:
    """How a core product's step runs, ``(forward, backward)``: going forward ``x [rows, inputs]
    · Wᵀ``, going back ``g [rows, outputs] · W`` (:func:`step_kernel`)."""
    return step_kernel(rows, inputs, outputs, dtype), step_kernel(rows, outputs, inputs, dtype)


def candidates(numpy_too: bool) -> list[Kernel]:
    """The kernels measured, the default first."""
    return [Kernel(t, lib) for lib in ((False, True) if numpy_too else (False,)) for t in (False, True)]


def choose(times: list[list[float]]) -> int:
    """Which of the kernels timed (``times[i]``: one figure per round) to take: the one whose time
    over the first's, round by round, has the lowest median, where that median is below ``MARGIN``;
    else the first."""
    def median_ratio(ts: list[float]) -> float:
        ratios = sorted(t / d for d, t in zip(times[0], ts))
        return ratios[len(ratios) // 2]

    best = min(range(1, len(times)), key=lambda i: median_ratio(times[i]), default=0)
    return best if best and median_ratio(times[best]) < MARGIN else 0


def chosen() -> dict[tuple, Kernel]:
    """Every decision made so far: ``(rows, inner, cols, dtype, threads, NumPy's BLAS measured) -> kernel``."""
    with _lock:
        return dict(_choices)


def _measure(rows: int, inner: int, cols: int, dtype, kernels: list[Kernel]) -> list[list[float]]:
    """Seconds per product of each kernel, one figure per round, the kernels taking turns."""
    rng = np.random.default_rng(0)
    xs = aligned_empty((STEPS, rows, inner), dtype)  # a new input each call, as a loop's steps bring
    xs[...] = rng.standard_normal(xs.shape)
    copy = aligned_empty((inner, cols), dtype)
    copy[...] = rng.standard_normal(copy.shape)
    kept = aligned_empty((cols, inner), dtype)
    kept[...] = copy.T
    out = aligned_empty((rows, cols), dtype)

    def call(k: Kernel):
        b = kept.T if k.transposed else copy
        if k.numpy_blas:
            return lambda j: on_numpy_blas(xs[j % STEPS], b, out)
        return lambda j: product(xs[j % STEPS], b, out=out)
    return list(time_in_turns([call(k) for k in kernels]))


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
