"""NumPy's own BLAS, reachable from Numba-compiled loops.

Numba's ``np.dot`` reaches BLAS through SciPy, which bundles an OpenBLAS of
its own. Two OpenBLAS libraries in one process mean two pools of threads,
and each pool's threads spin for a while after every product: a step loop
whose per-step products go to SciPy's pool while the weight products go to
NumPy's spends its time with the two pools fighting over the cores, several
times slower than with one pool. Calling the very
``cblas_?gemm`` that ``numpy.matmul`` calls keeps one pool.

NumPy's wheels bundle OpenBLAS with its symbols renamed
(``scipy_cblas_sgemm64_``: 64-bit integers); other builds export the plain
``cblas_sgemm``. When neither is found (an MKL or Accelerate NumPy, a
platform without ``/proc``), :data:`GEMM` is ``None`` and the loops keep
their other paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import threading

import numpy as np

from unrolled.graph.buffers import ALIGN, address, aligned, aligned_empty, aligned_zeros, copy_into, kept  # noqa: F401 (the fast path's buffers, re-exported)

from . import onednn

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS's enum values (the Numba loops pass them too)


def _candidates() -> list[str]:
    """Shared libraries that may hold NumPy's BLAS: its bundled ones, then those already loaded."""
    here = os.path.dirname(np.__file__)
    found = sorted(glob.glob(os.path.join(here, os.pardir, "numpy.libs", "*blas*")))
    found += sorted(glob.glob(os.path.join(here, ".dylibs", "*blas*")))
    try:
        with open("/proc/self/maps") as maps:
            found += sorted({line.split()[-1] for line in maps if "blas" in line.rsplit("/", 1)[-1]})
    except OSError:
        pass
    return found


def _find(kind: str):
    """``cblas_{kind}gemm`` of NumPy's BLAS as a ctypes function (its integer width in its
    ``argtypes``), or ``None``."""
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol, integer in ((f"scipy_cblas_{kind}gemm64_", ctypes.c_int64), (f"cblas_{kind}gemm64_", ctypes.c_int64),
                                (f"cblas_{kind}gemm", ctypes.c_int)):
            fn = getattr(lib, symbol, None)
            if fn is None:
                continue
            real = ctypes.c_float if kind == "s" else ctypes.c_double
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, real,
                           ctypes.c_void_p, integer, ctypes.c_void_p, integer, real, ctypes.c_void_p, integer]
            return fn
    return None


def _checked(fn, dtype):
    """``fn`` if it computes a small product right (a wrong symbol guess must not go unnoticed), else None."""
    if fn is None:
        return None
    a = np.arange(6, dtype=dtype).reshape(2, 3)
    b = np.arange(12, dtype=dtype).reshape(3, 4)
    out = np.zeros((2, 4), dtype=dtype)
    try:
        fn(ROW_MAJOR, NO_TRANS, NO_TRANS, 2, 4, 3, 1.0, a.ctypes.data, 3, b.ctypes.data, 4, 0.0, out.ctypes.data, 4)
    except Exception:  # pragma: no cover - a foreign library
        return None
    return fn if np.array_equal(out, a @ b) else None


SGEMM = _checked(_find("s"), np.float32)
DGEMM = _checked(_find("d"), np.float64) if SGEMM is not None else None
GEMM = (SGEMM, DGEMM) if SGEMM is not None and DGEMM is not None else None


def _gemm_library():
    """The shared library that holds :data:`GEMM` (NumPy's BLAS), whose other functions we call too; or None."""
    if GEMM is None:
        return None
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if getattr(lib, GEMM[0].__name__, None) is not None:
            return lib
    return None


GEMM_LIBRARY = _gemm_library()


def _thread_count(lib):
    """``(get, set)`` of the thread count of ``lib`` (the OpenBLAS that holds :data:`GEMM`), or None
    (another BLAS, or none found)."""
    if lib is None:
        return None
    for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
        get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
        put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
        if get is not None and put is not None:
            get.restype, get.argtypes = ctypes.c_int, []
            put.restype, put.argtypes = None, [ctypes.c_int]
            return get, put
    return None


THREAD_COUNT = _thread_count(GEMM_LIBRARY)


def _omatcopy(lib):
    """``(somatcopy, domatcopy)`` of ``lib`` (the OpenBLAS that holds :data:`GEMM`: its out-of-place
    matrix copy, transposing on the way), each checked on a small matrix, or None."""
    if lib is None:
        return None
    integer, found = GEMM[0].argtypes[3], []
    for kind, real in (("s", ctypes.c_float), ("d", ctypes.c_double)):
        fn = next((getattr(lib, name) for name in (f"scipy_cblas_{kind}omatcopy64_", f"cblas_{kind}omatcopy64_",
                                                   f"cblas_{kind}omatcopy") if hasattr(lib, name)), None)
        if fn is None:
            return None
        fn.restype = None
        fn.argtypes = [ctypes.c_int, ctypes.c_int, integer, integer, real, ctypes.c_void_p, integer,
                       ctypes.c_void_p, integer]
        a = np.arange(6, dtype=np.float32 if kind == "s" else np.float64).reshape(2, 3)
        out = np.zeros((3, 2), dtype=a.dtype)
        try:
            fn(ROW_MAJOR, TRANS, 2, 3, 1.0, address(a), 3, address(out), 2)
        except Exception:  # pragma: no cover - a foreign library
            return None
        if not np.array_equal(out, a.T):
            return None
        found.append(fn)
    return tuple(found)


OMATCOPY = _omatcopy(GEMM_LIBRARY)


