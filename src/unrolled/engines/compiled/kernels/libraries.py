"""Which library runs a weight-gradient product faster on one thread, measured on this machine.

A weight's gradient is ``dW += gᵀ · x`` over the rows of all steps: a product
whose first operand is read transposed and whose inner dimension (the rows)
is long. The compiled engine sends its float32 products to oneDNN, which
shares its threads with the step loops; on one thread, which is how each part
of a row split runs (rowsplit.py), NumPy's own OpenBLAS runs some of these
shapes faster, and others not (benchmarks/RESULTS.md). So where both
libraries would run the product on one thread, :func:`weight_gradient` times
both in turns the first time a shape runs in a process and keeps the faster;
oneDNN stays the default, and NumPy's BLAS is taken only when it wins
clearly, by the rule kernels/layouts.py uses for the step products.
"""

from __future__ import annotations

import threading

import numpy as np

from . import layouts, onednn
from .blas import aligned_zeros, numpy_blas_threads, on_numpy_blas, product
from .layouts import time_in_turns

_choices: dict[tuple, bool] = {}
_lock = threading.Lock()  # the parts of a row split ask at once: one measures, the other waits for it


def weight_gradient(g: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """``out += gᵀ · x`` (``g [rows, out]``, ``x [rows, in]``), on the library measured faster."""
    if on_numpy_blas_faster(g, x) and on_numpy_blas(g.T, x, out, accumulate=True):
        return
    product(g.T, x, out=out, accumulate=True)


def on_numpy_blas_faster(g: np.ndarray, x: np.ndarray) -> bool:
    """Whether NumPy's BLAS runs ``gᵀ · x`` faster than oneDNN, both on one thread; False wherever
    either would use more (the choice is made for the row split's parts) or oneDNN would not run
    it; measured once per shape in a process, on these very operands: a long run's gradients are
    among its largest arrays, and copies made to time them would raise its peak memory."""
    rows, outputs, inputs = *g.shape, x.shape[1]
    if (onednn.SGEMM is None or g.dtype != np.float32 or x.dtype != np.float32
            or rows * outputs * inputs < onednn.SMALL or onednn.threads() != 1 or numpy_blas_threads() != 1):
        return False
    key = (rows, outputs, inputs, g.dtype.str)
    with _lock:
        if key not in _choices:
            _choices[key] = choose(*_measure(g, x))
        return _choices[key]


def choose(onednn_times: list[float], numpy_times: list[float]) -> bool:
    """Whether NumPy's BLAS wins, by the rule that picks a step product's kernel
    (:func:`layouts.choose`: oneDNN the default, the other taken only when it wins clearly)."""
    return layouts.choose([onednn_times, numpy_times]) == 1


def chosen() -> dict[tuple, bool]:
    """Every decision made so far: ``(rows, outputs, inputs, dtype) -> on NumPy's BLAS``."""
    with _lock:
        return dict(_choices)


def _measure(g: np.ndarray, x: np.ndarray) -> tuple[list[float], list[float]]:
    """Seconds per product ``gᵀ · x`` on oneDNN and on NumPy's BLAS, one figure per round, taking
    turns; into a scratch array of the result's size."""
    out = aligned_zeros((g.shape[1], x.shape[1]), g.dtype)
    return time_in_turns([lambda j: product(g.T, x, out=out, accumulate=True),
                          lambda j: on_numpy_blas(g.T, x, out, accumulate=True)])
