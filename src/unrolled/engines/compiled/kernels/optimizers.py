"""One pass over each parameter for Adagrad and Adam (and for the sum of
squares of clipping's global norm), when Numba is installed.

NumPy runs an update rule as a handful of whole-array operations, each a
call and a pass through memory; for the small models of a character-level
run (a hundred units, batch one) the calls are most of an optimizer step,
for large ones the passes are. These kernels do the same arithmetic, in the
same order and the same precision, element by element in one loop: every
constant arrives as a Python float and is rounded here to the parameter's
dtype, exactly as NumPy rounds a Python number it combines with an array
(making NumPy scalars of them in Python cost a small model's step more than
its arithmetic), and no operation is fused, so the results are bit for bit
those of :mod:`unrolled.train.optim`'s NumPy code (the tests compare them).
"""

from __future__ import annotations

import numba
import numpy as np

from . import compiling as _compiling
from .jitcache import prepare_numba_cache
from .scalars import cast

_compiling.listen()
prepare_numba_cache()  # before the first cache=True function
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")


@_jit
def adagrad(p, g, total, clr, eps):
    """``sum += g²; p -= clr · g / (√sum + eps)``, on C-contiguous arrays of one shape."""
    p, g, total = p.reshape(-1), g.reshape(-1), total.reshape(-1)
    for i in range(p.shape[0]):
        gi = g[i]
        t = total[i] + gi * gi
        total[i] = t
        p[i] -= cast(clr, gi) * (gi / (np.sqrt(t) + cast(eps, gi)))


@_jit
def adam(p, g, exp_avg, exp_avg_sq, decay, c1, beta2, c2, bias2, eps, step_size):
    """torch's Adam (and AdamW's decoupled decay ``p *= decay``), on C-contiguous arrays of one shape."""
    p, g, exp_avg, exp_avg_sq = p.reshape(-1), g.reshape(-1), exp_avg.reshape(-1), exp_avg_sq.reshape(-1)
    for i in range(p.shape[0]):
        gi = g[i]
        m = exp_avg[i] + cast(c1, gi) * (gi - exp_avg[i])
        v = exp_avg_sq[i] * cast(beta2, gi)
        v = v + cast(c2, gi) * (gi * gi)
        exp_avg[i] = m
        exp_avg_sq[i] = v
        pi = p[i] * cast(decay, gi)
        p[i] = pi - cast(step_size, gi) * (m / (np.sqrt(v) / cast(bias2, gi) + cast(eps, gi)))


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def sum_of_squares(x):
    """Σ x² in float64 over a flat float32 array: squares of float32 cannot overflow float64, so
    no scaling pass is needed; the sum may be taken in any order (it vectorizes)."""
    s = 0.0
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        s += v * v
    return s


@_jit
def clip(g, limit):
    """Clamp to ``[-limit, limit]`` in place, NaN kept (as ``np.clip``); one pass, no temporary."""
    g = g.reshape(-1)
    for i in range(g.shape[0]):
        x = g[i]
        hi = cast(limit, x)
        g[i] = -hi if x < -hi else (hi if x > hi else x)

