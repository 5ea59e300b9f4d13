"""Generation with feedback: greedy decoding equals stepping the reference engine by hand,
a seed gives the same tokens, and the NumPy and Numba paths agree."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unrolled.engines.compiled.feedback import Generator
from unrolled.engines.reference import run as reference_run
from unrolled.graph.folded import Graph
from unrolled.models import cells


def char_model(V=7, H=6, cell="lstm", layers=2) -> Graph:
    g = Graph("chars")
    tok = g.index_input("tok", V)
    h = cells.stack(g, cell, g.one_hot(tok, name="x"), H, layers)
    y = g.output(g.linear(g.param("Wy", (V, H)), h, g.param("by", (V,), init="normal:0.5"), name="y"))
    g.loss("cross_entropy", y, g.index_input("target", V))
    return g


def greedy_by_reference(g, params, prime, length):
    seq, states = list(prime), None
    for t in range(len(prime) + length):
        r = reference_run(g, params, {"tok": np.array([[seq[t]]]), "target": np.zeros((1, 1), int)},
                          init_states=states, backward=False)
        states = r.final_states
        if t >= len(prime) - 1 and len(seq) < len(prime) + length:
            seq.append(int(np.argmax(r.outputs["y"][0, 0])))
    return np.array(seq[len(prime):]), states


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman"])
def test_greedy_generation_equals_reference_stepping(cell):
    g = char_model(cell=cell)
    params = {k: v * 3 for k, v in g.init_params(1).items()}
    tokens, finals = Generator(g, "tok", "y", jit=False).run(
        params, length=15, prime=np.array([[1], [4], [2]]), rng=np.random.default_rng(0), top_k=1)
    expected, states = greedy_by_reference(g, params, [1, 4, 2], 15)
    np.testing.assert_array_equal(tokens[:, 0], expected)
    for name, value in states.items():
        np.testing.assert_allclose(finals[name], value, rtol=1e-12, atol=1e-14)


def test_same_seed_same_tokens_and_temperature_sharpens():
    g = char_model()
    params = g.init_params(2)
    gen = Generator(g, "tok", "y", jit=False)
    prime = np.array([[0, 1, 2]])
    a, _ = gen.run(params, length=50, prime=prime, rng=np.random.default_rng(5))
    b, _ = gen.run(params, length=50, prime=prime, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    cold, _ = gen.run(params, length=200, prime=prime, rng=np.random.default_rng(5), temperature=0.05)
    hot, _ = gen.run(params, length=200, prime=prime, rng=np.random.default_rng(5), temperature=5.0)
    assert len(np.unique(cold)) < len(np.unique(hot))


def test_top_k_keeps_only_the_k_likeliest():
    g = char_model(V=7)
    params = g.init_params(3)
    tokens, _ = Generator(g, "tok", "y", jit=False).run(
        params, length=300, prime=np.array([[0]]), rng=np.random.default_rng(1), top_k=2)
    # each sampled token is one of the two likeliest after the text before it
    seq = [0] + list(tokens[:, 0])
    r = reference_run(g, params, {"tok": np.array(seq[:-1])[:, None], "target": np.zeros((len(seq) - 1, 1), int)},
                      backward=False)
    top2 = np.argsort(r.outputs["y"][:, 0], axis=1)[:, -2:]
    assert all(tok in top2[t] for t, tok in enumerate(seq[1:]))


def test_bad_requests_are_refused():
    g = char_model()
    gen = Generator(g, "tok", "y", jit=False)
    params = g.init_params(0)
    with pytest.raises(ValueError, match="temperature"):
        gen.run(params, length=3, prime=np.array([[0]]), rng=np.random.default_rng(0), temperature=0)
    with pytest.raises(ValueError, match="top-k"):
        gen.run(params, length=3, prime=np.array([[0]]), rng=np.random.default_rng(0), top_k=99)
    with pytest.raises(ValueError, match="not an index input"):
        Generator(g, "x", "y")


def test_jit_generation_matches_numpy():
    pytest.importorskip("numba")
    g = char_model()
    params = {k: v * 3 for k, v in g.init_params(1).items()}
    prime = np.array([[1], [4], [2]])
    a, fa = Generator(g, "tok", "y", jit=False).run(params, length=30, prime=prime, rng=np.random.default_rng(9), top_k=1)
    b, fb = Generator(g, "tok", "y", jit=True).run(params, length=30, prime=prime, rng=np.random.default_rng(9), top_k=1)
    np.testing.assert_array_equal(a, b)
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=1e-10, atol=1e-12)


def every_fused_op_model(V=5, H=4) -> Graph:
    """Each elementwise op the Numba path fuses into one loop, slices of a product, a parameter
    operand, a delay of two steps and a learned initial state."""
    g = Graph("fused")
    x = g.one_hot(g.index_input("tok", V), name="x")
    h = g.state("h", H, init="learned")
    a = g.linear(g.param("W", (2 * H, V + H)), g.concat(x, h.prev), g.param("b", (2 * H,), init="normal:0.5"), name="a")
    u, r = g.tanh(g.slice(a, 0, H)), g.relu(g.slice(a, H, 2 * H))
    m = g.sub(g.mul(u, g.one_minus(g.sigmoid(r))), g.scale(h.delay(2), 0.5))
    g.add(g.add(g.identity(m), g.param("c", (H,), init="normal:0.5")), g.scale(h.prev, 0.25), name="h")
    g.output(g.matmul(g.param("Wy", (V, H)), h, name="y"))
    return g


# one row: the product loops; twelve on one thread: BLAS; forty on two threads: twenty rows a thread, on BLAS
@pytest.mark.parametrize("B, threads", [(1, 1), (12, 1), (40, 2)])
def test_jit_sampling_matches_numpy_on_every_fused_op(B, threads):
    pytest.importorskip("numba")
    g = every_fused_op_model()
    params = {k: v * 2 for k, v in g.init_params(4).items()}
    prime = np.random.default_rng(0).integers(0, 5, size=(3, B))
    a, fa = Generator(g, "tok", "y", jit=False).run(params, length=40, prime=prime, rng=np.random.default_rng(3))
    jit = Generator(g, "tok", "y", jit=True, threads=threads)
    b, fb = jit.run(params, length=40, prime=prime, rng=np.random.default_rng(3))
    assert jit.ran_on == threads
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(fa["h"], fb["h"], rtol=1e-10, atol=1e-12)


def test_jit_float32_reading_matches_numpy():
    """Float32 runs its own arithmetic on the Numba path (a rational tanh, products with fused
    multiply-adds); after reading a prime its states agree with NumPy's to float32 precision."""
    pytest.importorskip("numba")
    g = char_model(V=7, H=16)
    params = g.init_params(6, np.float32)
    prime = np.random.default_rng(1).integers(0, 7, size=(30, 2))
    _, fa = Generator(g, "tok", "y", jit=False).run(params, length=0, prime=prime, rng=np.random.default_rng(0))
    _, fb = Generator(g, "tok", "y", jit=True).run(params, length=0, prime=prime, rng=np.random.default_rng(0))
    for k in fa:
        assert fb[k].dtype == np.float32
        np.testing.assert_allclose(fa[k], fb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_a_state_defined_by_a_slice_keeps_its_ring(jit):
    """h = a[1:3], read as h.prev: a delayed slice is not a view, its ring is written each step
    (it had none: KeyError). The states after the prime equal the reference engine's."""
    g = Graph("slice_state")
    x, h = g.one_hot(g.index_input("tok", 3)), g.state("h", 2)
    a = g.tanh(g.matmul(g.param("W", (3, 5)), g.concat(x, h.prev)), name="a")
    g.slice(a, 1, 3, name="h")
    g.output(g.matmul(g.param("V", (3, 2)), h, name="y"))
    params = {k: 3 * v for k, v in g.init_params(0).items()}
    prime = np.array([[0, 1], [2, 2], [1, 0], [1, 2]])
    _, states = Generator(g, "tok", "y", jit=jit).run(params, length=0, prime=prime, rng=np.random.default_rng(0))
    want = reference_run(g, params, {"tok": prime}, backward=False).final_states["h"]
    np.testing.assert_allclose(states["h"], want, rtol=1e-12, atol=1e-12)


def softplus_exp_model(V=5, H=4) -> Graph:
    """A character model whose state update is softplus and exp: ops added by one table entry each."""
    g = Graph("softplus_exp")
    tok = g.index_input("tok", V)
    h = g.state("h", H)
    a = g.linear(g.param("W", (H, V + H)), g.concat(g.one_hot(tok, name="x"), h.prev), g.param("b", (H,)), name="a")
    g.tanh(g.sub(g.softplus(a), g.exp(g.scale(h.prev, -1.0))), name="h")
    y = g.output(g.linear(g.param("Wy", (V, H)), h, g.param("by", (V,), init="normal:0.5"), name="y"))
    g.loss("cross_entropy", y, g.index_input("target", V))
    return g


def test_softplus_and_exp_generate_alike_on_numpy_numba_and_reference():
    g = softplus_exp_model()
    params = {k: v * 2 for k, v in g.init_params(5).items()}
    tokens, finals = Generator(g, "tok", "y", jit=False).run(
        params, length=12, prime=np.array([[1], [3]]), rng=np.random.default_rng(0), top_k=1)
    expected, states = greedy_by_reference(g, params, [1, 3], 12)
    np.testing.assert_array_equal(tokens[:, 0], expected)
    np.testing.assert_allclose(finals["h"], states["h"], rtol=1e-12, atol=1e-14)
    pytest.importorskip("numba")
    prime = np.random.default_rng(1).integers(0, 5, size=(3, 2))
    a, fa = Generator(g, "tok", "y", jit=False).run(params, length=30, prime=prime, rng=np.random.default_rng(2))
    b, fb = Generator(g, "tok", "y", jit=True).run(params, length=30, prime=prime, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(fa["h"], fb["h"], rtol=1e-10, atol=1e-12)


def test_many_rows_add_the_row_each_token_picks_instead_of_multiplying_its_one_hot_vector():
    """Above LOOP_ROWS rows the products are BLAS's: the one-hot part of a layer's input is left
    out of the product, and each row adds the one row of the weights its token picks."""
    pytest.importorskip("numba")
    g = char_model(V=7, H=16, layers=1)
    code = Generator(g, "tok", "y", jit=True).code
    assert "[:, 7:23], W_" in code and "[7:23]" in code  # the dense part, h, alone through BLAS
    assert "picked = W_" in code and "TOK[b]]" in code
    params = g.init_params(2)
    prime = np.random.default_rng(0).integers(0, 7, size=(2, 12))
    a, fa = Generator(g, "tok", "y", jit=False).run(params, length=30, prime=prime, rng=np.random.default_rng(1))
    b, fb = Generator(g, "tok", "y", jit=True, threads=1).run(params, length=30, prime=prime,
                                                             rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=1e-10, atol=1e-12)


def test_draw_exp_is_within_an_ulp_of_the_c_library():
    """The Numba draw's e^z (kernels/sampling.py ``exp_draw``): within an ulp of the C library's exp
    where that is a normal number, and 0 below and for NaN."""
    numba = pytest.importorskip("numba")
    from unrolled.engines.compiled.kernels.scalars import EXP_LOWEST, exp_draw

    @numba.njit
    def each(z, out):
        for i in range(z.shape[0]):
            out[i] = exp_draw(z[i])

    rng = np.random.default_rng(0)
    z = np.concatenate([rng.uniform(EXP_LOWEST, 0, 200_000), -rng.random(20_000) * 1e-3,
                        [0.0, -0.0, -1e-300, EXP_LOWEST, np.nextafter(EXP_LOWEST, -1), -745.0, -np.inf, np.nan]])
    drawn = np.empty_like(z)
    each(z, drawn)
    normal = z >= EXP_LOWEST
    exact = np.array([math.exp(v) for v in z[normal]])
    assert (np.abs(drawn[normal] - exact) <= np.spacing(exact)).all()
    assert (drawn[~normal] == 0).all()
