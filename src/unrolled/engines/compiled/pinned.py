"""Threads kept for work split into parts: part ``i`` always runs on thread ``i``.

A run split into parts (a batch's rows, rowsplit.py; a sampled step's
columns, feedsplit.py) hands each part after the caller's own to a thread of
its own. One shared pool would let one thread take two parts while another
sleeps, and the parts of a split step wait for each other; a one-thread
executor per part cannot. The threads are started once and kept for the
next run; a forked child, which has none of its parent's threads, starts its
own on its first split.
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor, wait


class PinnedThreads:
    """Executors of one thread each, the one for part ``i`` named ``{prefix}-{i}`` (the caller runs
    part 0), each started with ``initializer``."""

    def __init__(self, prefix: str, initializer=None):
        self.prefix, self.initializer = prefix, initializer
        self._lock = threading.Lock()
        self._pool: list[ThreadPoolExecutor] = []
        _all.add(self)

    def first(self, n: int) -> list[ThreadPoolExecutor]:
        """The first ``n`` threads, started where they are not yet."""
        with self._lock:
            while len(self._pool) < n:
                name = f"{self.prefix}-{len(self._pool) + 1}"
                self._pool.append(ThreadPoolExecutor(1, name, initializer=self.initializer))
            return self._pool[:n]

    def _forget(self) -> None:
        self._pool = []
        self._lock = threading.Lock()


def join(futures) -> None:
    """Wait for every part's future, even through a KeyboardInterrupt, then raise it: a part writes
    the caller's buffers, which the caller may reuse or free as soon as this returns."""
    interrupted = None
    while True:
        try:
            wait(futures)
            break
        except BaseException as e:  # noqa: BLE001 - re-raised once the parts are done
            interrupted = interrupted or e
    if interrupted is not None:
        raise interrupted


_all: "weakref.WeakSet[PinnedThreads]" = weakref.WeakSet()


def _forget_all() -> None:
    for threads in list(_all):
        threads._forget()


os.register_at_fork(after_in_child=_forget_all)
