"""An engine's first runs go to the NumPy loops while a child process compiles (background.py).

Each test turns the background on (conftest.py turns it off for every other
test) with Numba allowed, and checks what a user relies on: the first run
returns the reference engine's numbers without waiting for Numba, the child
starts with the second run of a kind (or at ``background.wait()``), the engine
takes its own compiled route once the child is done, a failed child is said
and the compile happens here instead, and the optimizers keep to NumPy while
a child compiles.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import assert_agree, elman, make_inputs, make_params

from unrolled.engines.compiled import background
from unrolled.engines.compiled.engine import CompiledEngine
from unrolled.engines.reference import run as reference_run
from unrolled.train import optim

pytest.importorskip("numba")


@pytest.fixture
def in_background(monkeypatch):
    monkeypatch.setenv("UNROLLED_JIT", "1")
    background.set_enabled(True)
    yield
    background.wait()
    background.set_enabled(False)


def _case(rng, T=6, B=3):
    g = elman()
    return g, make_params(g, rng), make_inputs(g, T, B, rng)


def test_first_runs_take_numpy_then_the_compiled_route(in_background, monkeypatch, rng):
    g, params, inputs = _case(rng)
    expected = reference_run(g, params, inputs)
    started = []
    real = background.Child
    monkeypatch.setattr(background, "Child", lambda job: started.append(job) or real(job))
    engine = CompiledEngine(g)
    assert "plain NumPy loops" in engine.explain(6, 3, np.float64)
    first = engine.run(params, inputs)
    assert (engine.warm_start.numpy_runs, len(started)) == (1, 0), "the first run starts no child"
    assert_agree(first, expected, 1e-10)
    second = engine.run(params, inputs)
    assert (engine.warm_start.numpy_runs, len(started)) == (2, 1), "the second run starts the child"
    assert_agree(second, expected, 1e-10)
    background.wait()
    third = engine.run(params, inputs)
    assert engine.warm_start.numpy_runs == 2, "the child is done: the engine takes its own route"
    assert_agree(third, expected, 1e-10)
    assert "plain NumPy loops" not in engine.explain(6, 3, np.float64)
    assert engine.strategies(6, 3, np.float64) & {"whole", "numba_loop"}


def test_wait_starts_the_child_of_a_kind_run_once(in_background, rng):
    """A benchmark's set-up runs once and waits: the run after it is the compiled engine's own."""
    g, params, inputs = _case(rng, B=2)
    engine = CompiledEngine(g)
    engine.run(params, inputs)
    background.wait()
    result = engine.run(params, inputs)
    assert engine.warm_start.numpy_runs == 1
    assert "plain NumPy loops" not in engine.explain(6, 2, np.float64)
    assert_agree(result, reference_run(g, params, inputs), 1e-10)


def test_a_failed_child_is_said_and_the_engine_compiles_here(in_background, monkeypatch, rng):
    g, params, inputs = _case(rng, B=4)
    monkeypatch.setattr(background.sys, "executable", "/bin/false")  # the child exits 1 at once
    engine = CompiledEngine(g)
    engine.run(params, inputs)
    background.wait()
    monkeypatch.setattr(background.sys, "executable", sys.executable)
    with pytest.warns(RuntimeWarning, match="compiling graph 'elman' in the background failed .*in this process"):
        result = engine.run(params, inputs)
    assert engine.warm_start.numpy_runs == 1
    assert_agree(result, reference_run(g, params, inputs), 1e-10)


def test_a_child_that_cannot_start_is_said_and_the_engine_compiles_here(in_background, monkeypatch, rng):
    g, params, inputs = _case(rng, B=5)
    monkeypatch.setattr(background.sys, "executable", "/nonexistent/python")  # started from a thread of its own
    engine = CompiledEngine(g)
    first = engine.run(params, inputs)  # the run does not wait for the start, nor fail with it
    background.wait()
    monkeypatch.setattr(background.sys, "executable", sys.executable)
    with pytest.warns(RuntimeWarning, match="background failed [(]could not start /nonexistent/python: .*[)]"):
        second = engine.run(params, inputs)
    expected = reference_run(g, params, inputs)
    assert_agree(first, expected, 1e-10)
    assert_agree(second, expected, 1e-10)


def test_switched_off_the_first_run_waits_for_the_compiler(in_background, rng):
    g, params, inputs = _case(rng)
    background.set_enabled(False)
    engine = CompiledEngine(g)
    engine.run(params, inputs)
    assert engine.warm_start.numpy_runs == 0
    assert CompiledEngine(g, jit=True).warm_start is None, "only jit='auto' leaves the engine the choice"


def test_optimizers_keep_to_numpy_while_a_child_compiles(in_background, monkeypatch):
    monkeypatch.setattr(optim, "_KERNELS", None)  # resolved afresh here, and put back for the other tests
    monkeypatch.setattr(background, "compiling", lambda: True)
    assert optim.numba_kernels() is None
    monkeypatch.setattr(background, "compiling", lambda: False)
    assert optim.numba_kernels() is not None


def test_one_job_one_child(in_background, monkeypatch, rng):
    """Engines of one graph asking for the same kind of run share the child's work."""
    g, params, inputs = _case(rng, B=5)
    started = []
    real = background.Child
    monkeypatch.setattr(background, "Child", lambda job: started.append(job) or real(job))
    a, b = CompiledEngine(g), CompiledEngine(g)
    for engine in (a, b, a, b):
        engine.run(params, inputs)
    background.wait()
    assert len(started) == 1


def test_an_engine_dropped_while_its_child_compiles_holds_nothing_back(in_background, rng):
    """The optimizers keep to NumPy while an engine waits for its child; once the engine is gone
    (a notebook cell run again), nothing waits any more."""
    import gc

    g, params, inputs = _case(rng, B=5)
    engine = CompiledEngine(g)
    engine.run(params, inputs)
    assert background.compiling()
    del engine
    gc.collect()
    assert not background.compiling()
