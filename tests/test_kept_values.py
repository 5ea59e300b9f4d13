"""What the compiled engine keeps between the forward and the backward pass, and what it hands out.

A long run's memory is the values kept for every step. An LSTM's ``tanh(c)``
is computed again at each backward step from ``c``'s history instead of
being kept (``Plan.recomputed``); an output computed after the loop is
handed to the caller as it is, and must still never share memory with a
buffer the next run writes over.
"""

from __future__ import annotations

import numpy as np
from helpers import lstm, make_inputs, make_params, run_every_path

from unrolled.engines.compiled.engine import CompiledEngine
from unrolled.engines.compiled.plan import plan
from unrolled.graph.folded import Graph


def test_an_lstm_computes_tanh_c_again_instead_of_keeping_it():
    p = plan(lstm(layers=2))
    again = {name for name in p.recomputed}
    assert again == {"l0.tanh_c", "l1.tanh_c"}
    assert not again & p.stored
    assert {"l0.i", "l0.f", "l0.g", "l0.o"} <= p.stored  # read back from no history: kept


def test_a_value_read_outside_the_loop_is_kept():
    """tanh(c) as an output, and read by a product: each needs every step's value after the loop."""
    g = Graph("read_outside")
    x, h = g.input("x", 3), g.state("h", 4)
    c = g.state("c", 4)
    g.add(g.matmul(g.param("U", (4, 7)), g.concat(x, h.prev)), c.prev, name="c")
    t = g.tanh(c, name="t")
    g.tanh(g.matmul(g.param("W", (4, 4)), t), name="h")
    g.output(g.matmul(g.param("V", (2, 4)), h, name="y"))
    g.loss("mse", g.vertices["y"], g.input("target", 2))
    assert "t" not in plan(g).recomputed and "t" in plan(g).stored


def test_recomputed_values_give_the_reference_gradients_on_every_path():
    rng = np.random.default_rng(3)
    g = lstm(layers=2)
    run_every_path(g, make_params(g, rng), make_inputs(g, 7, 4, rng), tol=1e-9)


def test_outputs_survive_the_next_run():
    """The post-loop logits are handed over without a copy; a state output (kept in a buffer the
    next run reuses) is copied. Neither changes when the engine runs again."""
    g = lstm()
    g.output(g.vertices["h"])
    rng = np.random.default_rng(0)
    params = make_params(g, rng)
    eng = CompiledEngine(g)
    first = eng.run(params, make_inputs(g, 6, 3, rng))
    kept = {k: v.copy() for k, v in first.outputs.items()}
    eng.run(params, make_inputs(g, 6, 3, rng))
    for name, value in first.outputs.items():
        np.testing.assert_array_equal(value, kept[name], err_msg=f"output '{name}' changed")
