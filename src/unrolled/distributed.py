"""Data-parallel training over MPI: every rank trains its share of the rows, one allreduce per update.

The communication is MPI's own (``mpi4py``; the ``mpich`` wheel brings
``mpiexec``), imported only when a run is data-parallel, so the rest of the
library needs neither. A :class:`DataParallel` wraps a communicator and holds
the few collective steps a trainer needs:

* at the start, rank 0's parameters are broadcast, so every rank starts equal;
* once per update, every gradient (and the loss) travels in one flat buffer
  through one ``Allreduce`` (sum), so every rank gets the same numbers and
  applies the same clipped update: no rank ever holds parameters of its own;
* every ``check_every`` updates a checksum of the parameters' bytes is
  compared, and a mismatch stops every rank with an error (a rank fed other
  data, or a reduction that rounded differently, would drift silently);
* carried state and replay buffers are gathered along the batch axis, so a
  checkpoint holds the whole batch exactly as a single process would, and a
  run resumes on any number of ranks that divides the batch.

Rank ``r`` of ``n`` owns rows ``[r·B/n, (r+1)·B/n)`` of each global batch of
``B`` rows (streams, for a language model). With the same global batch, ``n``
ranks compute the single-process update up to the order of the sums.

A failure on one rank must not leave the others waiting in a collective:
:meth:`DataParallel.abort` prints the error and calls ``MPI.Abort``, which
stops every rank. A rank that dies is noticed by ``mpiexec``, which stops the
others; one that hangs is noticed by the ``timeout`` of the update's
allreduce (``UNROLLED_MPI_TIMEOUT`` seconds for the command line).
"""

from __future__ import annotations

import os
import sys
import time
import zlib

import numpy as np

from .words import count

INSTALL_HINT = 'pip install "unrolled[dist]"'
CHECK_EVERY = 100  # updates between parameter checksums
TIMEOUT_VAR = "UNROLLED_MPI_TIMEOUT"  # seconds a rank waits for the others in an update; 0 = forever
DEFAULT_TIMEOUT = 600.0  # far longer than any update or validation, short enough to give a stuck run back
# Environment variables an MPI launcher sets in every process it starts (MPICH's Hydra, Open MPI, Slurm's PMI).
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


