"""oneDNN's single-precision matrix product, when the ``fast`` extra installed it.

The per-step products of a recurrent loop are small (a batch of rows times
a weight of a few hundred columns) and come one after another; OpenBLAS,
which NumPy bundles, runs such shapes well below the machine's peak, and
PyTorch's LSTM runs them through oneDNN's JIT-generated kernels. oneDNN
also ships a BLAS-like entry point, ``dnnl_sgemm``, which runs both the step
products and the whole-sequence weight products faster than OpenBLAS where
we measured (benchmarks/RESULTS.md has the figures, their machine and date).

It is found through the installed ``onednn-cpu-gomp`` distribution (or the
system's ``libdnnl``), checked on a small product, and used for float32
only: oneDNN has no double-precision product. ``UNROLLED_ONEDNN=0`` turns it
off; without it every product stays with NumPy's BLAS.

Two thread pools must not take turns. oneDNN's threads are GNU OpenMP's;
OpenBLAS keeps its own, whose threads keep polling for work after each
threaded call (for up to 2^28 cycles by default). One BLAS dot product an
update (the global norm's) was enough to wake OpenBLAS's pool, whose
waiting threads then shared the cores with oneDNN's and slowed every
update. So while oneDNN runs the
large products, nothing of ours calls a threaded OpenBLAS routine: the
products below :data:`SMALL` are below OpenBLAS's own threshold for threads,
and the norm is a plain reduction.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import os

import numpy as np

DISTRIBUTION = "onednn-cpu-gomp"  # the wheel the fast extra installs: CPU only, GNU OpenMP threads


def _library_paths():
    """Where ``libdnnl`` may be: the installed distribution's own files, then the system's. A
    generator, asked for the next place only when the last one did not load: looking for the
    system's library runs ``ldconfig`` in a process of its own, which every import of the engine
    would otherwise wait for."""
    seen = set()
    try:
        for f in importlib.metadata.files(DISTRIBUTION) or []:
            path = str(f.locate())
            if f.name.startswith("libdnnl.so") and path not in seen:
                seen.add(path)
                yield path
    except importlib.metadata.PackageNotFoundError:
        pass
    system = ctypes.util.find_library("dnnl")
    if system and system not in seen:
        yield system


def _find():
    """``dnnl_sgemm`` as a ctypes function, or ``None``."""
    for path in _library_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:  # e.g. no libgomp on this system
            continue
        fn = getattr(lib, "dnnl_sgemm", None)
        if fn is None:
            continue
        dim, ptr, real = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_char, ctypes.c_char, dim, dim, dim, real, ptr, dim, ptr, dim, real, ptr, dim]
        return fn
    return None


def _checked(fn):
    """``fn`` if it computes a small row-major product right, plain and with a transposed operand, else None."""
    if fn is None:
        return None
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = np.zeros((2, 4), dtype=np.float32)
    bt = np.ascontiguousarray(b.T)
    try:
        ok = fn(b"N", b"N", 2, 4, 3, 1.0, a.ctypes.data, 3, b.ctypes.data, 4, 0.0, out.ctypes.data, 4) == 0
        ok = ok and np.array_equal(out, a @ b)
        ok = ok and fn(b"N", b"T", 2, 4, 3, 1.0, a.ctypes.data, 3, bt.ctypes.data, 3, 0.0, out.ctypes.data, 4) == 0
    except Exception:  # pragma: no cover - a foreign library
        return None
    return fn if ok and np.array_equal(out, a @ b) else None


SGEMM = _checked(_find()) if os.environ.get("UNROLLED_ONEDNN", "1") != "0" else None


def _gomp():
    """GNU OpenMP, whose thread count oneDNN reads in the calling thread; None without oneDNN."""
    if SGEMM is None:
        return None
    try:
        return ctypes.CDLL("libgomp.so.1")  # the one libdnnl loaded
    except OSError:  # pragma: no cover - a oneDNN built on another threading runtime
        return None


_GOMP = _gomp()


def threads() -> int:
    """How many threads oneDNN takes for a product called from this thread (1 without oneDNN)."""
    return int(_GOMP.omp_get_max_threads()) if _GOMP is not None else 1


def set_threads(n: int) -> None:
    """From now on, products called from this thread take ``n`` threads (a per-thread OpenMP setting)."""
    if _GOMP is not None:
        _GOMP.omp_set_num_threads(n)


def one_thread() -> None:
    """From now on, products called from this thread run on it alone."""
    set_threads(1)


@contextlib.contextmanager
def products_on_one_thread():
    """Products called from this thread run on it alone while inside, as many as before after."""
    before = threads()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(before)


def _one_thread_after_fork() -> None:
    """Let a forked child (``multiprocessing``'s default on Linux) run oneDNN on one thread.

    GNU OpenMP's thread pool does not survive ``fork``: a child whose parent had
    run a product on two threads waits forever on its first product of its own
    (seen: a ``Pool`` of two hung where the parent had trained). With one thread
    the child never touches the pool; its products still run, where they were
    going to share the cores with its siblings anyway."""
    if _GOMP is not None:
        os.register_at_fork(after_in_child=one_thread)


_one_thread_after_fork()

# Below this many multiply-adds NumPy's BLAS is as fast or faster: oneDNN's call has a larger fixed
# cost, which only a larger product earns back (measured from a Numba loop; see benchmarks/RESULTS.md).
# It is also OpenBLAS's own threshold for a threaded GEMM (65536 x 4, interface/gemm.c), so the products left to it run on
# the calling thread and never wake its pool.
SMALL = 1 << 18

NO, YES = ord("N"), ord("T")  # dnnl_sgemm's transpose flags, as the Numba loops pass them


def version() -> str | None:
    """The installed oneDNN's version, for the benchmark's notes; ``None`` when it is not used."""
    if SGEMM is None:
        return None
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # a system library
        return "system"
