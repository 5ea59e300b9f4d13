"""A batch's rows split across threads (rowsplit.py) give the run of the whole batch.

The parts' losses are divided by the whole batch's divisor and summed; their
outputs, states and input gradients are put side by side. Held against the
reference engine on random cyclic graphs (masks, given and learned initial
states, delays up to 3, outside gradients, both ways of combining the copies)
and on a stack of LSTM layers (the engine's stages), in float32, where the
split happens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import lstm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_agreement import _data, assert_agree, cyclic_graphs

from unrolled.engines.compiled import rowsplit
from unrolled.engines.compiled.engine import CompiledEngine
from unrolled.engines.compiled.kernels import onednn
from unrolled.engines.compiled.loops import StepLoops
from unrolled.engines.compiled.stages import StagedRun
from unrolled.engines.reference import run as reference_run

try:
    import numba  # noqa: F401

    HAVE_NUMBA = True
except ImportError:
    HAVE_NUMBA = False

splits = pytest.mark.skipif(onednn.SGEMM is None or not HAVE_NUMBA,
                            reason="rows are split only where oneDNN runs the products in Numba loops")


@pytest.fixture
def two_cores(monkeypatch):
    """Split in two whatever this machine has (the products in each part run on one thread anyway)."""
    monkeypatch.setattr(onednn, "threads", lambda: 2)


@pytest.fixture
def numba_loops(monkeypatch):
    """The Numba loops wherever a graph's core allows them (the other tests keep the NumPy loops)."""
    monkeypatch.setenv("UNROLLED_JIT", "1")


@pytest.fixture
def threads_seen(monkeypatch):
    """The names of the threads the engine's runs over rows went to."""
    seen = []
    for strategy in (StepLoops, StagedRun):  # the loops a whole batch, or each part of it, runs on
        def spy(self, *args, real=strategy.run, **kw):
            seen.append(threading.current_thread().name)
            return real(self, *args, **kw)

        monkeypatch.setattr(strategy, "run", spy)
    return seen


def test_the_rows_split_only_where_each_thread_gets_enough_of_them(monkeypatch, two_cores):
    monkeypatch.setattr(onednn, "SGEMM", lambda *a: 0)
    assert rowsplit.parts(50, np.float32) == [(0, 25), (25, 50)]
    assert rowsplit.parts(33, np.float32) == [(0, 16), (16, 33)]
    assert rowsplit.parts(2 * rowsplit.MIN_ROWS - 1, np.float32) is None  # one part would be too small
    assert rowsplit.parts(50, np.float64) is None  # OpenBLAS's products: one pool for the process
    assert rowsplit.parts(50, np.float32, threads=1) is None
    assert rowsplit.parts(500, np.float32, threads=8) == [(0, 250), (250, 500)]  # no more than oneDNN's threads
    monkeypatch.setattr(onednn, "threads", lambda: 4)
    assert rowsplit.parts(64, np.float32) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert rowsplit.parts(63, np.float32) == [(0, 21), (21, 42), (42, 63)]
    monkeypatch.setattr(onednn, "SGEMM", None)
    assert rowsplit.parts(64, np.float32) is None


def test_threads_must_be_auto_or_a_count():
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ValueError, match="threads must be 'auto' or a whole number >= 1"):
            CompiledEngine(lstm(), threads=bad)


@splits
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(g=cyclic_graphs(), T=st.integers(1, 5), B=st.integers(32, 40), seed=st.integers(0, 2**16),
       combine=st.sampled_from(["sum", "mean"]), outside=st.booleans())
