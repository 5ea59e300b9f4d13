"""Noticing when Numba compiles: one message to the user, and the seconds kept apart.

The first run on a machine compiles the engine's generated code, which can
take longer than a short run's training; later runs load it from the cache
(:mod:`unrolled.engines.compiled.kernels.jitcache`). Numba reports each compilation it actually does
(not a function loaded from its cache) as a ``numba:compile`` event; the
listener here counts the seconds they take, so that time budgets
(``train --minutes``, ``demo --seconds``) and speeds can leave them out, and
calls the notice set by the command line once, the first time one begins.

This module imports no Numba itself: :func:`listen` is called by the modules
that do, so that a run that never compiles pays nothing.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

clock = time.perf_counter  # a module attribute, so that tests can run the listener on a clock of their own

_lock = threading.Lock()
_state = {"seconds": 0.0, "depth": 0, "since": 0.0, "notice": None, "listening": False}


def seconds() -> float:
    """Seconds spent compiling so far in this process (compilations under way count up to now)."""
    with _lock:
        extra = clock() - _state["since"] if _state["depth"] else 0.0
        return _state["seconds"] + extra


def set_notice(notice: Callable[[], object] | None) -> None:
    """Call ``notice()`` the first time a compilation begins (once; ``None`` for silence)."""
    _state["notice"] = notice


def started() -> None:
    """A compilation began (nested ones, a function compiling its callees, count once)."""
    with _lock:
        _state["depth"] += 1
        if _state["depth"] > 1:
            return
        _state["since"] = clock()
        notice, _state["notice"] = _state["notice"], None
    if notice is not None:
        notice()


def ended() -> None:
    with _lock:
        if _state["depth"] == 0:
            return
        _state["depth"] -= 1
        if _state["depth"] == 0:
            _state["seconds"] += clock() - _state["since"]


def listen() -> None:
    """Register the Numba listener (once per process); harmless where Numba is missing."""
    if _state["listening"]:
        return
    try:
        from numba.core import event
    except ImportError:
        return

    class _Listener(event.Listener):
        def on_start(self, ev):
            started()

        def on_end(self, ev):
            ended()

    event.register("numba:compile", _Listener())
    _state["listening"] = True
