"""One vertex, one row, one step: the Numba kernels the whole-run function calls.

``wholestep.py`` writes a small graph's whole run as one function; spelled
out inline, every vertex's loops made that function slow for Numba to
compile (twenty seconds for a two-layer LSTM). Written once here and called,
each kernel compiles once per precision and is cached on disk, and the
generated function is a list of calls.

Every array is a 1-D row (a parameter vector is a row shared by all) except
the weights: ``WT`` is a product's weight transposed, ``[in, out]``, so that
each input adds one contiguous row of it, and a zero input (a one-hot
vector's zeros) adds nothing; its gradient ``DT`` accumulates in the same
layout. Constants are cast to the rows' precision, so float32 stays float32.
"""

from __future__ import annotations

import numba
import numpy as np

from .jitkernels import _cast, _sigmoid1, _tanh1

_jit = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})


# ------------------------------------------------------------------ forward


@_jit
def transpose_into(WT, W):
    """``WT = Wᵀ``: a product's weight in the layout its rows are read in."""
    for j in range(W.shape[0]):
        for k in range(W.shape[1]):
            WT[k, j] = W[j, k]


@_jit
def product_row(y, x, WT):
    """``y = W x``, as rows of ``WT`` scaled by the nonzero inputs."""
    y[:] = 0
    add_product_row(y, x, WT)


@_jit
def linear_row(y, x, WT, bias):
    """``y = W x + b``."""
    y[:] = bias
    add_product_row(y, x, WT)


@_jit
def add_product_row(y, x, WT):
    for k in range(x.shape[0]):
        xk = x[k]
        if xk != 0:
            for j in range(y.shape[0]):
                y[j] += WT[k, j] * xk


@_jit
def add_row(y, a, b):
    for j in range(y.shape[0]):
        y[j] = a[j] + b[j]


@_jit
def sub_row(y, a, b):
    for j in range(y.shape[0]):
        y[j] = a[j] - b[j]


@_jit
def mul_row(y, a, b):
    for j in range(y.shape[0]):
        y[j] = a[j] * b[j]


@_jit
def scale_row(y, x, c):
    c = _cast(c, y[0])
    for j in range(y.shape[0]):
        y[j] = x[j] * c


@_jit
def one_minus_row(y, x):
    one = _cast(1.0, y[0])
    for j in range(y.shape[0]):
        y[j] = one - x[j]


@_jit
def tanh_row(y, x):
    for j in range(y.shape[0]):
        y[j] = _tanh1(x[j])


@_jit
def sigmoid_row(y, x):
    for j in range(y.shape[0]):
        y[j] = _sigmoid1(x[j])


@_jit
def relu_row(y, x):
    zero = _cast(0.0, y[0])
    for j in range(y.shape[0]):
        y[j] = x[j] if x[j] > 0 else zero


@_jit
def copy_row(y, y_at, x, x_at, n):
    """``y[y_at:y_at+n] = x[x_at:x_at+n]``: identity, a concatenation's part, a slice."""
    for j in range(n):
        y[y_at + j] = x[x_at + j]


@_jit
def one_hot_row(y, k):
    y[:] = 0
    y[k] = 1


@_jit
def embedding_row(y, E, k):
    for j in range(y.shape[0]):
        y[j] = E[k, j]


@_jit
def cross_entropy_row(loss, z, k, probs):
    """``loss[0] = -log softmax(z)[k]``; keeps softmax(z) in ``probs`` for the gradient."""
    m = z[0]
    for j in range(1, z.shape[0]):
        m = max(m, z[j])
    for j in range(z.shape[0]):
        probs[j] = np.exp(z[j] - m)
    s = 0.0
    for j in range(z.shape[0]):
        s += probs[j]
    for j in range(z.shape[0]):
        probs[j] = probs[j] / s
    loss[0] = np.log(s) + m - z[k]


@_jit
def mse_row(loss, p, q):
    s = 0.0
    for j in range(p.shape[0]):
        s += (p[j] - q[j]) * (p[j] - q[j])
    loss[0] = s / p.shape[0]


# ------------------------------------------------------------------ backward


