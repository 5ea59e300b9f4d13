"""A training run's folder: one run writes in it at a time, and a save cut short leaves nothing behind.

Two ``unrolled train --out DIR`` started together would both save into DIR,
each overwriting the other's ``latest.npz``: the first run is lost without a
word. :class:`FolderLock` takes an exclusive ``flock`` on the folder for
as long as the run lives; the kernel drops it when the process
ends, however it ends (``kill -9`` included), so a lock is never left stale.

A save is a temporary file renamed over the checkpoint (:mod:`unrolled.atomic`);
a process killed in between leaves the temporary file, as large as a
checkpoint. Once the lock is held no other run can be writing in the folder,
so :func:`remove_stale_temporaries` may delete what such a save left.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, as before
    fcntl = None

# atomic_writer's temporary files: "." + the target's name + "." + mkstemp's 8 characters + ".tmp"
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


class FolderLock:
    """An exclusive lock on a run folder, held until :meth:`release` or the end of the process.

    The lock is on the folder itself (an open descriptor of it), so the run leaves no file behind."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock, or raise ``ValueError`` saying the folder is in use."""
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"{self.folder} is in use by another training run; wait for it to end, "
                             f"or choose another folder with --out") from None
        except OSError:  # a file system without locks (some network mounts): run unlocked, as before
            os.close(fd)
            return self
        self._fd = fd
        return self

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Give the lock up (closing the descriptor drops it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_stale_temporaries(folder: Path) -> tuple[int, int]:
    """Delete the temporary files of saves that never finished in ``folder``: ``(files, bytes)`` removed.

    Call it only while holding the folder's :class:`FolderLock`: then no save is under way there."""
    count = size = 0
    for path in Path(folder).iterdir():
        if not _TEMPORARY.match(path.name) or not path.is_file() or path.is_symlink():
            continue
        try:
            n = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        count, size = count + 1, size + n
    return count, size
