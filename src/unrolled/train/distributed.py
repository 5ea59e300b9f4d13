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
others; one that hangs is noticed by a watchdog thread on every other rank,
which stops them all once a collective has waited ``timeout`` seconds
(``UNROLLED_MPI_TIMEOUT`` for the command line). The collectives themselves
stay blocking MPI calls, so MPI moves the bytes at full speed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import zlib
from typing import Callable

import numpy as np

from unrolled.engines.compiled import background
from unrolled.words import count

INSTALL_HINT = 'pip install "unrolled[dist]"'
CHECK_EVERY = 100  # updates between parameter checksums
TIMEOUT_VAR = "UNROLLED_MPI_TIMEOUT"  # seconds a rank waits for the others in an update; 0 = forever
DEFAULT_TIMEOUT = 600.0  # far longer than any update or validation, short enough to give a stuck run back
ABORT_GRACE_S = 1.0  # seconds between printing why a rank stops and stopping every rank (see abort)
# The size of the job, as launchers tell each process they start: MPICH's mpiexec (Hydra) and other PMI
# launchers set PMI_SIZE, Open MPI's mpirun sets OMPI_COMM_WORLD_SIZE.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


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
        # every rank must apply the same update: none may start on NumPy while another runs compiled code
        background.set_enabled(False)
        self.timeout = timeout  # seconds a collective waits for the other ranks before every rank is stopped
        self.context: Callable[[], str] = lambda: ""  # what an abort adds, e.g. the last good checkpoint
        self._watchdog = _Watchdog(self) if timeout is not None else None

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

    @contextlib.contextmanager
    def _collective(self):
        """Around every collective: the watchdog's clock runs while this rank waits for the others."""
        if self._watchdog is None:
            yield
            return
        self._watchdog.since = time.monotonic()
        try:
            yield
        finally:
            self._watchdog.since = None

    def broadcast_params(self, params: dict[str, np.ndarray]) -> None:
        """Rank 0's parameters, on every rank, in place (one flat buffer)."""
        names = sorted(params)
        flat = _flatten([params[n] for n in names])
        with self._collective():
            self.comm.Bcast(flat, root=0)
        for name, view in zip(names, _views(flat, [params[n] for n in names])):
            params[name][...] = view

    def allreduce_sum(self, arrays: list[np.ndarray], scale: float | None = None) -> list[np.ndarray]:
        """The sums over ranks of ``arrays`` (of one dtype), each first multiplied by ``scale`` if given.

        One flat buffer, one ``Allreduce`` in place; the answers are views of that buffer.
        """
        flat = _flatten(arrays)
        if scale is not None:
            flat *= scale
        with self._collective():
            self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)
        return _views(flat, arrays)

    def total(self, values) -> np.ndarray:
        """Float64 sums over ranks of a few numbers (validation totals, counts)."""
        return self.allreduce_sum([np.asarray(values, dtype=np.float64)])[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (so that all stop at the same update)."""
        with self._collective():
            return bool(self.comm.allreduce(bool(flag), op=self.MPI.LOR))

    def check_params(self, params: dict[str, np.ndarray], step: int) -> None:
        """Every ``check_every`` updates: compare a checksum of the parameters' bytes over ranks; differ -> stop."""
        if not self.check_every or step % self.check_every:
            return
        crc = 0
        for name in sorted(params):
            crc = zlib.crc32(np.ascontiguousarray(params[name]).view(np.uint8), crc)
        with self._collective():
            sums = self.comm.allgather(crc)
        bad = [r for r, c in enumerate(sums) if c != sums[0]]
        if bad:
            raise RuntimeError(f"after update {step} the parameters of rank {bad[0]} differ from rank 0's; every rank "
                               f"must get the same data split and the same settings (same files, flags and engine)")

    def gather_rows(self, arrays: dict[str, np.ndarray], axes: dict[str, int]) -> dict[str, np.ndarray]:
        """Every rank's ``arrays`` joined along each one's batch axis (``axes[name]``), in rank order, on every rank."""
        with self._collective():
            parts = self.comm.allgather({k: np.asarray(v) for k, v in arrays.items()})
        names = list(parts[0])
        if any(list(p) != names for p in parts):
            raise RuntimeError("the ranks carry different state names; every rank must run the same graph")
        return {k: np.concatenate([p[k] for p in parts], axis=axes[k]) for k in names}

    def bcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        with self._collective():
            return self.comm.bcast(value, root=0)

    def abort(self, error: BaseException, context: str | None = None, prog: str = "unrolled") -> None:
        """Print ``error`` as one line naming this rank, then stop every rank (``MPI.Abort``) so none waits forever.

        ``context`` (default: ``self.context()``) ends the line, e.g. naming the last good checkpoint.
        """
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"error: {error}"
        context = self.context() if context is None else context
        tail = f"; {context}" if context else ""
        print(f"{prog} (rank {self.rank} of {self.size}): {what}{tail}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        code = 130 if isinstance(error, KeyboardInterrupt) else 1
        # The launcher forwards this rank's output and handles the abort on separate channels, and
        # once it has the abort it kills every rank and stops forwarding: give the line time to
        # reach the user first, or the run ends saying nothing.
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)
        os._exit(code)  # MPI_Abort may return before the launcher's kill arrives: go no further


class _Watchdog:
    """A thread that stops every rank once this one has waited ``timeout`` seconds in a collective.

    A rank that dies is caught by ``mpiexec``; one that hangs (a deadlock,
    a stalled file system) would hold the others in their next collective
    forever. MPI has no timeouts, so a thread watches the clock that
    :meth:`DataParallel._collective` starts and stops.
    """

    def __init__(self, dp: DataParallel):
        self.dp = dp
        self.since: float | None = None  # when the collective under way began; None: none under way
        threading.Thread(target=self._watch, name="unrolled-mpi-watchdog", daemon=True).start()

    def _watch(self) -> None:
        timeout = self.dp.timeout
        while True:
            time.sleep(min(1.0, timeout / 4))
            since = self.since
            if since is not None and time.monotonic() - since > timeout:
                self.dp.abort(RuntimeError(
                    f"rank {self.dp.rank} waited {timeout:g} s for the other ranks; one of them is stuck or gone "
                    f"(raise {TIMEOUT_VAR} if an update or a validation pass takes that long)"))


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


def _views(flat: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    """``flat`` cut into views shaped like ``like``, in order."""
    out, at = [], 0
    for a in like:
        out.append(flat[at : at + a.size].reshape(np.shape(a)))
        at += a.size
    return out
