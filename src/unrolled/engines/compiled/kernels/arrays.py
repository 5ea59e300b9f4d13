"""Numba versions of the NumPy calls the compiled engine's step loops make.

With Numba installed, the compiled engine hands its generated loops to
``numba.njit`` (no interpreter between steps: when a step's arrays are
small, NumPy's cost is the call, a dozen calls a step at a microsecond
each), and these kernels stand in for the ufuncs under the same names and
argument order, so one generated text serves both. Products go to NumPy's
own BLAS when it can be found (see blas.py), which takes transposed and
row-strided views as they are.

Operands broadcast the way the loops need: a ``[B, F]`` array, a parameter
vector ``[F]`` (shared by every row) or a Python number.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

from . import compiling as _compiling
from .blas import NO_TRANS, ROW_MAJOR
from .blas import lead as blas_lead
from .jitcache import prepare_numba_cache
from .onednn import NO as ONEDNN_NO
from .onednn import SMALL as ONEDNN_SMALL
from .onednn import YES as ONEDNN_YES
from .scalars import sigmoid1, tanh1

prepare_numba_cache()  # before the first cache=True function
jit = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})  # FMA: faster, no less exact
_compiling.listen()  # the user is told when compiling begins, and budgets leave its time out


def entry(x, i, j):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(entry, inline="always")
def _at_overload(x, i, j):
    if isinstance(x, types.Array):
        if x.ndim == 2:
            return lambda x, i, j: x[i, j]
        return lambda x, i, j: x[j]
    return lambda x, i, j: x


@jit
def add(a, b, out):
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = entry(a, i, j) + entry(b, i, j)


@jit
def add_rows(out, W, idx):
    """``out[b] += W[idx[b]]``: a product with one-hot rows, as the row pick it is."""
    for b in range(out.shape[0]):
        r = idx[b]
        for j in range(out.shape[1]):
            out[b, j] += W[r, j]


@jit
def scatter_add_rows(out, idx, G):
    """``out[idx[r]] += G[r]`` for every row r: the weight gradient of a product with one-hot rows."""
    for r in range(G.shape[0]):
        k = idx[r]
        for j in range(G.shape[1]):
            out[k, j] += G[r, j]


@jit
def add_transposed(out, a):
    """``out += a.T``, sixteen rows of ``out`` at a time: each row of ``a`` is read in runs of sixteen
    while those rows of ``out`` stay in L1. The scattered one-hot weight gradient (``[V, out]``) goes
    into its columns of the weight's gradient so, where NumPy's add of the transposed view would
    stride through ``out`` a column at a time."""
    n, m = out.shape
    for i0 in range(0, n, 16):
        i1 = min(i0 + 16, n)
        for j in range(m):
            for i in range(i0, i1):
                out[i, j] += a[j, i]


@jit
def subtract(a, b, out):
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = entry(a, i, j) - entry(b, i, j)


@jit
def multiply(a, b, out):
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = entry(a, i, j) * entry(b, i, j)


@jit
def maximum(a, b, out):
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = max(entry(a, i, j), entry(b, i, j))


@jit
def greater(a, b, out):
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = entry(a, i, j) > entry(b, i, j)


@jit
def negative(a, out):
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = -a[i, j]


@jit
def reciprocal(a, out):
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = 1.0 / a[i, j]


@jit
def sigmoid(a, out):
    """σ(x) = (1 + tanh(x/2)) / 2: no overflow anywhere, and the float32 path vectorizes."""
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = sigmoid1(a[i, j])  # stays float32 (a 0.5 literal would promote it to float64)


@jit
def exp(a, out):
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = math.exp(a[i, j])


@jit
def tanh(a, out):
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = tanh1(a[i, j])


@jit
def copyto(out, a):
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = a[i, j]


try:  # Numba reaches BLAS through SciPy; without it, the loop below does the products
    import scipy.linalg.cython_blas  # noqa: F401

    HAVE_BLAS = True
except ImportError:  # pragma: no cover - depends on the installation
    HAVE_BLAS = False


def _gemm_functions():
    """NumPy's own ``cblas_?gemm`` as Numba external functions (see blas.py), or ``None``.

    They are called by symbol name, registered here with the JIT linker, so
    loops that call them can still be cached on disk: the address changes from
    process to process, the name does not."""
    from . import blas

    if blas.GEMM is None:
        return None
    import ctypes

    out = []
    for fn, real in zip(blas.GEMM, (types.float32, types.float64)):
        integer = types.int64 if fn.argtypes[3] is ctypes.c_int64 else types.int32
        p = types.uintp  # an address, passed as the C pointer it is
        out.append(_external(f"unrolled_{fn.__name__}", fn, types.void(
            types.int32, types.int32, types.int32, integer, integer, integer, real,
            p, integer, p, integer, real, p, integer)))
    return tuple(out)


def _external(name: str, fn, signature):
    """The ctypes function ``fn`` registered with the JIT linker as ``name``, callable from Numba."""
    import ctypes

    import llvmlite.binding as llvm

    llvm.add_symbol(name, ctypes.cast(fn, ctypes.c_void_p).value)
    return types.ExternalFunction(name, signature)


_GEMM = _gemm_functions()
BLAS_NAME = "numpy" if _GEMM is not None else ("scipy" if HAVE_BLAS else "loops")


def _onednn_function():
    """oneDNN's ``dnnl_sgemm`` as a Numba external function (see onednn.py), or ``None``;
    registered by name like the BLAS above."""
    from . import onednn

    if onednn.SGEMM is None:
        return None
    p, dim = types.uintp, types.int64
    return _external("unrolled_dnnl_sgemm", onednn.SGEMM, types.int32(
        types.int8, types.int8, dim, dim, dim, types.float32, p, dim, p, dim, types.float32, p, dim))


_SGEMM_ONEDNN = _onednn_function()
PRODUCTS = BLAS_NAME + (" BLAS, oneDNN sgemm" if _SGEMM_ONEDNN is not None else " BLAS")  # part of generated loops' text


def matmul(a, b, out):  # pragma: no cover - replaced by the overload in jitted code
    """``out = a @ b`` in generated loops: oneDNN for large float32 products when installed, else as
    :func:`matmul_blas`. Generated text names :data:`PRODUCTS`, so that its cached machine code,
    which calls oneDNN by name, is never loaded where oneDNN is off; library code calls
    :func:`matmul_blas`, whose cache has no such key."""
    raise NotImplementedError


def matmul_add(a, b, out):  # pragma: no cover - replaced by the overload in jitted code
    """``out += a @ b`` in generated loops, by the product itself (BLAS's beta = 1): a step's
    product added onto its loop-free half reads that half once, inside the product's own pass,
    where a product into scratch and then an add would read the cold ``Y[t]`` a second time."""
    raise NotImplementedError


def matmul_blas(a, b, out):  # pragma: no cover - replaced by the overload in jitted code
    """``out = a @ b``: NumPy's BLAS for any operands with one unit stride (transposed views
    too); else SciPy's BLAS when every operand is contiguous; else loops."""
    raise NotImplementedError