@_jit
def product_dx_row(dx, g, W, lo, hi):
    """``dx[lo:hi] += (Wᵀ g)[lo:hi]``, as rows of ``W`` scaled by the nonzero gradients: only the
    columns whose gradient goes somewhere (not a concatenation's one-hot part)."""
    for j in range(g.shape[0]):
        gj = g[j]
        if gj != 0:
            for k in range(lo, hi):
                dx[k] += W[j, k] * gj


@_jit
def product_dw(DT, X, G):
    """``Wᵀ``'s gradient ``+= Xᵀ G`` over all rows of all steps (``X [T, B, in]``, ``G [T, B, out]``),
    after the backward loop: four rows at a time, so each row of ``DT`` is read and written once per
    four rows, not once per row; columns of ``X`` that are zero in all four (one-hot) add nothing."""
    X = X.reshape(X.shape[0] * X.shape[1], X.shape[2])
    G = G.reshape(G.shape[0] * G.shape[1], G.shape[2])
    R, n, m = X.shape[0], X.shape[1], G.shape[1]
    r = 0
    while r + 4 <= R:
        g0, g1, g2, g3 = G[r], G[r + 1], G[r + 2], G[r + 3]
        for k in range(n):
            x0, x1, x2, x3 = X[r, k], X[r + 1, k], X[r + 2, k], X[r + 3, k]
            if x0 != 0 or x1 != 0 or x2 != 0 or x3 != 0:
                d = DT[k]
                for j in range(m):
                    d[j] += x0 * g0[j] + x1 * g1[j] + x2 * g2[j] + x3 * g3[j]
        r += 4
    while r < R:
        product_dw_row(DT, X[r], G[r])
        r += 1


@_jit
def add_rows_to(d, G):
    """``d += Σ G[t, b]``: a bias's gradient over all rows of all steps, after the backward loop."""
    G = G.reshape(G.shape[0] * G.shape[1], G.shape[2])
    for r in range(G.shape[0]):
        for j in range(d.shape[0]):
            d[j] += G[r, j]


@_jit
def product_dw_row(DT, x, g):
    """``Wᵀ``'s gradient ``+= x gᵀ``, one row per nonzero input."""
    for k in range(x.shape[0]):
        xk = x[k]
        if xk != 0:
            for j in range(g.shape[0]):
                DT[k, j] += xk * g[j]


@_jit
def add_transposed(D, DT):
    """``D += DTᵀ``: a weight's gradient, kept transposed during the run, in the weight's layout."""
    for j in range(D.shape[0]):
        for k in range(D.shape[1]):
            D[j, k] += DT[k, j]


@_jit
def add_to_row(d, d_at, g, g_at, n):
    """``d[d_at:d_at+n] += g[g_at:g_at+n]``: add, identity, bias, concatenation, slice."""
    for j in range(n):
        d[d_at + j] += g[g_at + j]


@_jit
def sub_from_row(d, g):
    for j in range(d.shape[0]):
        d[j] -= g[j]


@_jit
def mul_back_row(d, g, other):
    for j in range(d.shape[0]):
        d[j] += g[j] * other[j]


@_jit
def scale_back_row(d, g, c):
    c = _cast(c, g[0])
    for j in range(d.shape[0]):
        d[j] += g[j] * c


@_jit
def tanh_back_row(d, g, y):
    one = _cast(1.0, g[0])
    for j in range(d.shape[0]):
        d[j] += g[j] * (one - y[j] * y[j])


@_jit
def sigmoid_back_row(d, g, y):
    one = _cast(1.0, g[0])
    for j in range(d.shape[0]):
        d[j] += g[j] * y[j] * (one - y[j])


@_jit
def relu_back_row(d, g, x):
    for j in range(d.shape[0]):
        if x[j] > 0:
            d[j] += g[j]


@_jit
def embedding_back_row(D, k, g):
    for j in range(g.shape[0]):
        D[k, j] += g[j]


@_jit
def cross_entropy_back_row(dz, gl, probs, k):
    """``dz += gl · (softmax(z) - one_hot(k))``, softmax kept by the forward pass."""
    for j in range(dz.shape[0]):
        dz[j] += gl * probs[j]
    dz[k] -= gl


@_jit
def mse_back_row(d, c, p, q):
    """``d += c · (p - q)``, with ``c = ±2 g / F``."""
    for j in range(d.shape[0]):
        d[j] += c * (p[j] - q[j])
