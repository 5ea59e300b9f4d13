"""The few kernels generation needs beyond the step loops': token lookups and sampling.

Each exists twice, for Numba and for plain NumPy, doing the same arithmetic
in the same order (float64 probabilities, a sequential running sum, the
first class whose running sum passes ``u * total``), so that both paths
draw the same token from the same uniform number.
"""

from __future__ import annotations

import numpy as np

from .ops import sigmoid as sigmoid_exact


def sigmoid_numpy(a, out):
    np.copyto(out, sigmoid_exact(a))


def one_hot_numpy(idx, out):
    out[...] = 0
    out[np.arange(idx.shape[0]), idx] = 1


def gather_rows_numpy(E, idx, out):
    np.take(E, idx, axis=0, out=out)


def sample_rows_numpy(logits, temperature, top_k, u, probs, tok):
    """Draw one class per row from softmax(logits / temperature), keeping only the top k if k > 0."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=probs)
    if top_k > 0:
        threshold = np.sort(z, axis=1)[:, z.shape[1] - top_k][:, None]
        probs[z < threshold] = 0.0
    cum = np.cumsum(probs, axis=1)
    for b in range(z.shape[0]):
        j = int(np.searchsorted(cum[b], u[b] * cum[b, -1], side="right"))
        tok[b] = min(j, z.shape[1] - 1)


try:
    import numba
except ImportError:  # pragma: no cover - the NumPy versions above serve
    numba = None

if numba is not None:
    _jit = numba.njit(cache=True, nogil=True, error_model="numpy")

    @_jit
    def one_hot(idx, out):
        for b in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[b, j] = 0.0
            out[b, idx[b]] = 1.0

    @_jit
    def gather_rows(E, idx, out):
        for b in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[b, j] = E[idx[b], j]

    @_jit
    def sample_rows(logits, temperature, top_k, u, probs, tok):
        rows, classes = logits.shape
        z = np.empty(classes, dtype=np.float64)
        for b in range(rows):
            m = -np.inf
            for j in range(classes):
                z[j] = np.float64(logits[b, j]) / temperature
                m = max(m, z[j])
            for j in range(classes):
                z[j] -= m
                probs[b, j] = np.exp(z[j])
            if top_k > 0:
                threshold = np.sort(z)[classes - top_k]
                for j in range(classes):
                    if z[j] < threshold:
                        probs[b, j] = 0.0
            total = 0.0
            for j in range(classes):
                total += probs[b, j]
            target = u[b] * total
            running = 0.0
            choice = classes - 1
            for j in range(classes):
                running += probs[b, j]
                if running > target:
                    choice = j
                    break
            tok[b] = choice
