"""The compiled engine against the reference engine on random valid cyclic graphs.

Hypothesis draws a graph: a few states, delays of depth 1-3, random ops and
sizes, parameters mixed in, outputs and masked losses; then random T, B and
data. Both engines must return the same loss, every gradient, the initial-
state and input gradients, the outputs and the final states: 1e-10 relative
in float64, 1e-4 in float32.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import make_inputs
from unrolled.compiled import CompiledEngine
from unrolled.graph import Graph
from unrolled.reference import run as reference_run

UNARY = ["tanh", "sigmoid", "relu", "identity", "one_minus", "scale", "softmax", "log_softmax"]
BINARY = ["add", "sub", "mul"]


@st.composite
def cyclic_graphs(draw):
    """A random graph that validation accepts, with at least one cycle through a delay."""
    g = Graph("random")
    n_states = draw(st.integers(1, 3))
    n_in = draw(st.integers(1, 4))
    x = g.input("x", n_in)
    pool = [x]
    if draw(st.booleans()):  # tokens: a product with one-hot rows is a row pick in the loop
        pool.append(g.one_hot(g.index_input("tok", draw(st.integers(1, 4))), name="tok1h"))
    states = []
    for k in range(n_states):
        size = draw(st.integers(1, 4))
        init = draw(st.sampled_from(["zeros", "learned", "zeros"]))
        s = g.state(f"s{k}", size, init=init)
        states.append(s)
    for s in states:  # every state reads some delays (its own and maybe others')
        depth = draw(st.integers(1, 3))
        pool.append(s.delay(depth))
        if draw(st.booleans()):
            other = draw(st.sampled_from(states))
            pool.append(other.delay(draw(st.integers(1, 3))))
    n_ops = draw(st.integers(2, 8))
    for i in range(n_ops):
        pool.append(_random_op(draw, g, pool, f"u{i}"))
    for k, s in enumerate(states):  # define each state as a product of the pool
        src = draw(st.sampled_from(pool[1:]))
        W = g.param(f"Ws{k}", (s.size, src.size), init="normal:0.5")
        extra = draw(st.sampled_from(pool))
        if draw(st.booleans()):
            cat = g.concat(src, extra, name=f"cat{k}")
            W = g.param(f"Wc{k}", (s.size, cat.size), init="normal:0.5")
            b = g.param(f"bs{k}", (s.size,), init="normal:0.1")
            pre = g.linear(W, cat, b, name=f"lin{k}")
        else:
            pre = g.matmul(W, src, name=f"mm{k}")
        g.apply(draw(st.sampled_from(["tanh", "sigmoid", "identity"])), pre, name=s.name)
    # read out: a post-loop vertex, an output and a masked loss
    top = draw(st.sampled_from(states))
    V = g.param("V", (3, top.size), init="normal:0.5")
    y = g.matmul(V, top, name="y")
    g.output(y)
    g.output(draw(st.sampled_from(pool[1:])))
    g.loss("cross_entropy", y, g.index_input("target", 3), reduce=draw(st.sampled_from(["mean", "sum"])))
    if draw(st.booleans()):
        g.loss("mse", g.tanh(y, name="ty"), g.input("goal", 3), reduce="sum")
    return g


def _random_op(draw, g, pool, name):
    kind = draw(st.sampled_from(["unary", "binary", "matmul", "slice", "concat", "param_add"]))
    a = draw(st.sampled_from(pool))
    if kind == "unary":
        op = draw(st.sampled_from(UNARY))
        if op == "scale":
            return g.scale(a, draw(st.sampled_from([0.5, -2.0])), name=name)
        return g.apply(op, a, name=name)
    if kind == "binary":
        same = [v for v in pool if v.size == a.size]
        return g.apply(draw(st.sampled_from(BINARY)), a, draw(st.sampled_from(same)), name=name)
    if kind == "matmul":
        W = g.param(f"W{name}", (draw(st.integers(1, 4)), a.size), init="normal:0.5")
        return g.matmul(W, a, name=name)
    if kind == "slice":
        if a.size < 2:
            return g.identity(a, name=name)
        start = draw(st.integers(0, a.size - 2))
        return g.slice(a, start, draw(st.integers(start + 1, a.size)), name=name)
    if kind == "concat":
        return g.concat(a, draw(st.sampled_from(pool)), name=name)
    b = g.param(f"b{name}", (a.size,), init="normal:0.5")
    return g.apply(draw(st.sampled_from(["add", "mul"])), a, b, name=name)


def _data(g: Graph, T: int, B: int, seed: int, dtype):
    rng = np.random.default_rng(seed)
    params = {k: v + rng.normal(0, 0.3, v.shape).astype(dtype) for k, v in g.init_params(rng, dtype).items()}
    inputs = make_inputs(g, T, B, rng, dtype)
    masks = {l.name: (rng.random((T, B)) < 0.8).astype(dtype) for l in g.losses}
    init = {}
    for name, D in g.delayed().items():
        if rng.random() < 0.5:
            size = g.vertices[name].size
            init[name] = rng.normal(size=(B, size) if D == 1 else (D, B, size)).astype(dtype)
    return params, inputs, masks, init


def _close(a, b, tol, scale=0.0):
    """Relative agreement; ``scale`` is the size of the whole family of arrays ``a`` belongs to,
    so that an entry whose exact value is 0 is judged against its siblings, not against itself."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(a).max(initial=0), np.abs(b).max(initial=0), scale, 1e-30)
    return np.abs(a - b).max(initial=0) <= tol * scale


