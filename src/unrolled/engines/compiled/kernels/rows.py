"""One vertex, one row, one step: the Numba kernels the whole-run function calls.

These are the structural ops' kernels (products, copies, lookups, losses); the
elementwise ops' kernels are rendered from their formulas in the op table
(``fuse.row_kernels``).

``wholestep.py`` writes a small graph's whole run as one function; spelled
out inline, every vertex's loops made that function slow for Numba to
compile (twenty seconds for a two-layer LSTM). Written once here and called,
each kernel compiles once per precision and is cached on disk, and the
generated function is a list of calls.

Every array is a 1-D row (a parameter vector is a row shared by all) except
the weights, read in their own layout ``W [out, in]``: a product reads its
input part by part (the parts of a concatenation), a dense part as dot
products with rows of ``W``, a one-hot part as the one column it picks, so
the 74 zeros of a one-hot vector cost nothing and no transposed copy is
made. Constants are cast to the rows' precision, so float32 stays float32.

Offsets into a row (``at``): a kernel compiled on its own sees ``at`` as
any integer, checks ``W[j, at + k]`` for wrap-around at every element and
does not vectorize; inside the whole-run function, where LLVM inlines the
kernel and ``at`` is a literal, it vectorizes, and taking a view of each
row first (``W[j, at:at + n]``) costs more than it saves there (the view's
own bookkeeping, and LLVM loses the literal offset), so ``product_dx_row``
indexes ``W`` directly. Kernels whose speed alone matters keep their views
(``add_dot_rows``, ``copy_row``, forward).

Products over all steps at once (the weight gradients after the backward
loop, a readout's product over every step) are not row kernels: the
whole-run function passes them to BLAS (``arrays.matmul_add``), whose
blocked kernels beat a row at a time once the rows of all steps are there.

The float32 e^x is scalars.py's (``exp1``), inlined here. Numba's disk cache of these kernels is keyed by
this file alone: a change to those functions must come with a change to
this file (or an emptied ``__pycache__``), or the old machine code runs.
"""

from __future__ import annotations

import numba
import numpy as np

from .scalars import cast, exp1

_jit = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
_dot = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract", "reassoc"})


# ------------------------------------------------------------------ forward


@_dot
def add_dot_rows(y, W, at, x, n, m):
    """``y[:m] += W[:m, at:at+n] x[:n]``: one dot product per output, summed in any order (it
    vectorizes), four outputs at a time (each element of ``x`` loaded once for four rows of ``W``).
    The caller passes the sizes ``n`` and ``m`` as literals: inlined, LLVM then knows the trip
    counts and schedules the short rows of a small model better than for any length."""
    j = 0
    while j + 4 <= m:
        w0, w1, w2, w3 = W[j, at:at + n], W[j + 1, at:at + n], W[j + 2, at:at + n], W[j + 3, at:at + n]
        s0 = s1 = s2 = s3 = cast(0.0, y[0])
        for k in range(n):
            xk = x[k]
            s0 += w0[k] * xk
            s1 += w1[k] * xk
            s2 += w2[k] * xk
            s3 += w3[k] * xk
        y[j] += s0
        y[j + 1] += s1
        y[j + 2] += s2
        y[j + 3] += s3
        j += 4
    while j < m:
        w = W[j, at:at + n]  # a view: W[j, at + k] is checked for wrap-around each time (no vectors)
        s = cast(0.0, y[0])
        for k in range(n):
            s += w[k] * x[k]
        y[j] += s
        j += 1


@_jit
def add_column(y, W, c):
    """``y += W[:, c]``: the product of ``W`` with a one-hot vector."""
    for j in range(y.shape[0]):
        y[j] += W[j, c]


@_jit
def set_row(y, x):
    for j in range(y.shape[0]):
        y[j] = x[j]


@_jit
def zero_row(y):
    for j in range(y.shape[0]):
        y[j] = 0


@_jit
def copy_row(y, y_at, x, x_at, n):
    """``y[y_at:y_at+n] = x[x_at:x_at+n]``: identity, a concatenation's part, a slice."""
    y, x = y[y_at:y_at + n], x[x_at:x_at + n]  # views: an index computed from an argument is
    for j in range(n):                          # checked for wrap-around each time, which stops
        y[j] = x[j]                             # the loop from vectorizing


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
        probs[j] = exp1(z[j] - m)  # float32: vectorized (a third of this row's time with the C library's)
    s = cast(0.0, z[0])
    for j in range(z.shape[0]):
        s += probs[j]
    r = cast(1.0, s) / s
    for j in range(z.shape[0]):
        probs[j] = probs[j] * r
    loss[0] = np.log(s) + m - z[k]


@_jit
def mse_row(loss, p, q):
    s = 0.0
    for j in range(p.shape[0]):
        s += (p[j] - q[j]) * (p[j] - q[j])
    loss[0] = s / p.shape[0]


# ------------------------------------------------------------------ backward


