"""Step loops that different processes compiled into one cache give right answers when one process loads them all.

Numba names a compiled closure by its qualified name, its argument types and a
counter of the process that compiled it, and links functions of one name as
one. A loop whose products are ``out = a @ b`` and a loop whose products are
``out += a @ b``, each compiled first thing in a process of its own, both named
their product ``impl`` with counter 2: a later process that ran both graphs ran
the first graph's product in the second graph's loop, and its loss and
gradients were silently wrong (the oneDNN test's LSTM after a small graph).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

SCRIPT = """
import sys
import numpy as np
from unrolled import cells
from unrolled.engines.compiled.engine import CompiledEngine
from unrolled.graph.folded import Graph
from unrolled.engines.reference import run as reference_run


def readout(g, h):
    y = g.output(g.matmul(g.param("V", (2, 3)), h, name="y"))
    g.loss("mse", y, g.input("target", 2))
    return g


def graph(kind):
    if kind == "set":  # the loop's first product is out = h_prev @ W.T
        g = Graph("set")
        x, h = g.input("x", 3), g.state("h", 3)
        g.tanh(g.add(g.matmul(g.param("W", (3, 3)), h.prev), x), name="h")
        return readout(g, h)
    g = Graph("add")  # the loop's first product is added onto the input's batched product
    return readout(g, cells.elman(g, g.input("x", 3), 3))


for kind in sys.argv[1:]:
    g = graph(kind)
    rng = np.random.default_rng(0)
    params = {k: v + rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in g.init_params(0, np.float32).items()}
    inputs = {"x": rng.normal(size=(4, 3, 3)).astype(np.float32), "target": rng.normal(size=(4, 3, 2)).astype(np.float32)}
    got = CompiledEngine(g, jit=True).run(params, inputs)
    want = reference_run(g, {k: v.astype(np.float64) for k, v in params.items()},
                         {k: v.astype(np.float64) for k, v in inputs.items()})
    worst = max(float(np.abs(got.grads[k] - want.grads[k]).max()) for k in want.grads)
    scale = max(float(np.abs(a).max()) for a in want.grads.values())
    ok = abs(got.loss - want.loss) <= 1e-4 * abs(want.loss) and worst <= 1e-4 * scale
    print(kind, "agrees" if ok else f"differs: loss {got.loss} against {want.loss}, gradient off by {worst}")
"""


def _run(cache, *kinds) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}  # Numba caches the loops beside them
    env["UNROLLED_CACHE"] = str(cache)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", SCRIPT, *kinds], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_loops_compiled_by_two_processes_agree_with_the_reference_in_a_third(tmp_path):
    assert _run(tmp_path, "set") == ["set agrees"]  # each compiles its loops into the empty cache
    assert _run(tmp_path, "add") == ["add agrees"]
    assert _run(tmp_path, "set", "add") == ["set agrees", "add agrees"]  # both loaded from the cache
    assert _run(tmp_path, "add", "set") == ["add agrees", "set agrees"]
