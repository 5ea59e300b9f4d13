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
def product_dx_row(dx, g, W):
    """``dx += Wᵀ g``, as rows of ``W`` scaled by the nonzero gradients."""
    for j in range(g.shape[0]):
        gj = g[j]
        if gj != 0:
            for k in range(dx.shape[0]):
                dx[k] += W[j, k] * gj


@_jit
def product_dw_row(DT, x, g):
    """``Wᵀ``'s gradient ``+= x gᵀ``, one row per nonzero input."""
    for k in range(x.shape[0]):
        xk = x[k]
        if xk != 0:
            for j in range(g.shape[0]):
                DT[k, j] += xk * g[j]


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