_GRADIENTS = ("grads", "input_grads", "init_grads")


def _largest(result, fields) -> float:
    return max((np.abs(a).max(initial=0) for f in fields for a in getattr(result, f).values()), default=0.0)


def assert_agree(r1, r2, tol):
    """Every field of two runs agrees to ``tol``, each array relative to its family: gradients are
    judged against all gradients (a parameter's exactly-zero gradient may be a cancellation of
    terms the size of an input's gradient, and rounding leaves ~1e-17 of it), values against their field."""
    assert _close(r1.loss, r2.loss, tol), (r1.loss, r2.loss)
    gradients = _largest(r1, _GRADIENTS)
    for field in ("grads", "input_grads", "init_grads", "final_states", "outputs", "step_losses"):
        d1, d2 = getattr(r1, field), getattr(r2, field)
        assert set(d1) == set(d2), field
        family = gradients if field in _GRADIENTS else _largest(r1, (field,))
        for k in d1:
            assert d1[k].shape == d2[k].shape, (field, k)
            assert d1[k].dtype == d2[k].dtype, (field, k)
            assert _close(d1[k], d2[k], tol, family), (field, k, np.abs(d1[k] - d2[k]).max())


# the loops run in chunks of steps (None: sized by memory, which at these sizes is one chunk)
CHUNKS = st.one_of(st.none(), st.integers(1, 4))


@settings(max_examples=int(os.environ.get("UNROLLED_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=cyclic_graphs(), T=st.integers(1, 6), B=st.integers(1, 3), seed=st.integers(0, 2**16),
       combine=st.sampled_from(["sum", "mean"]), chunk=CHUNKS)
def test_compiled_agrees_with_reference_float64(g, T, B, seed, combine, chunk):
    params, inputs, masks, init = _data(g, T, B, seed, np.float64)
    r1 = reference_run(g, params, inputs, masks=masks, init_states=init, combine=combine)
    r2 = CompiledEngine(g, chunk_steps=chunk).run(params, inputs, masks=masks, init_states=init, combine=combine)
    assert_agree(r1, r2, 1e-10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=cyclic_graphs(), T=st.integers(1, 5), B=st.integers(1, 3), seed=st.integers(0, 2**16), chunk=CHUNKS)
def test_compiled_agrees_with_reference_float32(g, T, B, seed, chunk):
    params, inputs, masks, init = _data(g, T, B, seed, np.float32)
    r1 = reference_run(g, params, inputs, masks=masks, init_states=init)
    r2 = CompiledEngine(g, chunk_steps=chunk).run(params, inputs, masks=masks, init_states=init)
    assert_agree(r1, r2, 1e-4)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=cyclic_graphs(), T=st.integers(2, 5), B=st.integers(1, 3), seed=st.integers(0, 2**16), chunk=CHUNKS)
def test_outside_gradients_agree(g, T, B, seed, chunk):
    """final_state_grads and output_grads seeds (used to chain an encoder into a decoder)."""
    params, inputs, masks, init = _data(g, T, B, seed, np.float64)
    rng = np.random.default_rng(seed + 1)
    probe = CompiledEngine(g).run(params, inputs, masks=masks, init_states=init, backward=False)
    fsg = {k: rng.normal(size=v.shape) for k, v in probe.final_states.items()}
    og = {k: rng.normal(size=v.shape) for k, v in probe.outputs.items()}
    kw = dict(masks=masks, init_states=init, final_state_grads=fsg, output_grads=og)
    assert_agree(reference_run(g, params, inputs, **kw), CompiledEngine(g, chunk_steps=chunk).run(params, inputs, **kw),
                 1e-10)


def test_engine_reuses_buffers_across_runs():
    """A second run with other data must not see the first run's values (buffers are reused)."""
    g = Graph("elman")
    x = g.input("x", 3)
    h = g.state("h", 4)
    W = g.param("W", (4, 7))
    g.tanh(g.matmul(W, g.concat(x, h.prev)), name="h")
    y = g.output(g.matmul(g.param("V", (2, 4)), h, name="y"))
    g.loss("cross_entropy", y, g.index_input("t", 2))
    eng = CompiledEngine(g)
    rng = np.random.default_rng(0)
    params = g.init_params(rng)
    for _ in range(3):
        inputs = {"x": rng.normal(size=(5, 2, 3)), "t": rng.integers(0, 2, (5, 2))}
        assert_agree(reference_run(g, params, inputs), eng.run(params, inputs), 1e-10)


def test_code_is_readable_and_per_copy_is_refused():
    from unrolled.gradcheck import small_network

    eng = CompiledEngine(small_network("lstm"))
    assert "def forward_loop" in eng.code and "def backward_loop" in eng.code
    assert "# c = add(fc, ig)" in eng.code
    with pytest.raises(ValueError, match="reference"):
        eng.run(small_network("lstm").init_params(0), {}, per_copy=True)
