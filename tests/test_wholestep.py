"""The whole-run function (one Numba call per run, for small runs) agrees with the reference engine.

Random valid cyclic graphs from the agreement tests, restricted to the ops
the whole run supports (it refuses the others: the compiled engine then runs
its phases), with masks, given and learned initial states, both combine
rules, outside gradient seeds, float64 to 1e-10 and float32 to 1e-4.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from helpers import GRAPHS, make_init_states, make_inputs, perturbed_params  # noqa: E402
from test_engine_agreement import _data, assert_agree, cyclic_graphs  # noqa: E402

from unrolled.engines.compiled import wholestep  # noqa: E402
from unrolled.engines.compiled.engine import CompiledEngine  # noqa: E402
from unrolled.engines.reference import run as reference_run  # noqa: E402
from unrolled.graph.folded import Graph  # noqa: E402


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_hand_written_graphs_agree(name, dtype, tol):
    g = GRAPHS[name]()
    rng = np.random.default_rng(11)
    T, B = 5, 3
    params = perturbed_params(g, rng, dtype)
    inputs = make_inputs(g, T, B, rng, dtype)
    init = make_init_states(g, B, rng, dtype=dtype)
    masks = {l.name: (rng.random((T, B)) < 0.8).astype(dtype) for l in g.losses}
    eng = CompiledEngine(g, whole=True)
    assert eng.uses_whole(B) and "def whole_run" in eng.whole.code
    for _ in range(2):  # the second run reuses the arrays the first one kept
        assert_agree(reference_run(g, params, inputs, init_states=init, masks=masks),
                     eng.run(params, inputs, init_states=init, masks=masks), tol)


# each graph is a new function for Numba to compile (seconds each): fewer examples than elsewhere
@settings(max_examples=int(os.environ.get("UNROLLED_EXAMPLES", 10)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(g=cyclic_graphs(), T=st.integers(1, 6), B=st.integers(1, 3), seed=st.integers(0, 2**16),
       combine=st.sampled_from(["sum", "mean"]), dtype=st.sampled_from([np.float64, np.float32]))
def test_random_graphs_agree(g, T, B, seed, combine, dtype):
    assume(wholestep.supports(g))
    params, inputs, masks, init = _data(g, T, B, seed, dtype)
    expected = reference_run(g, params, inputs, masks=masks, init_states=init, combine=combine)
    got = CompiledEngine(g, whole=True).run(params, inputs, masks=masks, init_states=init, combine=combine)
    assert_agree(expected, got, 1e-10 if dtype == np.float64 else 1e-4)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(g=cyclic_graphs(), T=st.integers(2, 5), B=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_outside_gradients_agree(g, T, B, seed):
    assume(wholestep.supports(g))
    params, inputs, masks, init = _data(g, T, B, seed, np.float64)
    rng = np.random.default_rng(seed + 1)
    eng = CompiledEngine(g, whole=True)
    probe = eng.run(params, inputs, masks=masks, init_states=init, backward=False)
    fsg = {k: rng.normal(size=v.shape) for k, v in probe.final_states.items()}
    og = {k: rng.normal(size=v.shape) for k, v in probe.outputs.items()}
    kw = dict(masks=masks, init_states=init, final_state_grads=fsg, output_grads=og)
    assert_agree(reference_run(g, params, inputs, **kw), eng.run(params, inputs, **kw), 1e-10)


def test_results_are_copies_of_the_kept_arrays():
    """Runs of one shape share their arrays, so a result must not change when the next run
    overwrites them; runs of other shapes in between (and beyond the kept few) change nothing."""
    g = GRAPHS["one_hot"]()
    rng = np.random.default_rng(3)
    params = perturbed_params(g, rng, np.float64)
    eng = CompiledEngine(g, whole=True)
    data = [make_inputs(g, T, 2, rng) for T in (4, 4, 3, 5, 6, 7, 4)]
    results = [eng.run(params, inputs) for inputs in data]
    for inputs, got in zip(data, results):
        assert_agree(reference_run(g, params, inputs), got, 1e-10)
    assert len(eng.whole._workspaces) == wholestep.KEEP_WORKSPACES


def test_a_concatenation_read_by_more_than_a_product():
    """A product reads a concatenation's parts itself (a one-hot part as a column pick); when
    something else reads the concatenation too, it is still built and its gradient still flows."""
    g = Graph("shared-concat")
    tokens = g.index_input("tok", 4)
    h = g.state("h", 3)
    xh = g.concat(g.one_hot(tokens, name="x1h"), h.prev, name="xh")
    W, b = g.param("W", (3, 7)), g.param("b", (3,))
    g.tanh(g.linear(W, xh, b, name="a"), name="h")
    V = g.param("V", (2, 7))
    y = g.matmul(g.param("Wy", (2, 3)), h, name="y0")
    y = g.add(y, g.matmul(V, xh, name="skip"), name="y")  # xh read by a second product...
    g.output(g.scale(xh, 0.5, name="half"))  # ...and by an elementwise op, an output
    g.loss("mse", y, g.input("target", 2), name="loss")
    rng = np.random.default_rng(5)
    params = perturbed_params(g, rng, np.float64)
    inputs = make_inputs(g, 5, 2, rng)
    eng = CompiledEngine(g, whole=True)
    assert "add_column" in eng.whole.code and "copy_row(V_" in eng.whole.code
    assert_agree(reference_run(g, params, inputs), eng.run(params, inputs), 1e-10)


def test_an_input_as_an_output():
    """A dense input is passed straight in, not kept: as an output it is still copied out, and a
    gradient given for it reaches its input gradient."""
    g = Graph("in-out")
    x, h = g.input("x", 3), g.state("h", 3)
    g.tanh(g.add(x, h.prev), name="h")
    g.output(x)
    g.output(h)
    g.loss("mse", h, g.input("t", 3), name="loss")
    rng = np.random.default_rng(0)
    params = g.init_params(0)
    inputs = make_inputs(g, 4, 2, rng)
    og = {"x": rng.normal(size=(4, 2, 3)), "h": rng.normal(size=(4, 2, 3))}
    got = CompiledEngine(g, whole=True).run(params, inputs, output_grads=og)
    assert_agree(reference_run(g, params, inputs, output_grads=og), got, 1e-10)
    assert got.outputs["x"] is not inputs["x"]


def test_default_engine_takes_it_for_small_runs_only(monkeypatch):
    monkeypatch.setenv("UNROLLED_JIT", "1")
    eng = CompiledEngine(GRAPHS["lstm"]())
    assert eng.uses_whole(1) and not eng.uses_whole(10_000)
    assert CompiledEngine(GRAPHS["lstm"](), jit=False).whole is None


def _char_model(cell: str, hidden: int, layers: int) -> Graph:
    from unrolled.charlm.model import ModelConfig, build_graph

    return build_graph(ModelConfig(cell=cell, hidden=hidden, layers=layers, vocab_size=75))


def test_it_is_taken_only_where_its_loops_beat_blas(monkeypatch):
    """Rows x a step's multiply-adds <= 2^18: min-char-rnn (Elman 100, 75 characters) up to 10 rows;
    the 2 x 128 LSTM model at one row only (at 4 rows its loops are faster than the whole run)."""
    monkeypatch.setenv("UNROLLED_JIT", "1")
    minchar = CompiledEngine(_char_model("elman", 100, 1))
    assert [B for B in range(1, 17) if minchar.uses_whole(B)] == list(range(1, 11))
    lstm = CompiledEngine(_char_model("lstm", 128, 2))
    assert [B for B in range(1, 17) if lstm.uses_whole(B)] == [1]


def test_unsupported_ops_are_refused_when_insisted_on():
    g = Graph("softmax-core")
    x = g.input("x", 2)
    h = g.state("h", 2)
    g.softmax(g.add(x, h.prev), name="h")
    g.output(h)
    assert not wholestep.supports(g)
    assert CompiledEngine(g).whole is None
    with pytest.raises(ValueError, match="softmax"):
        CompiledEngine(g, whole=True)
