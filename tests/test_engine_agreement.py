"""The compiled engine against the reference engine on random valid cyclic graphs.

Hypothesis draws a graph: a few states, delays of depth 1-3, random ops and
sizes, parameters mixed in (some read by several ops, learned initial
vectors among them), states defined by slices or splits of wider vertices,
gate slices read through delays, outputs and masked losses; then random T,
B and data. Both engines must return the same loss, every gradient, the
initial-state and input gradients, the outputs and the final states: 1e-10
relative in float64, 1e-4 in float32. On saturated graphs the compiled
engine in float32, fused kernels included, is held to the reference in
float64 (FLOAT32_SATURATED_TOL of the largest gradient).

UNROLLED_EXAMPLES sets every test's example count (the defaults keep CI
fast); UNROLLED_EXAMPLES_F32 the saturated float32 test's alone, whose
every example compiles fused kernels. A long run, not for CI:
``UNROLLED_EXAMPLES=2000 UNROLLED_EXAMPLES_F32=300 pytest tests/test_engine_agreement.py``.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
from helpers import _GRADIENTS, _largest, assert_agree, make_inputs, run_every_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unrolled.engines.compiled.engine import CompiledEngine
from unrolled.engines.reference import run as reference_run
from unrolled.graph.folded import Graph


def _examples(default: int, name: str = "UNROLLED_EXAMPLES") -> int:
    return int(os.environ.get(name, default))


UNARY = ["tanh", "sigmoid", "relu", "identity", "one_minus", "scale", "softmax", "log_softmax"]
BINARY = ["add", "sub", "mul"]


@st.composite
def cyclic_graphs(draw, saturate: bool = False):
    """A random graph that validation accepts, with at least one cycle through a delay.

    Besides random ops it draws the shapes that once broke a compiled path:
    states defined by a slice (or a split) of a wider vertex, gate slices
    read through a delay, learned initial vectors that ops also read, and
    parameters read by several ops. With ``saturate`` every state is a tanh
    or sigmoid of a pre-activation pushed beyond +-20 by a large bias (see
    :func:`_data`) and the readout is steep, so that a gradient leaking
    through a saturated unit is large against the true ones."""
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
    gates = []  # slices of a wider vertex next to a state (read through a delay below)
    for k, s in enumerate(states):
        parts = _define_state(draw, g, pool, k, s, saturate)
        # a gate's previous value, read by the states defined after it: a delayed slice inside the loop
        pool += [gate.delay(draw(st.integers(1, 2))) for gate in parts if draw(st.booleans())]
        gates += parts
    # read out: a post-loop vertex, an output and a masked loss
    top = draw(st.sampled_from(states))
    V = g.param("V", (3, top.size), init="normal:200" if saturate else "normal:0.5")
    y = g.matmul(V, top, name="y")
    g.output(y)
    g.output(draw(st.sampled_from(pool[1:])))
    for i, gate in enumerate(gates):  # a gate's previous value, read after the loop
        if draw(st.booleans()):
            g.output(g.tanh(gate.delay(draw(st.integers(1, 2))), name=f"late{i}"))
    g.loss("cross_entropy", y, g.index_input("target", 3), reduce=draw(st.sampled_from(["mean", "sum"])))
    if draw(st.booleans()):
        g.loss("mse", g.tanh(y, name="ty"), g.input("goal", 3), reduce="sum")
    return g


def _define_state(draw, g, pool, k, s, saturate):
    """Define state ``s`` from the pool: ``act(W · src)``, or a slice of a wider ``act(W · src)``
    (or one part of a split of it). Returns the other parts of a split: gates to read through a delay."""
    extra = draw(st.integers(0, 3))  # how much wider than the state its pre-activation is
    width = s.size + extra
    src = draw(st.sampled_from(pool[1:]))
    if draw(st.booleans()):
        cat = g.concat(src, draw(st.sampled_from(pool)), name=f"cat{k}")
        W = _weight(draw, g, f"Wc{k}", (width, cat.size))
        pre = g.linear(W, cat, g.param(f"bs{k}", (width,), init="normal:0.1"), name=f"lin{k}")
    else:
        pre = g.matmul(_weight(draw, g, f"Ws{k}", (width, src.size)), src, name=f"mm{k}")
    if s.init == "learned" and extra == 0 and draw(st.booleans()):  # the initial vector, also read by an op
        pre = g.add(pre, g.params[g.init_param_name(s.name)], name=f"ini{k}")
    if saturate:  # |pre-activation| >= 20 for most units: see _data
        pre = g.add(pre, g.param(f"sat{k}", (width,)), name=f"far{k}")
    acts = ["tanh", "sigmoid"] if saturate else ["tanh", "sigmoid", "identity"]
    act = draw(st.sampled_from(acts))
    if extra == 0:
        g.apply(act, pre, name=s.name)
        return []
    wide = g.apply(act, pre, name=f"wide{k}")
    lo = draw(st.integers(0, extra))
    if draw(st.booleans()):
        g.slice(wide, lo, lo + s.size, name=s.name)
        return []
    sizes = [n for n in (lo, s.size, extra - lo) if n]
    names = [s.name if i == (1 if lo else 0) else f"gate{k}_{i}" for i in range(len(sizes))]
    parts = g.split(wide, sizes, names=names)
    return [p for p in parts if p.name != s.name]


def _weight(draw, g, name, shape):
    """A new weight, or (sometimes) one of that shape the graph already has: a parameter read by several ops."""
    same = sorted(k for k, p in g.params.items() if p.shape == shape)
    if same and draw(st.booleans()):
        return g.params[draw(st.sampled_from(same))]
    return g.param(name, shape, init="normal:0.5")


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
        return g.matmul(_weight(draw, g, f"W{name}", (draw(st.integers(1, 4)), a.size)), a, name=name)
    if kind == "slice":
        if a.size < 2:
            return g.identity(a, name=name)
        start = draw(st.integers(0, a.size - 2))
        return g.slice(a, start, draw(st.integers(start + 1, a.size)), name=name)
    if kind == "concat":
        return g.concat(a, draw(st.sampled_from(pool)), name=name)
    # a vector parameter: a new one, or one an op already reads, or a learned initial state
    b = _weight(draw, g, f"b{name}", (a.size,))
    return g.apply(draw(st.sampled_from(["add", "mul"])), a, b, name=name)


def _data(g: Graph, T: int, B: int, seed: int, dtype):
    rng = np.random.default_rng(seed)
    params = {k: v + rng.normal(0, 0.3, v.shape).astype(dtype) for k, v in g.init_params(rng, dtype).items()}
    for k in params:
        if k.startswith("sat"):  # the saturating biases of cyclic_graphs(saturate=True): +-25
            params[k] = (25 * np.sign(rng.normal(size=params[k].shape))).astype(dtype)
    inputs = make_inputs(g, T, B, rng, dtype)
    masks = {l.name: (rng.random((T, B)) < 0.8).astype(dtype) for l in g.losses}
    init = {}
    for name, D in g.delayed().items():
        if rng.random() < 0.5:
            size = g.vertices[name].size
            init[name] = rng.normal(size=(B, size) if D == 1 else (D, B, size)).astype(dtype)
    return params, inputs, masks, init


# the loops run in chunks of steps (None: sized by memory, which at these sizes is one chunk)
CHUNKS = st.one_of(st.none(), st.integers(1, 4))


@settings(max_examples=_examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=cyclic_graphs(), T=st.integers(1, 6), B=st.integers(1, 3), seed=st.integers(0, 2**16),
       combine=st.sampled_from(["sum", "mean"]), chunk=CHUNKS)
def test_compiled_agrees_with_reference_float64(g, T, B, seed, combine, chunk):
    params, inputs, masks, init = _data(g, T, B, seed, np.float64)
    r1 = reference_run(g, params, inputs, masks=masks, init_states=init, combine=combine)
    r2 = CompiledEngine(g, chunk_steps=chunk).run(params, inputs, masks=masks, init_states=init, combine=combine)
    assert_agree(r1, r2, 1e-10)


@settings(max_examples=_examples(4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=cyclic_graphs(), T=st.integers(1, 5), B=st.integers(2, 3), seed=st.integers(0, 2**16),
       combine=st.sampled_from(["sum", "mean"]))
def test_every_strategy_agrees_with_reference_float64(g, T, B, seed, combine):
    """Every configuration of helpers.PATHS (the whole-run function, the Numba and NumPy loops, in
    chunks, with fused kernels, rows split, weights read transposed) on each random graph: each
    compiles its own code, so the default count is small; ``UNROLLED_EXAMPLES`` raises it like
    the others'."""
    params, inputs, masks, init = _data(g, T, B, seed, np.float64)
    run_every_path(g, params, inputs, masks=masks, init_states=init, combine=combine)


