"""Truncated BPTT(k2; k1): chunked BPTT, cut gradients against PyTorch and finite differences, exact resume.

The oracle for ``k1 < k2`` is the definition itself, written out three ways:
PyTorch running the whole stream with ``h.detach()`` at each window's start
(the unrolled graph cut at the truncation point), the engine re-run by hand
over the window with a mask, and central finite differences of the window's
loss with the carried state held fixed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import numeric_grad, relative_error

from unrolled.engines.registry import available_engines, make_engine
from unrolled.graph.folded import Graph
from unrolled.models import cells
from unrolled.train.tbptt import TruncatedBPTT, split_stream

ENGINES = available_engines()
N_IN, H, N_OUT = 3, 4, 3


def elman_graph(reduce: str = "mean") -> Graph:
    """h = tanh(W·[x; h_prev] + b); y = V·h + c; cross-entropy on y."""
    g = Graph("elman")
    h = cells.elman(g, g.input("x", N_IN), H)
    V, c = g.param("V", (N_OUT, H)), g.param("c", (N_OUT,), init="normal:0.1")
    y = g.output(g.linear(V, h, c, name="y"))
    g.loss("cross_entropy", y, g.index_input("target", N_OUT), name="xent", reduce=reduce)
    return g


def delay2_graph() -> Graph:
    """h = tanh(W·[x; h_{t-1}; h_{t-2}] + b): a state with two steps of history."""
    g = Graph("delay2")
    x = g.input("x", N_IN)
    h = g.state("h", H)
    W, b = g.param("W", (H, N_IN + 2 * H)), g.param("b", (H,), init="normal:0.1")
    g.tanh(g.linear(W, g.concat(x, h.prev, h.delay(2), name="xh"), b, name="a"), name="h")
    V = g.param("V", (N_OUT, H))
    y = g.output(g.matmul(V, h, name="y"))
    g.loss("cross_entropy", y, g.index_input("target", N_OUT), name="xent", reduce="sum")
    return g


_ENGINES: dict = {}


def engine_for(builder, engine: str = "reference", *args):
    """One engine per graph kind and engine name for the whole module (the compiled engine compiles once)."""
    key = (builder.__name__, engine, args)
    if key not in _ENGINES:
        _ENGINES[key] = make_engine(builder(*args), engine)
    return _ENGINES[key]


def stream(g: Graph, N: int, B: int, rng) -> dict[str, np.ndarray]:
    return {"x": rng.normal(size=(N, B, N_IN)), "target": rng.integers(0, N_OUT, (N, B))}


def params_of(g: Graph, rng) -> dict[str, np.ndarray]:
    return {k: v + rng.normal(0, 0.3, v.shape) for k, v in g.init_params(rng).items()}


def torch_truncated(params, inputs, k1: int, k2: int, reduce: str):
    """PyTorch oracle: the Elman net over the whole stream, the state detached at each window's start."""
    W, b, V, c = (torch.tensor(params[k], requires_grad=True) for k in ("W", "b", "V", "c"))
    x = torch.tensor(inputs["x"])
    target = torch.tensor(inputs["target"])
    N, B = target.shape
    updates = []
    for end in range(k1, N + 1, k1):
        start, w = end - k1, max(0, end - k2)
        h = torch.zeros(B, H, dtype=torch.float64)
        losses = []
        for t in range(end):
            if t == w:
                h = h.detach()  # the cut: no gradient flows into the carried state
            h = torch.tanh(torch.cat([x[t], h], dim=1) @ W.T + b)
            if t >= start:
                y = h @ V.T + c
                losses.append(torch.nn.functional.cross_entropy(y, target[t], reduction="sum"))
        loss = sum(losses) / (k1 * B if reduce == "mean" else 1)
        gW, gb, gV, gc = torch.autograd.grad(loss, (W, b, V, c))
        updates.append((float(loss.detach()), {"W": gW.numpy(), "b": gb.numpy(), "V": gV.numpy(), "c": gc.numpy()},
                        h.detach().numpy()))
    return updates


# ------------------------------------------------------------------------------------- k1 == k2


