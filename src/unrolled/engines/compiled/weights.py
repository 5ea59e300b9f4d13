"""The weight arrays a run's products read, derived from the parameters once a run.

A split product ``W · concat(x, h)`` (plan.py) reads its weight in pieces:
the loop's half as a contiguous copy and as that copy's transpose (each step
product reads whichever layout kernels/layouts.py measured faster), the
loop-free half transposed for the product over all steps and as it is for
the gradient that product sends back, and, where the loop-free half is a
one-hot input, its columns with the bias added (the loop adds one row a
step). BLAS reads a row-strided view of some columns more slowly than a
contiguous copy, and SciPy's BLAS takes only C-contiguous operands.

Every one of them depends on the parameters alone, so the parts of a row
split (rowsplit.py) share one set, made before the parts start: made in each
part, beside the other part's Python, each copy's return waited for the GIL
and the copies cost a part two to three times what they cost a run alone
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import numpy as np

from unrolled.engines.compiled.kernels.blas import aligned, aligned_copy

from .plan import Plan, Split


def derive(plan: Plan, names: dict[str, str], params: dict[str, np.ndarray], dtype,
           backward: bool, keep: dict) -> dict[str, np.ndarray]:
    """Each split product's weight pieces, by the name the run binds them to (``names``: the
    generated code's name of each vertex): ``W_n``, ``WT_n``, and ``WX_n`` (one-hot columns plus
    bias) or ``WpT_n``; with ``backward``, ``Wp_n`` where the loop-free half's inputs want a gradient.
    They are written into the arrays ``keep`` holds from the last run (``buffers.kept``): a
    run's pieces serve that run only."""
    out: dict[str, np.ndarray] = {}
    for v in plan.of("core"):
        s = plan.split.get(v.name)
        if s is None:
            continue
        n, W = names[v.name], params[s.W]
        out[f"W_{n}"] = Wc = aligned(column_view(W, s.core_cols), keep=keep, key=f"W_{n}")
        out[f"WT_{n}"] = aligned_copy(Wc.T, keep, f"WT_{n}")
        if s.tokens is not None:
            WX = out[f"WX_{n}"] = aligned_copy(column_view(W, s.pre_cols).T, keep, f"WX_{n}")
            if s.bias:
                WX += params[s.bias]
        elif s.pre:
            out[f"WpT_{n}"] = aligned_copy(column_view(W, s.pre_cols).T, keep, f"WpT_{n}")
        if backward and wanted(plan, s):
            out[f"Wp_{n}"] = aligned(column_view(W, s.pre_cols), keep=keep, key=f"Wp_{n}")
    return out


def wanted(plan: Plan, s: Split) -> list[tuple]:
    """``(part, first column, width)`` of each loop-free input of ``s`` that wants a gradient."""
    return [(part, off, hi - lo) for (part, lo, hi), off in zip(s.pre, offsets(s.pre))
            if part.name in plan.wants_grad]


def offsets(parts) -> list[int]:
    """Where each ``(part, lo, hi)`` starts in the concatenation of the parts' columns."""
    out, o = [], 0
    for _, lo, hi in parts:
        out.append(o)
        o += hi - lo
    return out


def column_view(W: np.ndarray, cols: list[int]) -> np.ndarray:
    """``W[:, cols]`` as a view when the columns are one run (BLAS takes its row stride), else a copy.
    ``cols`` increase, as a split's do (plan.py numbers a concatenation's columns in order), so they
    are one run when they span as many columns as they hold."""
    if cols and cols[-1] - cols[0] + 1 == len(cols):
        return W[:, cols[0]: cols[-1] + 1]
    return W[:, cols]