def test_split_rows_agree_with_the_reference(two_cores, numba_loops, threads_seen, g, T, B, seed, combine, outside):
    params, inputs, masks, init = _data(g, T, B, seed, np.float32)
    kw = dict(masks=masks, init_states=init, combine=combine)
    eng = CompiledEngine(g, whole=False)  # no whole-run function for these small steps
    if outside:  # the gradients a decoder sends back into an encoder
        rng = np.random.default_rng(seed + 1)
        probe = eng.run(params, inputs, backward=False, **kw)
        kw["final_state_grads"] = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in probe.final_states.items()}
        kw["output_grads"] = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in probe.outputs.items()}
    threads_seen.clear()
    split = eng.run(params, inputs, **kw)
    # split only where every stage runs the Numba loop: not where a core has an op it lacks (softmax),
    # whose NumPy loop the parts would share; a graph of two stages may have one of each
    if all(e.uses_jit(B) for _, e in eng.stages) if eng.stages else eng.uses_jit(B):
        assert eng.row_parts(B, np.float32) == [(0, B // 2), (B // 2, B)]
        assert sorted(threads_seen) == sorted([threading.current_thread().name, "unrolled-rows-1_0"])
    else:
        assert eng.row_parts(B, np.float32) is None and threads_seen == [threading.current_thread().name]
    assert_agree(reference_run(g, params, inputs, **kw), split, 1e-4)


@splits
@pytest.mark.parametrize("learned_init", [False, True])
def test_split_rows_of_a_layer_stack_agree_with_the_reference(two_cores, threads_seen, learned_init):
    g = lstm(layers=2, learned_init=learned_init)
    params, inputs, masks, init = _data(g, 7, 37, 3, np.float32)
    if learned_init:
        init = {}
    eng = CompiledEngine(g, jit=True, whole=False)
    assert eng.stages, "a stack of layers runs layer by layer"
    for _ in range(2):  # the second run reuses each part's buffers
        threads_seen.clear()
        split = eng.run(params, inputs, masks=masks, init_states=init)
        assert sorted(threads_seen) == sorted([threading.current_thread().name, "unrolled-rows-1_0"])
        assert_agree(reference_run(g, params, inputs, masks=masks, init_states=init), split, 1e-4)
    whole = CompiledEngine(g, jit=True, whole=False, threads=1).run(params, inputs, masks=masks, init_states=init)
    assert_agree(whole, split, 1e-4)


@splits
def test_rows_stay_in_one_run_when_a_stage_takes_the_numpy_loop(two_cores, numba_loops, threads_seen):
    """The plain-NumPy loop of a stage keeps its buffers in one namespace: two parts cannot share it."""
    from unrolled.graph.folded import Graph
    from unrolled.models import cells

    g = Graph("numpy-stage")
    h1 = cells.elman(g, g.input("x", 3), 4)
    h2 = g.state("h2", 4)
    g.softmax(g.matmul(g.param("W2", (4, 8)), g.concat(h1, h2.prev), name="z2"), name="h2")
    y = g.output(g.matmul(g.param("V", (3, 4)), h2, name="y"))
    g.loss("cross_entropy", y, g.index_input("target", 3))
    eng = CompiledEngine(g, whole=False)
    assert len(eng.stages) == 2 and [e.uses_jit(20) for _, e in eng.stages] == [True, False]
    assert eng.row_parts(40, np.float32) is None
    params, inputs, masks, init = _data(g, 4, 40, 5, np.float32)
    got = eng.run(params, inputs, masks=masks, init_states=init)
    assert threads_seen == [threading.current_thread().name]
    assert_agree(reference_run(g, params, inputs, masks=masks, init_states=init), got, 1e-4)


@splits
def test_a_forked_child_runs_whole_batches_after_its_parent_split_them():
    """The parent's threads are not in a forked child: there it runs on one thread (onednn's fork hook)."""
    code = (
        "import multiprocessing as mp, numpy as np, sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from helpers import lstm\n"
        "from unrolled.engines.compiled.engine import CompiledEngine\n"
        "g = lstm(layers=2)\n"
        "eng = CompiledEngine(g, jit=True, whole=False)\n"
        "params = g.init_params(0, np.float32)\n"
        "x = np.random.default_rng(0).normal(size=(5, 40, 3)).astype(np.float32)\n"
        "t = np.zeros((5, 40), np.int64)\n"
        "def loss(_):\n"
        "    return round(eng.run(params, {'x': x, 'target': t}).loss, 4)\n"
        "if __name__ == '__main__':\n"
        "    print(loss(0), eng.row_parts(40, np.float32) is not None)\n"
        "    with mp.get_context('fork').Pool(2) as p:\n"
        "        print(*p.map(loss, range(3)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    first, children = out.stdout.splitlines()
    parent, split = first.split()
    assert children.split() == [parent] * 3
    assert split == str(os.cpu_count() >= 2 and rowsplit.parts(40, np.float32) is not None)
