"""Gradient clipping, the usual guard against exploding gradients in BPTT.

Both functions change a plain dict of gradient arrays in place, like
``torch.nn.utils.clip_grad_value_`` and ``clip_grad_norm_``.

The global norm is computed in float64 and scaled by the largest magnitude
first, so neither float32 gradients nor float64 ones near 1e200 overflow
while squaring: an exploding gradient must be *measured* correctly to be
reported and clipped. A non-finite gradient (inf or NaN) cannot be rescued by
scaling; :func:`clip_by_global_norm` then returns the non-finite norm and
leaves the gradients alone, and the caller should skip the update.
"""

from __future__ import annotations

import math

import numpy as np

from .optim import numba_kernels

Arrays = dict[str, np.ndarray]


def _limit(what: str, value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number, got {value!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{what} must be a positive number, got {value!r}; to turn clipping off, do not call it")
    return x


def clip_by_value(grads: Arrays, limit: float) -> None:
    """Clamp every gradient element to ``[-limit, limit]``, in place."""
    limit = _limit("clip value limit", limit)
    kernels = numba_kernels()  # Numba's one pass, when it may run: np.clip's calls cost more on small arrays
    for g in grads.values():
        if kernels and g.dtype.kind == "f" and g.flags.c_contiguous:
            kernels.clip(g, limit)
        else:
            np.clip(g, -limit, limit, out=g)


def global_norm(grads: Arrays) -> float:
    """The L2 norm of all gradients taken together, as if concatenated into
    one vector; inf or NaN if any element is."""
    norms = []
    kernels = numba_kernels()  # Numba's one pass for float32, when it may run
    for g in grads.values():
        g = np.asarray(g)
        if g.size == 0:
            continue
        if kernels and g.dtype == np.float32 and g.flags.c_contiguous:
            total = kernels.sum_of_squares(g.reshape(-1))
            if math.isfinite(total):
                norms.append(math.sqrt(total))
                continue
        peak = float(np.max(np.abs(g)))
        if not math.isfinite(peak):
            norms.append(peak if math.isnan(peak) else math.inf)
            # np.max propagates NaN but an inf could hide a later NaN
            if np.isnan(g).any():
                return math.nan
            continue
        if peak == 0.0:
            continue
        with np.errstate(under="ignore"):  # elements far below the peak may flush to 0: harmless
            scaled = (g.astype(np.float64) / peak).ravel()  # in [-1, 1], so squaring cannot overflow
            # a plain reduction, not BLAS's dot: a BLAS call wakes OpenBLAS's threads, which then spin
            # beside oneDNN's for a while after it (see onednn.py)
            norms.append(peak * math.sqrt(float(np.einsum("i,i->", scaled, scaled))))
    if any(math.isnan(n) for n in norms):
        return math.nan
    return math.hypot(*norms) if norms else 0.0


def clip_by_global_norm(grads: Arrays, max_norm: float) -> float:
    """Scale all gradients by one factor so that their global L2 norm is at
    most ``max_norm``, in place; return the norm *before* clipping.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: the factor is
    ``min(1, max_norm / (norm + 1e-6))``.
    """
    max_norm = _limit("max_norm", max_norm)
    norm = global_norm(grads)
    if not math.isfinite(norm):
        return norm
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= coef  # a Python float keeps float32 gradients float32
    return norm
