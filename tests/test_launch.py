"""The ``unrolled`` command takes over Ctrl-C and SIGTERM before anything heavy loads (launch.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_unrolled_loads_nothing_heavy():
    done = _python("import sys, unrolled; print(sorted(m for m in ('numpy', 'unrolled.graph') if m in sys.modules))")
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_the_public_names_still_import():
    done = _python("from unrolled import Graph, Param, Vertex, cells, make_engine, unroll; import unrolled; "
                   "print(unrolled.cells.__name__, callable(make_engine), unrolled.__version__)")
    assert done.returncode == 0 and done.stdout.split()[:2] == ["unrolled.models.cells", "True"], done.stderr


@pytest.mark.parametrize("signum, rc, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_while_loading_ends_the_command_in_one_line(signum, rc, name):
    done = _python("import os, signal; from unrolled.launch import quit_on_signals_while_loading\n"
                   f"quit_on_signals_while_loading(); os.kill(os.getpid(), {int(signum)}); import numpy\n"
                   "print('still running')")
    assert done.returncode == rc
    assert done.stdout == ""
    assert done.stderr.strip() == f"unrolled: interrupted ({name}) while starting"


def test_python_m_unrolled_is_the_command():
    done = _python("import runpy, sys; sys.argv = ['unrolled', '--version']; runpy.run_module('unrolled', run_name='__main__')")
    assert done.returncode == 0 and "0.1.0" in done.stdout + done.stderr, done.stderr


def test_a_native_crash_says_where_every_thread_was():
    """The command turns on Python's fault handler: a segfault prints the stacks, then ends as one."""
    done = _python("from unrolled.launch import report_crashes; report_crashes()\n"
                   "import ctypes; ctypes.string_at(0)")
    assert done.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in done.stderr and "most recent call first" in done.stderr
