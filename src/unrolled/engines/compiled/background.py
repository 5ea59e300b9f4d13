"""Compiling in the background: a fresh process starts on the plain NumPy loops, at once.

The first run of a graph on a machine makes Numba compile its step loops and
kernels, which takes far longer than many updates on the plain NumPy loops;
later processes load the machine code from the on-disk cache
(:mod:`~unrolled.engines.compiled.kernels.jitcache`), and even that load
costs more than one NumPy update. So a :class:`~.engine.CompiledEngine` made
with ``jit="auto"`` does not wait: its runs of a kind (rows, precision, with
or without the backward pass) go to the NumPy loops, and the second of them
starts a child process (:func:`main`) that makes the same engine and runs it
once on zeros of the same shapes. The child's compilations land in the
caches; once it has exited, the next run loads them and takes the engine's
own route. With a warm cache the child only loads and exits. The optimizers'
and the clipping's Numba passes follow the same rule (:func:`compiling`).

The child waits for a second run because starting it costs the parent's own
thread time (pickling the job, and ``subprocess``'s Python code, which takes
the interpreter's lock from the work that follows the run):
the first run, the first update a user waits for, runs exactly as the plain
NumPy engine's would, and a process that runs a kind once (a look at a loss,
a gradient check) starts no compile it would never use. :func:`wait` starts
the children of kinds run once, so that after it every kind run so far takes
its own route.

The two agree to rounding (the agreement tests hold the NumPy loops to the
reference engine), so a process whose first updates ran on NumPy differs in
the last bits from one that waited for the compiler. Where every bit must
match, turn the background off with :func:`set_enabled`: data-parallel
training does (all ranks must apply the same update), and so does a resumed
``unrolled train`` (it continues as the saved run would have).
"""

from __future__ import annotations

import _thread
import atexit
import dataclasses
import hashlib
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path

import numpy as np

from .kernels.jitcache import jit_turned_off, numba_installed

_state = {"enabled": True, "hooks": []}
_children: dict[str, Child] = {}  # one child per distinct job, shared by every engine that asks
# (engine, kind) for every kind of run an engine still sends to NumPy: asked by every optimizer step,
# so kept as one set rather than found by walking the engines
_waiting: set[tuple[int, tuple]] = set()
# engines with a kind run once and its child not started yet, for wait() to start
_run_once: weakref.WeakSet[WarmStart] = weakref.WeakSet()


def set_enabled(on: bool) -> None:
    """Whether engines made with ``jit="auto"`` start on NumPy while a child compiles (the default),
    or compile in this process and wait for it. Process-wide; engines read it at each run."""
    _state["enabled"] = bool(on)


def enabled() -> bool:
    """Whether a run may start on NumPy now: switched on, and Numba there to compile for it."""
    return _state["enabled"] and not jit_turned_off() and numba_installed()


def register(hook: str) -> None:
    """Ask every child to call ``hook`` ("module:function") with the run's parameters (zeros) after
    the engine's run, so that what the caller runs next (an optimizer's Numba pass) compiles too.
    The train layer registers its optimizers this way: the engine never imports them."""
    if hook not in _state["hooks"]:
        _state["hooks"].append(hook)


def compiling() -> bool:
    """Whether an engine's runs still go to the NumPy loops (its child compiling, or done and not yet
    taken up by the engine's next run): Numba passes outside the engine (the optimizers, the clipping)
    keep to their NumPy form until then, so that an update never waits for the compiler, nor pays for
    loading Numba halfway through."""
    return bool(_waiting)


def _child_running() -> bool:
    return any(child.state() == "running" for child in _children.values())


def wait(timeout: float | None = None) -> None:
    """Start the children of kinds run only once, and wait for every child: after it, every kind run so
    far takes its engine's own route (a benchmark's set-up relies on it, to time the compiled code)."""
    for warm in list(_run_once):
        warm.start_children()
    for child in list(_children.values()):
        child.wait(timeout)