@settings(max_examples=_examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=cyclic_graphs(), T=st.integers(1, 5), B=st.integers(1, 3), seed=st.integers(0, 2**16), chunk=CHUNKS)
def test_compiled_agrees_with_reference_float32(g, T, B, seed, chunk):
    params, inputs, masks, init = _data(g, T, B, seed, np.float32)
    r1 = reference_run(g, params, inputs, masks=masks, init_states=init)
    r2 = CompiledEngine(g, chunk_steps=chunk).run(params, inputs, masks=masks, init_states=init)
    assert_agree(r1, r2, 1e-4)


# compiled float32 against reference float64, relative to the largest gradient (see test below)
FLOAT32_SATURATED_TOL = 1e-4
# below this, a largest gradient is judged against it: float32 holds a probability near 1 to
# 6e-8, so a confident prediction's cross-entropy gradient p - 1 (1.2e-7, or e^-178 in float64)
# comes out as 1.19e-7 (or 0, or e^-87, the float32 exp's floor): rounding, not a leak
FLOAT32_FLOOR = 1e-3


@settings(max_examples=_examples(10, "UNROLLED_EXAMPLES_F32"), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(g=cyclic_graphs(saturate=True), T=st.integers(1, 4), B=st.integers(1, 3), seed=st.integers(0, 2**16),
       combine=st.sampled_from(["sum", "mean"]), chunk=CHUNKS)
def test_float32_saturated_agrees_with_float64(g, T, B, seed, combine, chunk):
    """Saturated units pass (almost) no gradient in float32 either, on the fused Numba kernels too:
    the compiled engine in float32 against the reference in float64, every gradient within
    FLOAT32_SATURATED_TOL of the largest one (or of FLOAT32_FLOOR, if larger)."""
    params, inputs, masks, init = _data(g, T, B, seed, np.float64)
    exact = reference_run(g, params, inputs, masks=masks, init_states=init, combine=combine)
    single = {name: {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in d.items()}
              for name, d in (("params", params), ("inputs", inputs), ("masks", masks), ("init", init))}
    with mock.patch.dict(os.environ, {"UNROLLED_JIT": "1"}):  # fused kernels, not the whole Numba loop
        r32 = CompiledEngine(g, jit="fuse", chunk_steps=chunk).run(single["params"], single["inputs"], masks=single["masks"],
                                                       init_states=single["init"], combine=combine)
    largest = max(_largest(exact, _GRADIENTS), FLOAT32_FLOOR)
    for field in _GRADIENTS:
        for k, want in getattr(exact, field).items():
            got = getattr(r32, field)[k]
            assert np.abs(got - want).max(initial=0) <= FLOAT32_SATURATED_TOL * largest, (
                field, k, np.abs(got - want).max() / largest)


@settings(max_examples=_examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
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


@pytest.mark.parametrize("jit", [False, True])
def test_a_run_leaves_the_callers_parameters_as_they_were(jit):
    """A one-unit cell fed by tokens, its weight on a cache line: the engine's copy of the weight's
    token columns, to which it adds the bias, is a copy even though those columns are laid out as
    the copy would be (weights.derive, blas.aligned_copy)."""
    from unrolled.engines.compiled.kernels.blas import aligned
    from unrolled.models import cells

    g = Graph("one-unit")
    h = cells.elman(g, g.one_hot(g.index_input("tokens", 5), name="x"), 1)
    y = g.output(g.linear(g.param("V", (3, 1)), h, g.param("c", (3,)), name="y"))
    g.loss("cross_entropy", y, g.index_input("t", 3))
    rng = np.random.default_rng(0)
    params = {k: aligned(v) for k, v in g.init_params(rng).items()}
    params["b"][:] = 0.5
    before = {k: v.copy() for k, v in params.items()}
    inputs = {"tokens": rng.integers(0, 5, (4, 2)), "t": rng.integers(0, 3, (4, 2))}
    engine = CompiledEngine(g, jit=jit)
    for _ in range(2):
        assert_agree(reference_run(g, params, inputs), engine.run(params, inputs), 1e-10)
    for k, v in params.items():
        assert np.array_equal(v, before[k]), f"the run changed parameter {k}"


def test_code_is_readable_and_per_copy_is_refused():
    from unrolled.models.small_networks import small_network

    eng = CompiledEngine(small_network("lstm"))
    assert "def forward_loop" in eng.code and "def backward_loop" in eng.code
    assert "# c = add(fc, ig)" in eng.code
    with pytest.raises(ValueError, match="reference"):
        eng.run(small_network("lstm").init_params(0), {}, per_copy=True)