@overload(matmul)
def _matmul_overload(a, b, out):
    return _product_impl(a, b, out, accumulate=False)


@overload(matmul_add)
def _matmul_add_overload(a, b, out):
    return _product_impl(a, b, out, accumulate=True)


def _product_impl(a, b, out, accumulate: bool):
    """``out (+)= a @ b``: oneDNN for large float32 products when installed, else NumPy's BLAS."""
    if _SGEMM_ONEDNN is not None and a.dtype == b.dtype == out.dtype == types.float32:
        big = _SGEMM_ONEDNN
        one, beta = np.float32(1), np.float32(1 if accumulate else 0)
        small = _blas_add if accumulate else matmul_blas

        def impl(a, b, out):
            M, N, K, ta, lda, tb, ldb, ldo, readable = _layout(a, b, out)
            if M * N * K < ONEDNN_SMALL or not readable:
                small(a, b, out)
            else:
                big(np.int8(ONEDNN_NO if ta == NO_TRANS else ONEDNN_YES), np.int8(ONEDNN_NO if tb == NO_TRANS else ONEDNN_YES),
                    M, N, K, one, a.ctypes.data, lda, b.ctypes.data, ldb, beta, out.ctypes.data, ldo)
        return _named(impl, "onednn", accumulate)
    if accumulate:
        return _named(lambda a, b, out: _blas_add(a, b, out), "blas", accumulate)
    return _named(lambda a, b, out: matmul_blas(a, b, out), "blas", accumulate)


def step_matmul(lib, a, b, out):  # pragma: no cover - replaced by the overload in jitted code
    """``out = a @ b`` for a step product, on the library its flag ``lib`` names: 0 as
    :func:`matmul`, 1 NumPy's own BLAS (:func:`matmul_blas`); kernels/layouts.py measures which."""
    raise NotImplementedError


def step_matmul_add(lib, a, b, out):  # pragma: no cover - replaced by the overload in jitted code
    """``out += a @ b`` for a step product, as :func:`step_matmul` computes ``out = a @ b``."""
    raise NotImplementedError


@overload(step_matmul)
def _step_matmul_overload(lib, a, b, out):
    return _step_impl(accumulate=False)


@overload(step_matmul_add)
def _step_matmul_add_overload(lib, a, b, out):
    return _step_impl(accumulate=True)


def _step_impl(accumulate: bool):
    """``out (+)= a @ b`` on NumPy's BLAS where ``lib`` is set, else as the loops' ``matmul``."""
    on_numpy, as_matmul = (_blas_add, matmul_add) if accumulate else (matmul_blas, matmul)

    def impl(lib, a, b, out):
        if lib:
            on_numpy(a, b, out)
        else:
            as_matmul(a, b, out)
    return _named(impl, "step", accumulate)