class WarmStart:
    """One engine's start on NumPy: which kinds of run are ready for its own route, which wait.

    ``numpy_loops`` makes the plain NumPy loops (jit=False) when first needed;
    ``options`` are the engine's arguments, for the child to make the same engine."""

    def __init__(self, graph, options: dict, numpy_loops):
        self.graph, self.options = graph, options
        self._make_numpy_loops, self._numpy = numpy_loops, None
        self._jobs: dict[tuple, Child] = {}
        self._once: dict[tuple, dict] = {}  # the job of each kind run once, its child not started yet
        self._ready: set[tuple] = set()
        self.numpy_runs = 0  # runs that went to the NumPy loops while a child compiled
        weakref.finalize(self, _forget, id(self))  # an engine dropped while waiting holds nothing back

    def waiting(self, feeds, combine: str, backward: bool) -> bool:
        """Whether this run goes to the NumPy loops: a child compiles for its kind, or starts now."""
        key = _kind(feeds.B, feeds.dtype, backward)
        if key in self._ready or not enabled():
            return False
        child = self._jobs.get(key)
        if child is None:  # run_numpy starts it
            return self._to_numpy(key)
        state = child.state()
        if state == "running":
            return self._to_numpy(key)
        if state == "failed":
            warnings.warn(f"compiling graph '{self.graph.name}' in the background failed ({child.failure()}); "
                          "compiling it in this process instead", RuntimeWarning, stacklevel=3)
        self._ready.add(key)
        _waiting.discard((id(self), key))
        return False

    def _to_numpy(self, key: tuple) -> bool:
        self.numpy_runs += 1
        _waiting.add((id(self), key))
        return True

    def run_numpy(self, feeds, combine: str, backward: bool):
        """The run on the plain NumPy loops. Until its kind's child starts, a run has the cores to
        itself; the second run of a kind starts the child when done (one child at a time: a second
        kind waits, and may find the work cached). While a child runs, the products take one thread,
        as threads that wait for the core the child holds make each product many times slower."""
        from .kernels.onednn import products_on_one_thread

        key = _kind(feeds.B, feeds.dtype, backward)
        if key not in self._jobs and not _child_running():
            result = self.numpy_loops().run(feeds.params, feeds, combine, backward)
            if key in self._once:
                self._start(key)
            else:
                self._once[key] = self._job(feeds, combine, backward)
                _run_once.add(self)
            return result
        with products_on_one_thread():
            return self.numpy_loops().run(feeds.params, feeds, combine, backward)

    def start_children(self) -> None:
        """Start the child of every kind run once so far (:func:`wait` does, before it waits)."""
        for key in list(self._once):
            self._start(key)

    def _start(self, key: tuple) -> None:
        self._jobs[key] = _child_for(self._once.pop(key))
        if not self._once:
            _run_once.discard(self)

    def pending(self, B: int, dtype, backward: bool = True) -> bool:
        """Whether a run of this kind would go to the NumPy loops now (``explain`` says so)."""
        return enabled() and _kind(B, dtype, backward) not in self._ready

    def numpy_loops(self):
        """The plain NumPy loops of this graph (a staged graph's, stage by stage)."""
        if self._numpy is None:
            self._numpy = self._make_numpy_loops()
        return self._numpy

    def _job(self, feeds, combine: str, backward: bool) -> dict:
        return {"graph": self.graph, "options": self.options, "feeds": _shapes_only(feeds),
                "combine": combine, "backward": backward, "hooks": list(_state["hooks"])}


def _forget(engine_id: int) -> None:
    _waiting.difference_update({w for w in _waiting if w[0] == engine_id})


def _kind(B: int, dtype, backward: bool) -> tuple:
    """What a child compiles for, and what an engine switches on: rows, precision, backward or not."""
    return B, np.dtype(dtype).str, backward


# The child steps aside before it imports anything: its imports would otherwise take a core from
# the parent's first updates, which are what a user waits for (a BLAS call split across both cores
# runs at the pace of the half that shares one). Niced before its first import, not after.
_CHILD_START = f"""\
import os
if hasattr(os, "nice"):
    os.nice(19)
import runpy
runpy.run_module({__name__!r}, run_name="__main__", alter_sys=True)
"""