@pytest.mark.parametrize("engine", ENGINES)
def test_k1_equal_k2_is_chunked_stateful_bptt(engine, rng):
    eng = engine_for(elman_graph, engine, "mean")
    g = eng.graph
    params = params_of(g, rng)
    inputs = stream(g, 12, 3, rng)
    tb = TruncatedBPTT(eng, 4, 4)
    state = None
    for chunk in split_stream(inputs, 4):
        got = tb.step(params, chunk)
        want = eng.run(params, chunk, **({"init_states": state} if state else {}))
        state = want.final_states
        assert got.loss == pytest.approx(want.loss, rel=1e-13)
        for k in params:
            np.testing.assert_allclose(got.grads[k], want.grads[k], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got.final_states["h"], want.final_states["h"], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(got.step_losses["xent"], want.step_losses["xent"], rtol=1e-13)
        np.testing.assert_allclose(got.outputs["y"], want.outputs["y"], rtol=1e-13, atol=1e-15)
        assert got.init_grads == {}  # the carried state takes no gradient
        np.testing.assert_array_equal(tb.carried_state["h"], got.final_states["h"])


# -------------------------------------------------------------------------------------- k1 < k2


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k1, k2", [(2, 5), (3, 4), (1, 3), (4, 4), (3, 9)])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_each_update_matches_pytorch_with_the_graph_cut(engine, k1, k2, reduce, rng):
    eng = engine_for(elman_graph, engine, reduce)
    g = eng.graph
    params = params_of(g, rng)
    N, B = 4 * k1 + k1 * (k2 // k1), 2
    inputs = stream(g, N, B, rng)
    tb = TruncatedBPTT(eng, k1, k2)
    oracle = torch_truncated(params, inputs, k1, k2, reduce)
    got = [tb.step(params, chunk) for chunk in split_stream(inputs, k1)]
    assert len(got) == len(oracle)
    for r, (loss, grads, h) in zip(got, oracle):
        assert r.loss == pytest.approx(loss, rel=1e-12)
        for k in params:
            assert relative_error(r.grads[k], grads[k]) < 1e-12, k
        np.testing.assert_allclose(r.final_states["h"], h, rtol=1e-12, atol=1e-14)
        assert r.step_losses["xent"].shape == (k1, B)  # the new steps only


def test_update_gradient_equals_engine_over_window_with_mask_and_finite_differences(rng):
    """Update 3 of BPTT(5; 2): the window is steps 1..5, the loss on steps 4..5, the state at step 1 fixed."""
    g = elman_graph("sum")
    eng = make_engine(g, "reference")
    params = params_of(g, rng)
    inputs = stream(g, 6, 2, rng)
    tb = TruncatedBPTT(eng, 2, 5)
    results = [tb.step(params, chunk) for chunk in split_stream(inputs, 2)]
    w, start, end = 1, 4, 6
    h_w = eng.run(params, {k: a[:w] for k, a in inputs.items()}, backward=False).final_states
    window = {k: a[w:end] for k, a in inputs.items()}
    mask = np.zeros((end - w, 2))
    mask[start - w :] = 1.0
    by_hand = eng.run(params, window, init_states=h_w, masks={"xent": mask})
    for k in params:
        np.testing.assert_allclose(results[-1].grads[k], by_hand.grads[k], rtol=1e-13, atol=1e-15)

    def window_loss():
        return eng.run(params, window, init_states=h_w, masks={"xent": mask}, backward=False).loss

    for k in params:
        assert relative_error(numeric_grad(window_loss, params[k]), results[-1].grads[k]) < 1e-7, k


@pytest.mark.parametrize("graph", [elman_graph, delay2_graph], ids=["elman", "delay2"])
@pytest.mark.parametrize("k1, k2", [(3, 12), (4, 12), (2, 30), (12, 12)])
def test_k2_covering_the_stream_is_full_bptt(graph, k1, k2, rng):
    """With k2 >= N every window reaches step 0, so the updates' gradients add up to full BPTT's."""
    g = graph() if graph is delay2_graph else graph("sum")
    eng = make_engine(g, "reference")
    params = params_of(g, rng)
    inputs = stream(g, 12, 3, rng)
    full = eng.run(params, inputs)
    tb = TruncatedBPTT(eng, k1, k2)
    total = {k: np.zeros_like(v) for k, v in params.items()}
    loss = 0.0
    for chunk in split_stream(inputs, k1):
        r = tb.step(params, chunk)
        loss += r.loss
        for k in total:
            total[k] += r.grads[k]
    assert loss == pytest.approx(full.loss, rel=1e-12)
    for k in params:
        np.testing.assert_allclose(total[k], full.grads[k], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(r.final_states["h"], full.final_states["h"], rtol=1e-12, atol=1e-14)


def test_delay2_state_carries_its_history_across_chunks(rng):
    g = delay2_graph()
    eng = make_engine(g, "reference")
    params = params_of(g, rng)
    inputs = stream(g, 9, 2, rng)
    tb = TruncatedBPTT(eng, 3, 5)
    for chunk in split_stream(inputs, 3):
        r = tb.step(params, chunk)
    full = eng.run(params, inputs, backward=False)
    assert r.final_states["h"].shape == (2, 2, H)  # [D, B, F]
    np.testing.assert_allclose(r.final_states["h"], full.final_states["h"], rtol=1e-12, atol=1e-14)


def test_state_is_carried_with_the_parameters_of_each_update(rng):
    """Parameters change between updates: the carried state is what the updates' own runs computed."""
    g = elman_graph()
    eng = make_engine(g, "reference")
    params = params_of(g, rng)
    inputs = stream(g, 8, 2, rng)
    tb = TruncatedBPTT(eng, 2, 4)
    chunks = list(split_stream(inputs, 2))
    state, seen = None, []
    for n, chunk in enumerate(chunks):
        seen.append(dict(params))
        r = tb.step(params, chunk)
        if n >= 1:  # after update n the window start is step 2(n-1)+... : advance by hand with update n's params
            drop = {k: chunks[n - 1][k] for k in chunk}
            state = eng.run(seen[n], drop, backward=False, **({"init_states": state} if state else {})).final_states
            np.testing.assert_allclose(tb.carried_state["h"], state["h"], rtol=1e-13, atol=1e-15)
        params = {k: v - 0.1 * r.grads[k] for k, v in params.items()}


def test_masks_and_mean_count_the_new_steps_only(rng):
    g = elman_graph("mean")
    eng = make_engine(g, "reference")
    params = params_of(g, rng)
    inputs = stream(g, 6, 3, rng)
    tb = TruncatedBPTT(eng, 3, 6)
    tb.step(params, {k: a[:3] for k, a in inputs.items()})
    mask = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=float)
    r = tb.step(params, {k: a[3:] for k, a in inputs.items()}, masks={"xent": mask})
    full = eng.run(params, inputs, backward=False)
    np.testing.assert_allclose(r.step_losses["xent"], full.step_losses["xent"][3:] * mask, rtol=1e-13)
    assert r.loss == pytest.approx(r.step_losses["xent"].sum() / mask.sum(), rel=1e-13)


def test_a_shorter_last_chunk_is_accepted(rng):
    g = elman_graph("sum")
    eng = make_engine(g, "reference")
    params = params_of(g, rng)
    inputs = stream(g, 10, 2, rng)
    tb = TruncatedBPTT(eng, 4, 4)
    losses = [tb.step(params, c).loss for c in split_stream(inputs, 4)]
    assert len(losses) == 3
    assert sum(losses) == pytest.approx(eng.run(params, inputs, backward=False).loss, rel=1e-12)
    assert tb.steps_seen == 10 and tb.updates == 3


# ------------------------------------------------------------------------------------------ resume


def test_resume_from_saved_state_is_exact(rng):
    g = elman_graph()
    eng = make_engine(g, "reference")
    params = params_of(g, rng)
    chunks = list(split_stream(stream(g, 15, 2, rng), 3))
    a = TruncatedBPTT(eng, 3, 7)
    for c in chunks[:2]:
        a.step(params, c)
    arrays, meta = a.state_arrays(), json.loads(json.dumps(a.state_meta()))
    b = TruncatedBPTT(eng, 3, 7)
    b.load_state({k: v.copy() for k, v in arrays.items()}, meta)
    for c in chunks[2:]:
        ra, rb = a.step(params, c), b.step(params, c)
        assert ra.loss == rb.loss
        for k in params:
            np.testing.assert_array_equal(ra.grads[k], rb.grads[k])
    assert b.steps_seen == a.steps_seen == 15


def test_reset_forgets_the_stream(rng):
    g = elman_graph()
    eng = make_engine(g, "reference")
    params = params_of(g, rng)
    inputs = stream(g, 3, 2, rng)
    tb = TruncatedBPTT(eng, 3, 6)
    first = tb.step(params, inputs)
    tb.step(params, inputs)
    tb.reset()
    assert tb.carried_state is None and tb.state_arrays() == {}
    assert tb.step(params, inputs).loss == first.loss


# ------------------------------------------------------------------------------------------ errors


def test_mistakes_are_named(rng):
    g = elman_graph()
    eng = make_engine(g, "reference")
    params = params_of(g, rng)
    with pytest.raises(ValueError, match="k1=5 > k2=3"):
        TruncatedBPTT(eng, 5, 3)
    with pytest.raises(ValueError, match="k1=0"):
        TruncatedBPTT(eng, 0, 3)
    tb = TruncatedBPTT(eng, 2, 4)
    with pytest.raises(ValueError, match="1 to k1=2 new steps"):
        tb.step(params, stream(g, 3, 2, rng))
    with pytest.raises(ValueError, match="input 'target' was not given"):
        tb.step(params, {"x": rng.normal(size=(2, 2, N_IN))})
    tb.step(params, stream(g, 2, 2, rng))
    with pytest.raises(ValueError, match="call reset"):
        tb.step(params, stream(g, 2, 5, rng))
    with pytest.raises(ValueError, match="not a loss"):
        tb.step(params, stream(g, 2, 2, rng), masks={"nope": np.ones((2, 2))})
    given = elman_graph()
    given.set_init("h", "given")
    tg = TruncatedBPTT(make_engine(given, "reference"), 2, 4)
    with pytest.raises(ValueError, match="reset\\(init_states="):
        tg.step(params, stream(g, 2, 2, rng))
    tg.reset({"h": np.ones((2, H))})
    r = tg.step(params, stream(g, 2, 2, rng))
    assert r.final_states["h"].shape == (2, H)
    other = TruncatedBPTT(eng, 2, 5)
    with pytest.raises(ValueError, match="same k1 and k2"):
        other.load_state(tb.state_arrays(), tb.state_meta())
