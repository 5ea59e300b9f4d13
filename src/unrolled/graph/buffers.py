"""Arrays whose data start on a cache line.

NumPy's arrays start wherever ``malloc`` puts them: 16 bytes past a 64-byte
boundary for a large one, anywhere on 16 for a small one. A matrix product
that reads its operand off a cache line reads it more slowly, so a process's
speed would depend on the addresses it happened to get. Parameters, the
compiled engine's buffers and its weight copies are made here instead.

Plain NumPy: the graph layer uses it for fresh parameters, so it must not
load any native library (the BLAS bindings live in blas.py and onednn.py).
"""

from __future__ import annotations

import math

import numpy as np

ALIGN = 64  # bytes: a cache line, and one AVX-512 register


def address(a: np.ndarray) -> int:
    """Where ``a``'s data start, as a C pointer takes it: read from the array interface, which is
    made in C, where ``a.ctypes`` builds a Python object on every call."""
    return a.__array_interface__["data"][0]


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on a cache line."""
    dtype = np.dtype(dtype)
    # math.prod: NumPy's prod of a tuple builds an array and runs a reduction, many times the cost
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = -address(raw) % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype) -> np.ndarray:
    """Zeros on a cache line (see :func:`aligned_empty`)."""
    a = aligned_empty(shape, dtype)
    a[...] = 0
    return a


def kept(keep: dict, key, shape, dtype) -> np.ndarray:
    """The uninitialized array ``keep[key]``, made on a cache line where there is none of this
    shape and dtype yet: a buffer a loop of runs rewrites, rather than a new array each run whose
    pages are faulted in anew."""
    shape, dtype = tuple(shape), np.dtype(dtype)
    out = keep.get(key)
    if out is None or out.shape != shape or out.dtype != dtype:
        out = keep[key] = aligned_empty(shape, dtype)
    return out


def aligned(a: np.ndarray, dtype=None, keep: dict | None = None, key=None) -> np.ndarray:
    """``a`` as a C-contiguous array on a cache line (``a`` itself when it already is one).

    With ``keep``, the copy goes into :func:`kept`'s array ``keep[key]``."""
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    if a.dtype == dtype and a.flags.c_contiguous and address(a) % ALIGN == 0:
        return a
    out = aligned_empty(a.shape, dtype) if keep is None else kept(keep, key, a.shape, dtype)
    return copy_into(out, a)


def copy_into(out: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``a``'s values written into ``out`` (same shape); a transposed view in blocks of columns."""
    if a.ndim == 2 and abs(a.strides[0]) < abs(a.strides[1]):  # a transposed view, as of a weight
        for j in range(0, a.shape[1], TRANSPOSE_BLOCK):
            np.copyto(out[:, j:j + TRANSPOSE_BLOCK], a[:, j:j + TRANSPOSE_BLOCK])
    else:
        np.copyto(out, a)
    return out


# A transposed view copied whole is read a stride apart for every number written: once the matrix
# outgrows the cache, each number costs a cache line fetched, and the copy takes many times as long
# as a plain one (benchmarks/RESULTS.md). Copied this many of its columns at a time, the lines that
# block reads stay in the cache until each is used up.
TRANSPOSE_BLOCK = 64