@_jit
def product_dx_row(dx, g, W, at, n, m):
    """``dx += (Wᵀ g)[at:at+n]``: the gradient of one part of a product's input, as rows of ``W``
    scaled by the gradients, four rows at a time (``dx`` read and written once per four rows; a
    block of four zero gradients adds nothing). ``W[j, at + k]`` rather than a view of the row: see
    the module's note on offsets."""
    j = 0
    while j + 4 <= m:
        g0, g1, g2, g3 = g[j], g[j + 1], g[j + 2], g[j + 3]
        if g0 != 0 or g1 != 0 or g2 != 0 or g3 != 0:
            for k in range(n):
                dx[k] += W[j, at + k] * g0 + W[j + 1, at + k] * g1 + W[j + 2, at + k] * g2 + W[j + 3, at + k] * g3
        j += 4
    while j < m:
        gj = g[j]
        if gj != 0:
            for k in range(n):
                dx[k] += W[j, at + k] * gj
        j += 1


@_jit
def product_dw_row(D, at, x, g):
    """``D[:, at:at+n] += g xᵀ`` for one row."""
    n = x.shape[0]
    for j in range(g.shape[0]):
        gj = g[j]
        if gj != 0:
            d = D[j, at:at + n]
            for k in range(n):
                d[k] += gj * x[k]


@_jit
def product_dw_picks(D, at, I, G):
    """``D[:, at:at+n] += Gᵀ one_hot(I)``: each row's gradient added to the one column it picked."""
    for t in range(I.shape[0]):
        for b in range(I.shape[1]):
            c = at + I[t, b]
            for j in range(G.shape[2]):
                D[j, c] += G[t, b, j]


@_jit
def add_rows_to(d, G):
    """``d += Σ G[t, b]``: a bias's gradient over all rows of all steps, after the backward loop."""
    G = G.reshape(G.shape[0] * G.shape[1], G.shape[2])
    for r in range(G.shape[0]):
        for j in range(d.shape[0]):
            d[j] += G[r, j]


@_jit
def add_to_row(d, d_at, g, g_at, n):
    """``d[d_at:d_at+n] += g[g_at:g_at+n]``: add, identity, bias, concatenation, slice."""
    d, g = d[d_at:d_at + n], g[g_at:g_at + n]
    for j in range(n):
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


# ------------------------------------------------------------------ whole arrays


@_dot
def all_finite(a):
    """Whether every entry of ``a`` is finite: ``x * 0`` is 0 for a finite ``x`` and NaN for an
    infinity or a NaN, so one vectorized sum (in any order) says it, with no early exit."""
    flat = a.ravel()
    if flat.shape[0] == 0:
        return True
    zero = cast(0.0, flat[0])
    acc = zero
    for i in range(flat.shape[0]):
        acc += flat[i] * zero
    return acc == 0


@_jit
def copy_steps(dst, src):
    """``dst[...] = src`` for ``[steps, B, F]`` arrays: initial states, a delayed dense input."""
    for t in range(dst.shape[0]):
        for b in range(dst.shape[1]):
            for j in range(dst.shape[2]):
                dst[t, b, j] = src[t, b, j]


@_jit
def add_steps(dst, src):
    """``dst += src`` for ``[steps, B, F]`` arrays: gradients given for outputs and final states."""
    for t in range(dst.shape[0]):
        for b in range(dst.shape[1]):
            for j in range(dst.shape[2]):
                dst[t, b, j] += src[t, b, j]


@_jit
def masked_sum(L, M):
    """``Σ L[t, b, 0] · M[t, b]`` in float64: a loss's total before its divisor."""
    s = 0.0
    for t in range(L.shape[0]):
        for b in range(L.shape[1]):
            s += L[t, b, 0] * M[t, b]
    return s


@_jit
def seed_loss(G, M, N):
    """``G[t, b, 0] = M[t, b] / N``: d total / d loss at each step, where backward starts."""
    n = cast(N, G[0, 0, 0])
    for t in range(G.shape[0]):
        for b in range(G.shape[1]):
            G[t, b, 0] = M[t, b] / n


# ------------------------------------------------------------------ the phase engine's rows


@_jit
def cross_entropy_rows(L, Z, K, P):
    """``L[r, 0] = -log softmax(Z[r])[K[r]]`` for every row, the softmax kept in ``P`` for the
    gradient: cross-entropy over all steps in one pass a row, where NumPy makes five passes over
    the logits (shift, exp, sum, log, pick), each reading them from memory again."""
    for r in range(Z.shape[0]):
        cross_entropy_row(L[r], Z[r], K[r], P[r])


@_jit
def cross_entropy_back_rows(dZ, G, P, K):
    """``dZ[r] = G[r, 0] · (P[r] - one_hot(K[r]))`` for every row, from the softmax the compiled
    engine's forward pass kept (``cross_entropy_rows``): cross-entropy's gradient over all steps."""
    for r in range(dZ.shape[0]):
        gl = G[r, 0]
        d, p = dZ[r], P[r]
        for j in range(d.shape[0]):
            d[j] = gl * p[j]
        d[K[r]] -= gl