def _mpi():
    """The ``mpi4py.MPI`` module, or one clear sentence saying how to get it."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(f"data-parallel training needs mpi4py and an MPI library: {INSTALL_HINT}") from None
    return MPI


def launched_size() -> int:
    """How many processes the launcher (``mpiexec -n N``) started; 1 when started without one."""
    for name in _SIZE_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def from_environment() -> "DataParallel | None":
    """A :class:`DataParallel` on ``COMM_WORLD`` when started by ``mpiexec -n N`` with N > 1, else ``None``."""
    n = launched_size()
    if n <= 1:
        return None
    raw = os.environ.get(TIMEOUT_VAR, "")
    try:
        timeout = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise ValueError(f"{TIMEOUT_VAR}={raw!r}; give seconds (0: wait forever)") from None
    try:
        return DataParallel(timeout=timeout or None)
    except RuntimeError as e:
        raise RuntimeError(f"started by mpiexec with {count(n, 'process', 'processes')}, but {e}") from None


class DataParallel:
    """The collective steps of data-parallel training over an MPI communicator (default ``COMM_WORLD``)."""

    def __init__(self, comm=None, *, check_every: int = CHECK_EVERY, timeout: float | None = None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        if not (isinstance(check_every, int) and check_every >= 0):
            raise ValueError(f"check_every={check_every!r}; give a whole number of updates (0: never compare)")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout={timeout!r}; give a positive number of seconds, or None to wait forever")
        self.check_every = check_every
        self.timeout = timeout  # seconds an allreduce waits for the other ranks before this one gives up

    @property
    def is_root(self) -> bool:
        """Rank 0: the one that prints and writes."""
        return self.rank == 0

    # ------------------------------------------------------------------ rows

    def rows(self, B: int) -> slice:
        """This rank's rows of a global batch of ``B`` (a clear error when ``B`` does not split evenly)."""
        if B % self.size:
            raise ValueError(f"a batch of {count(B, 'row')} does not split over {count(self.size, 'rank')}; "
                             f"make the batch a multiple of {self.size} (e.g. --batch {B - B % self.size or self.size}) "
                             f"or change mpiexec -n")
        share = B // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def shard(self, a, axis: int = 1):
        """This rank's rows of ``a`` along ``axis`` (the batch axis: 1 for ``[T, B, ...]``)."""
        a = np.asarray(a)
        index = [slice(None)] * a.ndim
        index[axis] = self.rows(a.shape[axis])
        return a[tuple(index)]

    # ------------------------------------------------------------ collectives

    def broadcast_params(self, params: dict[str, np.ndarray]) -> None:
        """Rank 0's parameters, on every rank, in place (one flat buffer)."""
        names = sorted(params)
        flat = _flatten([params[n] for n in names])
        self.comm.Bcast(flat, root=0)
        _unflatten(flat, [params[n] for n in names])

    def allreduce_sum(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The sums over ranks of ``arrays`` (of one dtype), through one flat buffer and one ``Allreduce``."""
        flat = _flatten(arrays)
        total = np.empty_like(flat)
        if self.timeout is None:
            self.comm.Allreduce(flat, total, op=self.MPI.SUM)
        else:
            self._wait(self.comm.Iallreduce(flat, total, op=self.MPI.SUM))
        out = [np.empty_like(a) for a in arrays]
        _unflatten(total, out)
        return out

    def _wait(self, request) -> None:
        """Wait for a non-blocking collective, at most ``timeout`` seconds (then another rank is stuck or gone)."""
        deadline = time.monotonic() + self.timeout
        pause = 1e-5
        while not request.Test():
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {self.rank} waited {self.timeout:g} s for the other ranks to finish an "
                                   f"update; one of them is stuck or gone (raise {TIMEOUT_VAR} if updates are "
                                   f"that slow)")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)

    def total(self, values) -> np.ndarray:
        """Float64 sums over ranks of a few numbers (validation totals, counts)."""
        return self.allreduce_sum([np.asarray(values, dtype=np.float64)])[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (so that all stop at the same update)."""
        return bool(self.comm.allreduce(bool(flag), op=self.MPI.LOR))

    def check_params(self, params: dict[str, np.ndarray], step: int) -> None:
        """Every ``check_every`` updates: compare a checksum of the parameters' bytes over ranks; differ -> stop."""
        if not self.check_every or step % self.check_every:
            return
        crc = 0
        for name in sorted(params):
            crc = zlib.crc32(np.ascontiguousarray(params[name]).view(np.uint8), crc)
        sums = self.comm.allgather(crc)
        bad = [r for r, c in enumerate(sums) if c != sums[0]]
        if bad:
            raise RuntimeError(f"after update {step} the parameters of rank {bad[0]} differ from rank 0's; every rank "
                               f"must get the same data split and the same settings (same files, flags and engine)")

    def gather_rows(self, arrays: dict[str, np.ndarray], axes: dict[str, int]) -> dict[str, np.ndarray]:
        """Every rank's ``arrays`` joined along each one's batch axis (``axes[name]``), in rank order, on every rank."""
        parts = self.comm.allgather({k: np.asarray(v) for k, v in arrays.items()})
        names = list(parts[0])
        if any(list(p) != names for p in parts):
            raise RuntimeError("the ranks carry different state names; every rank must run the same graph")
        return {k: np.concatenate([p[k] for p in parts], axis=axes[k]) for k in names}

    def bcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        return self.comm.bcast(value, root=0)

    def abort(self, error: BaseException, context: str = "", prog: str = "unrolled") -> None:
        """Print ``error`` as one line naming this rank, then stop every rank (``MPI.Abort``) so none waits forever."""
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"error: {error}"
        tail = f"; {context}" if context else ""
        print(f"{prog} (rank {self.rank} of {self.size}): {what}{tail}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        code = 130 if isinstance(error, KeyboardInterrupt) else 1
        self.comm.Abort(code)
        os._exit(code)  # MPI_Abort may return before the launcher's kill arrives: go no further


def as_data_parallel(comm) -> "DataParallel | None":
    """``None``, a :class:`DataParallel`, or a bare communicator (wrapped) -> ``DataParallel`` or ``None``."""
    if comm is None or isinstance(comm, DataParallel):
        return comm
    return DataParallel(comm)


def _flatten(arrays: list[np.ndarray]) -> np.ndarray:
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        raise ValueError(f"one flat buffer needs one dtype; got {sorted(map(str, dtypes))}")
    dtype = dtypes.pop() if dtypes else np.dtype(np.float64)
    return np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0, dtype)


def _unflatten(flat: np.ndarray, into: list[np.ndarray]) -> None:
    at = 0
    for a in into:
        a[...] = flat[at : at + a.size].reshape(a.shape)
        at += a.size
