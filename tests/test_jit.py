"""The Numba loop of the compiled engine agrees with the reference engine.

The JIT path shares the generated loop text with the NumPy path (only the
kernels differ), so a fixed set of graphs covering every kernel is enough:
each compiles once (Numba caches it on disk) and is held to 1e-10 in float64
and 1e-4 in float32, where tanh and σ use a vectorizable approximation.
"""

from __future__ import annotations

import numpy as np
import pytest

from unrolled.compiled import CompiledEngine
from unrolled.gradcheck import small_network
from unrolled.graph import Graph
from unrolled.reference import run as reference_run

pytest.importorskip("numba")

from helpers import embedded, make_inputs, perturbed_params  # noqa: E402
from test_engine_agreement import assert_agree  # noqa: E402


def coupled_relu() -> Graph:
    """Two loops feeding each other, a delay of 2, relu, sub, scale, one_minus and a param operand."""
    g = Graph("coupled")
    x = g.input("x", 3)
    h1 = g.state("h1", 4)
    h2 = g.state("h2", 4)
    W1 = g.param("W1", (4, 7), init="normal:0.5")
    W2 = g.param("W2", (4, 8), init="normal:0.5")
    b = g.param("b", (4,), init="normal:0.5")
    a1 = g.linear(W1, g.concat(x, h2.prev), b, name="a1")
    g.relu(g.sub(a1, g.scale(h1.delay(2), 0.5)), name="h1")
    a2 = g.matmul(W2, g.concat(h1, h2.prev), name="a2")
    g.mul(g.one_minus(g.sigmoid(a2)), g.add(a2, b), name="h2")
    y = g.output(g.matmul(g.param("V", (3, 4)), h2, name="y"))
    g.loss("cross_entropy", y, g.index_input("target", 3))
    return g


GRAPHS = {name: (lambda name=name: small_network(name)) for name in ("elman", "jordan", "lstm", "gru")}
GRAPHS["coupled"] = coupled_relu


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_jit_loop_agrees_with_reference(name, dtype, tol):
    g = GRAPHS[name]()
    rng = np.random.default_rng(7)
    T, B = 6, 3
    params = perturbed_params(g, rng, dtype)
    inputs = {"x": rng.normal(size=(T, B, 3)).astype(dtype), "target": rng.integers(0, 3, (T, B))}
    masks = {g.losses[0].name: (rng.random((T, B)) < 0.8).astype(dtype)}
    eng = CompiledEngine(g, jit=True)
    assert eng.uses_jit(B)
    for _ in range(2):  # the second run reuses the buffers
        init = {k: rng.normal(size=v.shape).astype(dtype)
                for k, v in reference_run(g, params, inputs, backward=False).final_states.items()}
        expected = reference_run(g, params, inputs, init_states=init, masks=masks)
        got = eng.run(params, inputs, init_states=init, masks=masks)
        assert_agree(expected, got, tol)


def test_auto_takes_numpy_for_large_steps():
    eng = CompiledEngine(small_network("lstm"), jit="auto")
    assert not eng.uses_jit(10_000)


def test_jit_true_refuses_ops_it_cannot_run():
    g = Graph("softmax-core")
    x = g.input("x", 2)
    h = g.state("h", 2)
    g.softmax(g.add(x, h.prev), name="h")
    g.output(h)
    with pytest.raises(ValueError, match="softmax"):
        CompiledEngine(g, jit=True)


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_fused_kernels_agree_with_reference(name, monkeypatch):
    """The NumPy loop with its elementwise runs fused into Numba kernels ("fuse" mode)."""
    monkeypatch.setenv("UNROLLED_JIT", "fuse")
    g = GRAPHS[name]()
    rng = np.random.default_rng(3)
    T, B = 5, 4
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        params = perturbed_params(g, rng, dtype)
        inputs = {"x": rng.normal(size=(T, B, 3)).astype(dtype), "target": rng.integers(0, 3, (T, B))}
        eng = CompiledEngine(g)
        assert not eng.uses_jit(B)
        assert_agree(reference_run(g, params, inputs), eng.run(params, inputs), tol)
    if name in ("lstm", "gru"):
        assert "fused into one kernel" in eng.code and "def fwd_r0" in eng.kernel_code


@pytest.mark.parametrize("jit", [True, "fuse"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_one_hot_rows_are_picked_and_scattered(jit, chunk, monkeypatch):
    """``W · one_hot(tokens)`` runs as a row pick in the loop and its weight gradient as a scatter
    (Numba kernels), in chunks of steps: the same numbers as the reference's dense products."""
    if jit == "fuse":
        monkeypatch.setenv("UNROLLED_JIT", "fuse")
    g = embedded("one_hot")
    rng = np.random.default_rng(5)
    T, B = 5, 3
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        params = perturbed_params(g, rng, dtype)
        inputs = make_inputs(g, T, B, rng, dtype)
        eng = CompiledEngine(g, jit=True if jit is True else "auto", chunk_steps=chunk)
        assert "add_rows(" in eng.code
        assert_agree(reference_run(g, params, inputs), eng.run(params, inputs), tol)