class Child:
    """A child process compiling one job; its standard error kept in a file, for a failure's reason.

    Started from a thread of its own, so that the caller does not wait: the
    first run on the NumPy loops has just run oneDNN's products on every core,
    whose OpenMP threads spin a while after each; a process started then waits
    for a core until it has become the new interpreter, and whoever started it
    waits as long, many times what a start takes on a quiet machine. The thread
    is ``_thread``'s (``threading``'s would make the caller wait for the
    thread's own start) and :func:`_finish_starting` lets it finish at exit."""

    def __init__(self, job: bytes):
        self._log, self._last_line = tempfile.TemporaryFile(), ""
        self._process, self._error = None, ""
        self._started = threading.Event()
        _starting.add(self)
        _thread.start_new_thread(self._start, (job,))

    def _start(self, job: bytes) -> None:
        try:
            env = dict(os.environ)
            here = str(Path(__file__).resolve().parents[3])  # the folder that holds this `unrolled`
            env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
            # a session of its own: the user's Ctrl-C stops the run, and the child still fills the cache
            self._process = subprocess.Popen([sys.executable, "-c", _CHILD_START], stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=self._log, env=env,
                                             start_new_session=True)
            self._process.stdin.write(job)
            self._process.stdin.close()
        except OSError as e:
            if self._process is None:  # else the child died at once: its exit code and standard error say why
                self._error = f"could not start {sys.executable}: {e}"
                self._log.close()
                self._log = None
        finally:
            self._started.set()
            _starting.discard(self)

    def state(self) -> str:
        if not self._started.is_set():
            return "running"
        if self._process is None:
            return "failed"
        code = self._process.poll()
        if code is None:
            return "running"
        self._keep_last_line()
        return "ready" if code == 0 else "failed"

    def wait(self, timeout: float | None = None) -> None:
        begun = time.monotonic()
        if not self._started.wait(timeout) or self._process is None:
            return
        try:
            self._process.wait(None if timeout is None else max(0.0, timeout - (time.monotonic() - begun)))
        except subprocess.TimeoutExpired:
            return
        self._keep_last_line()

    def failure(self) -> str:
        """Why it could not start, or the last line the child wrote to standard error, or its exit code."""
        if self._error:
            return self._error
        self._keep_last_line()
        return self._last_line or f"exit code {self._process.returncode}"

    def _keep_last_line(self) -> None:
        if self._log is None or self._process is None or self._process.returncode is None:
            return
        self._log.seek(0)
        lines = [ln for ln in self._log.read().decode(errors="replace").splitlines() if ln.strip()]
        self._last_line = lines[-1].strip() if lines else ""
        self._log.close()
        self._log = None


_starting: set[Child] = set()  # children whose thread has not started them yet


@atexit.register
def _finish_starting() -> None:
    """At exit, let each child's start finish: ``_thread``'s threads end with the interpreter, and a
    process that ran a few updates and ended would otherwise leave its cache unfilled."""
    for child in list(_starting):
        child._started.wait(10)


# a forked copy of this process has no starting thread to wait for
os.register_at_fork(after_in_child=_starting.clear)


def _child_for(job: dict) -> Child:
    data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
    digest = hashlib.sha256(data).hexdigest()
    child = _children.get(digest)
    if child is None or child.state() == "failed":
        child = _children[digest] = Child(data)
    return child


class _Zeros:
    """An array's shape and dtype in place of its values: the child runs on zeros, and a job stays small."""

    def __init__(self, a: np.ndarray):
        self.shape, self.dtype = a.shape, a.dtype.str

    def make(self) -> np.ndarray:
        return np.zeros(self.shape, self.dtype)


# Steps the child runs: the compiled code does not depend on T (its loops take the step range as
# arguments), and a short run keeps the child's memory small beside its parent's.
CHILD_STEPS = 4
_PER_STEP = ("inputs", "masks", "output_grads")  # the Feeds fields shaped [T, B, ...]


def _shapes_only(feeds):
    """``feeds`` with each array replaced by its shape and dtype, and at most CHILD_STEPS steps."""
    T = min(feeds.T, CHILD_STEPS)
    return dataclasses.replace(_map_arrays(feeds, lambda a, per_step: _Zeros(a[:T] if per_step else a)), T=T)


def _zeros_of(feeds):
    return _map_arrays(feeds, lambda z, per_step: z.make(), kind=_Zeros)


def _map_arrays(feeds, fn, kind=np.ndarray):
    """``feeds`` with ``fn(value, per_step)`` in place of each ``kind`` value, in its fields and their dicts."""
    def each(value, per_step: bool):
        if isinstance(value, kind):
            return fn(value, per_step)
        if isinstance(value, dict):
            return {k: each(v, per_step) for k, v in value.items()}
        return value

    return dataclasses.replace(feeds, **{f.name: each(getattr(feeds, f.name), f.name in _PER_STEP)
                                         for f in dataclasses.fields(feeds)})


def main() -> None:
    """The child: read a job, make its engine, run it once on zeros, call the hooks, exit 0."""
    from .engine import CompiledEngine

    set_enabled(False)  # compile here, in this process: that is the child's whole job
    job = pickle.loads(sys.stdin.buffer.read())
    feeds = _zeros_of(job["feeds"])
    engine = CompiledEngine(job["graph"], **job["options"])
    engine.run_feeds(feeds, job["combine"], job["backward"])
    for hook in job["hooks"]:
        module, _, name = hook.partition(":")
        getattr(importlib.import_module(module), name)(feeds.params)


if __name__ == "__main__":  # run as a script, this file is __main__: the engine's copy holds the state
    from unrolled.engines.compiled import background

    background.main()
