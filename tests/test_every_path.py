"""Graphs that once broke one compiled path, run through every path (helpers.run_every_path).

Each test is built from a reproducer of issue 16: a state defined by a
slice and a gate slice, read through a delay (the step loops never wrote
their histories); ``combine="mean"`` with a learned initial vector an op
also reads (divided by D copies instead of T + D); float32 units saturated
far beyond the point where the fast tanh stopped at 1 - 2.4e-7 (their
derivative, 1 - y^2, was not 0).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_every_path

from unrolled.engines.compiled.engine import STRATEGIES
from unrolled.graph.folded import Graph


def _slice_state(two_layers: bool = False) -> Graph:
    """h is columns 1..2 of a = tanh(W·[x; h_prev]) (a is wider than h); ``two_layers``: a second
    cycle reads h through an elementwise run (add, tanh), so that stages and fused kernels run."""
    g = Graph("slice_state")
    x, h = g.input("x", 2), g.state("h", 2)
    a = g.tanh(g.matmul(g.param("W", (3, 4)), g.concat(x, h.prev)), name="a")
    g.slice(a, 1, 3, name="h")
    top = h
    if two_layers:
        h2 = g.state("h2", 2)
        pre = g.add(g.matmul(g.param("U", (2, 4)), g.concat(h, h2.prev)), g.param("b", (2,), init="normal:0.5"))
        top = g.tanh(pre, name="h2")
    y = g.output(g.matmul(g.param("V", (2, 2)), top, name="y"))
    if not two_layers:  # the NaN by default (the whole-run function has no softmax: the loops run)
        g.output(g.softmax(y, name="p"))
    g.loss("cross_entropy", y, g.index_input("t", 2))
    return g


def _feeds(g: Graph, T: int, B: int, seed: int = 0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    inputs = {}
    for v in g.inputs:
        inputs[v.name] = (rng.integers(0, v.size, (T, B)) if v.kind == "index"
                          else rng.normal(size=(T, B, v.size)).astype(dtype))
    return inputs


@pytest.mark.parametrize("two_layers", [False, True])
def test_state_defined_by_slice_read_through_delay(two_layers):
    g = _slice_state(two_layers)
    params = g.init_params(0)
    # two layers: every strategy applies, and must have run
    run_every_path(g, params, _feeds(g, T=3, B=2), require=set(STRATEGIES) if two_layers else ())


def test_gate_slice_read_through_delay():
    """zi, a gate (a slice of the product z), read one step later: zi.prev."""
    g = Graph("gate_prev")
    x, h = g.input("x", 2), g.state("h", 3)
    z = g.matmul(g.param("W", (6, 5)), g.concat(x, h.prev), name="z")
    zi, zf = g.split(z, 2, names=["zi", "zf"])
    g.tanh(g.add(g.sigmoid(zf), zi.prev), name="h")
    y = g.output(g.matmul(g.param("V", (2, 3)), h, name="y"))
    g.loss("cross_entropy", y, g.index_input("t", 2))
    run_every_path(g, g.init_params(1), _feeds(g, T=4, B=2, seed=1), require={"fused"})


@pytest.mark.parametrize("given", [False, True])
def test_mean_over_copies_of_a_learned_initial_vector_an_op_reads(given):
    """h.init fills D initial slots and is added at each of T steps: T + D copies (D alone if given)."""
    g = Graph("init_read")
    x, h = g.input("x", 2), g.state("h", 3, init="learned")
    a = g.matmul(g.param("W", (3, 5)), g.concat(x, h.prev), name="a")
    g.tanh(g.add(a, g.params["h.init"]), name="h")
    y = g.output(g.matmul(g.param("V", (2, 3)), h, name="y"))
    g.loss("cross_entropy", y, g.index_input("t", 2))
    params = {k: v + 0.3 for k, v in g.init_params(0).items()}
    init = {"h": np.random.default_rng(2).normal(size=(2, 3))} if given else None
    run_every_path(g, params, _feeds(g, T=4, B=2), combine="mean", init_states=init)


def test_mean_over_copies_of_a_learned_initial_vector_another_stage_reads():
    """Two recurrent cores run as two stages; h.init fills h's initial slot and is added in the
    other core's stage. Each stage divided its share by its own copies, not the whole graph's:
    combine="mean" gave h.init half (or twice) its gradient (hypothesis found it at T = B = 1)."""
    g = Graph("init_read_by_another_stage")
    x, h, s = g.input("x", 2), g.state("h", 2, init="learned"), g.state("s", 2)
    g.tanh(g.matmul(g.param("W", (2, 4)), g.concat(x, h.prev)), name="h")
    g.tanh(g.add(g.matmul(g.param("U", (2, 2)), s.prev), g.params["h.init"]), name="s")
    y = g.output(g.matmul(g.param("V", (2, 4)), g.concat(h, s), name="y"))
    g.loss("cross_entropy", y, g.index_input("t", 2))
    params = {k: v + 0.3 for k, v in g.init_params(0).items()}
    for T, B in ((1, 1), (4, 2)):
        assert "stages" in run_every_path(g, params, _feeds(g, T=T, B=B), combine="mean", require={"stages"})


def test_a_core_the_numba_loop_cannot_run_takes_every_other_path():
    """softmax inside a recurrent core: the Numba loop has no rule for it, so the configurations that
    insist on it (jit=True) raise, as they should, and are not run; the rest agree with the reference
    (hypothesis found the helper running them anyway)."""
    g = Graph("softmax_in_core")
    x, h = g.input("x", 2), g.state("h", 2)
    p = g.softmax(h.prev, name="p")
    g.tanh(g.linear(g.param("W", (2, 4)), g.concat(x, p), g.param("b", (2,), init="normal:0.1")), name="h")
    y = g.output(g.matmul(g.param("V", (3, 2)), h, name="y"))
    g.loss("cross_entropy", y, g.index_input("t", 3))
    taken = run_every_path(g, g.init_params(0), _feeds(g, T=3, B=2))
    assert "numba_loop" not in taken and "numpy_loop" in taken


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_unit_passes_no_gradient(act, dtype):
    """h = act(W·[x; h_prev]) at W·x = 20, y = 1000 h, MSE against 0: the true dL/dW is ~1e-11 of
    dL/dV (0 in float32, where act(20) is 1). A fast tanh that stopped short of 1 leaked 0.95 here."""
    g = Graph("saturated")
    x, h = g.input("x", 1), g.state("h", 1)
    pre = g.add(g.matmul(g.param("W", (1, 2)), g.concat(x, h.prev)), g.param("b", (1,)))  # fused with act
    g.apply(act, pre, name="h")
    y = g.output(g.matmul(g.param("V", (1, 1)), h, name="y"))
    g.loss("mse", y, g.input("goal", 1))
    params = {"W": np.array([[20, 0]], dtype), "b": np.zeros(1, dtype), "V": np.array([[1000]], dtype)}
    inputs = {"x": np.ones((2, 2, 1), dtype), "goal": np.zeros((2, 2, 1), dtype)}
    # 1e-5 of the largest gradient (dL/dV): the leak was 4.8e-4 of it
    run_every_path(g, params, inputs, tol=1e-5, require={"fused"})


def _softplus_exp() -> Graph:
    """softplus and exp before the loop (u), in the recurrent core (z, m: each the only elementwise
    op between products, so a fused kernel of its own) and after it (y)."""
    g = Graph("softplus_exp")
    x, h = g.input("x", 2), g.state("h", 3)
    u = g.softplus(g.matmul(g.param("U", (2, 2)), x), name="u")
    z = g.exp(g.scale(h.prev, -0.5), name="z")
    m = g.softplus(g.linear(g.param("W", (4, 5)), g.concat(u, z), g.param("b", (4,), init="normal:0.5")), name="m")
    h = g.tanh(g.matmul(g.param("W2", (3, 4)), m), name="h")
    y = g.output(g.exp(g.scale(g.matmul(g.param("V", (2, 3)), h), 0.5), name="y"))
    g.loss("mse", y, g.input("target", 2))
    return g


def test_softplus_and_exp_run_on_every_path():
    """Ops added by one table entry each (ops.py) run on every compiled path, held to the reference."""
    g = _softplus_exp()
    taken = run_every_path(g, g.init_params(3), _feeds(g, T=4, B=3), require=set(STRATEGIES) - {"stages"})
    assert set(STRATEGIES) - {"stages"} <= taken
