"""The few kernels generation needs beyond the step loops': token lookups, sampling,
and the matrix products of a batch of one or a few rows.

The lookups and sampling exist twice, for Numba and for plain NumPy, doing the
same arithmetic in the same order (float64 probabilities, a sequential running
sum, the first class whose running sum passes ``u * total``), so that both
paths draw the same token from the same uniform number. Only e^z differs: the
Numba draw computes it by a formula (``exp_draw``) whose loop vectorizes, where
the C library's exp went one class at a time and was most of a draw, on the
path of every generated character; NumPy's exp and the formula agree within
an ulp (as NumPy's and the C library's do), so the two paths draw different
tokens only where ``u * total`` falls within an ulp or so of a class's edge.

The products (``matmul_rows``, ``linear_rows``, and their ``_columns`` and ``_pieces`` shares) are Numba only: the NumPy
path calls ``blas.product``, and above ``LOOP_ROWS`` rows the generated code
calls the training loops' ``matmul`` instead (see feedback.py). At one row a
step a product is a matrix-vector product, bound by reading the weights, and BLAS's call costs as much as a
plain loop's arithmetic; the loop can also skip the rows of the weights that
meet a zero input, so a one-hot input reads one row instead of all of them.
"""

from __future__ import annotations

import numpy as np

from unrolled.graph.ops import sigmoid as sigmoid_exact


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
    from .arrays import entry
    from .scalars import exp_draw

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
        """As ``sample_rows_numpy``, in the same order; ``probs`` holds ``z`` until it is exponentiated,
        so that a draw allocates nothing."""
        rows, classes = logits.shape
        for b in range(rows):
            z = probs[b]
            m = -np.inf
            for j in range(classes):
                z[j] = np.float64(logits[b, j]) / temperature
                m = max(m, z[j])
            for j in range(classes):
                z[j] -= m
            threshold = np.sort(z)[classes - top_k] if top_k > 0 else 0.0
            for j in range(classes):  # no sum in this loop: alone, it vectorizes
                p = exp_draw(z[j])
                if top_k > 0 and z[j] < threshold:
                    p = 0.0
                probs[b, j] = p
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

    # Above this many rows a product is BLAS's (the generated code chooses): a matrix-matrix
    # product, where its blocking pays.
    LOOP_ROWS = 8
    _jit_contract = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})

    @_jit_contract
    def _accumulate_columns(x, W, out, lo, hi, first):
        """``out[:, lo:hi] += x @ W[:, first:first + hi - lo]`` for ``x`` [B, K], small B.

        ``first`` is ``lo`` where ``W`` holds every column, 0 where it holds
        just these (feedsplit.py gives each thread a copy of its own columns,
        which the cache streams through in one run). ``W`` streams through
        once, four of its rows at a time (each pass over ``out`` then carries
        four rows' worth of work), and a group of four zero inputs skips its
        rows of ``W`` altogether. Each entry of ``out`` gets the same sums in
        the same order whatever the range or copy, so threads that share a
        product by columns compute what one thread would.
        """
        rows, inner = x.shape
        k = 0
        while k + 4 <= inner:
            for i in range(rows):
                a0, a1, a2, a3 = x[i, k], x[i, k + 1], x[i, k + 2], x[i, k + 3]
                if a0 != 0 or a1 != 0 or a2 != 0 or a3 != 0:
                    for m in range(hi - lo):
                        c = first + m
                        out[i, lo + m] += a0 * W[k, c] + a1 * W[k + 1, c] + a2 * W[k + 2, c] + a3 * W[k + 3, c]
            k += 4
        for k in range(k, inner):
            for i in range(rows):
                a = x[i, k]
                if a != 0:
                    for m in range(hi - lo):
                        out[i, lo + m] += a * W[k, first + m]

    @_jit
    def matmul_columns(x, W, out, lo, hi, first):
        """``out[:, lo:hi] = x @ W[:, first:first + hi - lo]`` for at most ``LOOP_ROWS`` rows."""
        for i in range(out.shape[0]):
            for n in range(lo, hi):
                out[i, n] = 0
        _accumulate_columns(x, W, out, lo, hi, first)

    @_jit
    def linear_columns(x, W, bias, out, lo, hi, first):
        """``out[:, lo:hi] = (x @ W[:, first:first + hi - lo] + bias)[:, lo:hi]`` for at most ``LOOP_ROWS``
        rows, the bias written first so that the product adds onto it."""
        for i in range(out.shape[0]):
            for n in range(lo, hi):
                out[i, n] = entry(bias, i, n)
        _accumulate_columns(x, W, out, lo, hi, first)

    @_jit
    def matmul_pieces_own(x, W, out, starts, n, own):
        """``out[:, s:s + n] = x @ W[:, k n:(k + 1) n]`` for the k-th start ``s``: a thread's share of a
        product, as pieces of ``n`` columns (feedsplit.py: one piece, or the entries its share of
        the next loop reads) from a copy of their columns side by side.

        The sums go to ``own``, a block of the thread's own, and into ``out`` once at the end.
        Summed in place, the product rewrote its entries of ``out`` once for every four rows of
        ``W``; the entries beside them are another thread's, and a core's prefetchers, fetching the
        lines near those it writes, kept taking the other core's lines from it, so both threads'
        products ran far slower side by side than alone. Summed apart, each entry gets the same
        sums in the same order as in ``matmul_rows``."""
        block = _pieces_block(out, starts, n, own)
        for i in range(block.shape[0]):
            for m in range(block.shape[1]):
                block[i, m] = 0
        _accumulate_columns(x, W, block, 0, block.shape[1], 0)
        _copy_pieces(block, out, starts, n)

    @_jit
    def linear_pieces_own(x, W, bias, out, starts, n, own):
        """``matmul_pieces_own`` plus the bias, written first so that the product adds onto it."""
        block = _pieces_block(out, starts, n, own)
        for i in range(block.shape[0]):
            for k in range(len(starts)):
                for m in range(n):
                    block[i, k * n + m] = entry(bias, i, starts[k] + m)
        _accumulate_columns(x, W, block, 0, block.shape[1], 0)
        _copy_pieces(block, out, starts, n)

    @_jit
    def _pieces_block(out, starts, n, own):
        rows, width = out.shape[0], n * len(starts)
        return own[:rows * width].reshape((rows, width))

    @_jit
    def _copy_pieces(block, out, starts, n):
        for i in range(block.shape[0]):
            for k in range(len(starts)):
                for m in range(n):
                    out[i, starts[k] + m] = block[i, k * n + m]

    @_jit
    def matmul_rows(x, W, out):
        """``out = x @ W`` for at most ``LOOP_ROWS`` rows."""
        matmul_columns(x, W, out, 0, out.shape[1], 0)

    @_jit
    def linear_rows(x, W, bias, out):
        """``out = x @ W + bias`` for at most ``LOOP_ROWS`` rows."""
        linear_columns(x, W, bias, out, 0, out.shape[1], 0)