def _named(impl, products: str, accumulate: bool):
    """``impl``, named after what it captured that its argument types do not show.

    Numba names a compiled closure by its qualified name, its argument types and
    a counter of the process that compiles it, and links the functions of one
    name as one function. Two step loops cached by two processes could each hold
    a different ``impl`` under one name (counter 2, the same types: one
    ``out = a @ b``, the other ``out += a @ b``); a process that loaded both ran
    the first one loaded in both loops, and the second graph's loss and
    gradients were wrong. Named after its products and its ``+=``, one name is
    one function. (The products' choice is in every loop's text: PRODUCTS.)"""
    impl.__name__ = f"{products}_{'add' if accumulate else 'set'}"
    impl.__qualname__ = f"{impl.__qualname__.rsplit('.', 1)[0]}.{impl.__name__}"
    return impl


def _blas_add(a, b, out):  # pragma: no cover - replaced by the overload in jitted code
    """``out += a @ b``, as :func:`matmul_blas` computes ``out = a @ b``."""
    raise NotImplementedError


@overload(matmul_blas)
def _matmul_blas_overload(a, b, out):
    return _blas_impl(a, b, out, accumulate=False)


@overload(_blas_add)
def _blas_add_overload(a, b, out):
    return _blas_impl(a, b, out, accumulate=True)


def _blas_impl(a, b, out, accumulate: bool):
    """``out (+)= a @ b`` through NumPy's BLAS for any operands with one unit stride (transposed
    views too); else SciPy's BLAS when every operand is contiguous; else loops."""
    if _GEMM is not None and a.dtype == b.dtype == out.dtype and a.dtype in (types.float32, types.float64):
        single = a.dtype == types.float32
        gemm = _GEMM[0] if single else _GEMM[1]
        one, beta = (np.float32(1), np.float32(accumulate)) if single else (np.float64(1), np.float64(accumulate))

        def impl(a, b, out):
            M, N, K, ta, lda, tb, ldb, ldo, readable = _layout(a, b, out)
            if M == 0 or N == 0:
                return
            if K == 0:
                if not accumulate:
                    out[...] = 0
            elif not readable:
                _matmul_loops(a, b, out, accumulate)
            else:
                gemm(ROW_MAJOR, ta, tb, M, N, K, one, a.ctypes.data, lda, b.ctypes.data, ldb, beta, out.ctypes.data, ldo)
        return _named(impl, "gemm", accumulate)
    if HAVE_BLAS and a.layout == "C" and b.layout == "C" and out.layout == "C":
        if accumulate:
            return _named(lambda a, b, out: _add_dot(a, b, out), "dot", accumulate)

        def impl(a, b, out):
            np.dot(a, b, out)
        return _named(impl, "dot", accumulate)
    return _named(lambda a, b, out: _matmul_loops(a, b, out, accumulate), "loops", accumulate)


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _add_dot(a, b, out):
    """``out += a @ b`` through SciPy's BLAS, which has no beta: a product, then an add."""
    prod = np.dot(a, b)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] += prod[i, j]


_lead = numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")(blas_lead)  # one rule for both sides


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _layout(a, b, out):
    """``out = a @ b``'s sizes M, N, K, each operand's transpose flag and leading dimension, and
    whether a row-major BLAS call can read them all as they are (the output untransposed)."""
    M, K = a.shape
    N = b.shape[1]
    ta, lda = _lead(a)
    tb, ldb = _lead(b)
    to, ldo = _lead(out)
    return M, N, K, ta, lda, tb, ldb, ldo, ta != 0 and tb != 0 and to == NO_TRANS


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _matmul_loops(a, b, out, accumulate=False):
    """``out (+)= a @ b`` for ``a`` [B, K], ``b`` [K, N]: rows of ``b`` stream through the inner loop."""
    rows, inner = a.shape
    cols = b.shape[1]
    for i in range(rows):
        if not accumulate:
            for n in range(cols):
                out[i, n] = 0.0
        for k in range(inner):
            aik = a[i, k]
            if aik != 0.0:
                for n in range(cols):
                    out[i, n] += aik * b[k, n]


KERNELS = {name: globals()[name] for name in (
    "add", "subtract", "multiply", "maximum", "greater", "negative", "reciprocal", "exp", "tanh",
    "sigmoid", "copyto", "matmul", "matmul_add")}


def warm_up() -> None:
    """Compile (or load from Numba's cache) every kernel for float32 and float64."""
    for dtype in (np.float32, np.float64):
        a = np.ones((2, 3), dtype=dtype)
        m = np.ones((2, 3), dtype=bool)
        for name in ("add", "subtract", "multiply", "maximum"):
            KERNELS[name](a, a, a)
        greater(a, 0, m)
        for name in ("negative", "reciprocal", "exp", "tanh", "sigmoid"):
            KERNELS[name](a, a)
        copyto(a, a)
