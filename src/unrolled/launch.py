"""The ``unrolled`` command's entry: Ctrl-C and SIGTERM are taken over before anything heavy loads.

Loading NumPy, Matplotlib and the engines takes a moment in which Python's
defaults would turn a Ctrl-C into a traceback from inside some import and let
SIGTERM kill the process without a word. Nothing has been made yet then, so
the process ends at once, saying so, with the shell's code for the signal
(130, 143); :func:`unrolled.cli.main` then puts its own handlers in place
(unrolled.train.interrupts), and training takes them over to stop and save.
"""

from __future__ import annotations

import os
import signal

_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def _quit_while_loading(signum, frame) -> None:
    os.write(2, f"unrolled: interrupted ({_NAMES.get(signum, signum)}) while starting\n".encode())
    os._exit(128 + signum)


def quit_on_signals_while_loading() -> None:
    """From now until the command puts its own handlers in place, Ctrl-C or SIGTERM ends the process."""
    for signum in _NAMES:
        signal.signal(signum, _quit_while_loading)


def report_crashes() -> None:
    """Should native code ever crash the process (a segfault, an abort from the C library), Python's
    fault handler writes where every thread was, so that a rare crash, seen once, can be traced.
    It only installs handlers for those fatal signals: Ctrl-C and SIGTERM keep ours."""
    import faulthandler

    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)


def main() -> int:
    quit_on_signals_while_loading()
    report_crashes()
    from unrolled.cli import main as cli_main

    return cli_main()
