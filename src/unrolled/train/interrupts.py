"""Ctrl-C and SIGTERM as requests, never as exceptions raised in the middle of native code.

Python turns Ctrl-C into a ``KeyboardInterrupt`` raised in the main thread
between any two bytecodes. In this package the main thread is often inside
code that must not be cut: Numba compiling or loading a kernel (llvmlite
hands C++ objects from one owner to the next), or a batch split across
threads (:mod:`unrolled.engines.compiled.rowsplit`) whose worker is still writing. An
exception raised there, then the interpreter's exit, freed memory that was
still in use: heap corruption and double frees.

So a signal only sets a flag. :class:`StopRequest` (around a training loop)
lets the loop stop after the update under way and save; a second signal, or
one that comes where no loop is listening (:func:`quit_on_signal`, around a
whole command), ends the process at once with ``os._exit``: no unwinding, no
destructors, nothing freed under a running thread. The exit code is the
shell's, 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).
Writes are atomic, so quitting in the middle of a save leaves the previous
checkpoint whole; the temporary file it leaves is removed by the next run in
that folder (:mod:`unrolled.train.runfolder`).
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def exit_code(signum: int) -> int:
    """The shell's exit code for a process ended by ``signum``."""
    return 128 + int(signum)


def quit_now(signum: int, message: str) -> None:
    """Flush what was printed, write ``message`` on stderr and end the process without unwinding."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a stream busy in the interrupted code: its rest is lost, not the exit
            pass
    try:
        os.write(2, (message + "\n").encode())
    except OSError:
        pass
    os._exit(exit_code(signum))


@contextmanager
def _handlers(handler, after=None):
    """``handler`` for SIGINT and SIGTERM while the block runs (main thread only); then ``after``, or
    the previous handlers when it is None."""
    previous = {}
    try:
        for s in SIGNALS:
            previous[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: signals keep their meaning
        pass
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if after is None else after)


@contextmanager
def quit_on_signal(prefix: str, *, exiting: bool = False):
    """While the block runs, Ctrl-C or SIGTERM ends the process at once, saying ``prefix: interrupted``.

    ``exiting``: the process ends after the block, so the signals stay ignored instead of getting their
    previous handlers back: the interpreter's exit puts back the default one, under which a late second
    Ctrl-C killed the process before it had flushed what it printed; an ignored signal stays ignored."""
    def handle(signum, frame):
        quit_now(signum, f"{prefix}: interrupted ({NAMES.get(signum, signum)})")

    with _handlers(handle, signal.SIG_IGN if exiting else None):
        yield


class StopRequest:
    """While active, Ctrl-C or SIGTERM asks the loop to stop (``requested``); a second one quits at once.

    The loop looks at ``requested`` between updates; ``signum`` says which signal asked."""

    def __init__(self, quit_message: str = "quitting at once, without saving"):
        self.requested = False
        self.signum: int | None = None
        self.quit_message = quit_message
        self._block = None

    def __enter__(self):
        self._block = _handlers(self._handle)
        self._block.__enter__()
        return self

    def __exit__(self, *exc):
        self._block.__exit__(*exc)
        return False

    @property
    def name(self) -> str:
        """How the user asked: "Ctrl-C" or "SIGTERM"."""
        return NAMES.get(self.signum, f"signal {self.signum}")

    def _handle(self, signum, frame):
        if self.requested:
            quit_now(signum, f"{NAMES.get(signum, signum)} again: {self.quit_message}")
        self.requested = True
        self.signum = signum