def aligned_copy(a: np.ndarray, keep: dict, key) -> np.ndarray:
    """``a`` copied into :func:`kept`'s array ``keep[key]`` (C-contiguous, on a cache line): never
    ``a`` itself, even where ``a`` is already laid out so (:func:`aligned` would return it), as the
    caller may write the copy (a weight's token rows plus its bias). A transposed view (a weight's
    columns read as rows) is copied by OpenBLAS's ``omatcopy`` where NumPy's BLAS is OpenBLAS: its
    blocked transpose runs several times as fast as NumPy's copies of column blocks."""
    out = kept(keep, key, a.shape, a.dtype)
    if OMATCOPY is not None and a.ndim == 2 and a.dtype in (np.float32, np.float64) and not a.flags.c_contiguous:
        t, ld = lead(a)
        if t == TRANS:
            rows, cols = a.shape  # the source is a.T: cols x rows, rows ld apart
            OMATCOPY[0 if a.dtype == np.float32 else 1](ROW_MAJOR, TRANS, cols, rows, 1.0, address(a), ld,
                                                        address(out), cols)
            return out
    return copy_into(out, a)


class _OneThread:
    """Who is inside :func:`numpy_blas_on_one_thread`, and the count to give back when all have left."""
    lock = threading.Lock()
    inside = 0
    before = 1


def numpy_blas_threads() -> int:
    """How many threads NumPy's BLAS runs a product on (0: not known: not an OpenBLAS found here)."""
    return 0 if THREAD_COUNT is None else THREAD_COUNT[0]()


@contextlib.contextmanager
def numpy_blas_on_one_thread():
    """NumPy's BLAS on one thread while inside, as many as before after.

    For the row split, whose parts already keep every core busy: a product
    spread over OpenBLAS's pool there would only fight them for the cores.
    Unlike oneDNN's, OpenBLAS's count is the whole process's, so entries are
    counted: the first in sets one thread, the last out gives the count back."""
    if THREAD_COUNT is None:
        yield
        return
    get, put = THREAD_COUNT
    with _OneThread.lock:
        if _OneThread.inside == 0:
            _OneThread.before = get()
            put(1)
        _OneThread.inside += 1
    try:
        yield
    finally:
        with _OneThread.lock:
            _OneThread.inside -= 1
            if _OneThread.inside == 0 and _OneThread.before != 1:
                put(_OneThread.before)


def on_numpy_blas(a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool = False) -> bool:
    """``out (+)= a @ b`` by NumPy's own ``cblas_?gemm``, transposed and row-strided views passed
    as they are; False, with nothing done, where the operands are not BLAS operands as they are."""
    if GEMM is None or not (a.dtype == b.dtype == out.dtype and a.dtype in (np.float32, np.float64)):
        return False
    (ta, lda), (tb, ldb), (to, ldo) = lead(a), lead(b), lead(out)
    if not (ta and tb and to == NO_TRANS) or out.shape != (a.shape[0], b.shape[1]) or a.shape[1] != b.shape[0]:
        return False
    gemm = GEMM[0] if a.dtype == np.float32 else GEMM[1]
    M, K = a.shape
    gemm(ROW_MAJOR, ta, tb, M, b.shape[1], K, 1.0, address(a), lda, address(b), ldb,
         1.0 if accumulate else 0.0, address(out), ldo)
    return True


def product(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
    """``a @ b`` (into ``out``, or added to it with ``accumulate``): the whole-sequence products.

    Large float32 products of 2-D operands go to oneDNN when it is installed
    (see onednn.py), transposed and row-strided views passed as they are, so
    that the per-step products and the weight products share one thread pool
    and one kind of kernel; everything else goes to NumPy."""
    sgemm = onednn.SGEMM
    if (sgemm is not None and a.dtype == b.dtype == np.float32 and a.ndim == b.ndim == 2
            and a.shape[1] == b.shape[0] and a.shape[0] * a.shape[1] * b.shape[1] >= onednn.SMALL
            and (out is None or (out.dtype == np.float32 and out.shape == (a.shape[0], b.shape[1])))):
        ta, lda = lead(a)
        tb, ldb = lead(b)
        if out is None:
            out, accumulate = aligned_empty((a.shape[0], b.shape[1]), np.float32), False
        to, ldo = lead(out)
        if ta and tb and to == NO_TRANS:
            M, K = a.shape
            sgemm(_FLAG[ta], _FLAG[tb], M, b.shape[1], K, 1.0, address(a), lda, address(b), ldb,
                  1.0 if accumulate else 0.0, address(out), ldo)
            return out
    if out is None:
        return a @ b
    if accumulate:
        out += a @ b
    else:
        np.matmul(a, b, out=out)
    return out


_FLAG = {NO_TRANS: b"N", TRANS: b"T"}


def lead(x: np.ndarray) -> tuple[int, int]:
    """(CBLAS transpose flag, leading dimension) of a 2-D view for a row-major call, or (0, 0).

    A view whose rows (or, transposed, columns) are unit-stride runs spaced at least their length
    apart is a BLAS operand as it is. The Numba loops compile this very function (``arrays._lead``)."""
    rows, cols = x.shape
    s0, s1 = x.strides[0] // x.itemsize, x.strides[1] // x.itemsize
    if (s1 == 1 or cols == 1) and (rows == 1 or s0 >= cols):
        return NO_TRANS, max(s0 if rows > 1 else cols, 1)
    if (s0 == 1 or rows == 1) and (cols == 1 or s1 >= rows):
        return TRANS, max(s1 if cols > 1 else rows, 1)
    return 0, 0
