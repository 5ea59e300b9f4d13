"""The Numba loop of the compiled engine agrees with the reference engine.

The JIT path shares the generated loop text with the NumPy path (only the
kernels differ), so a fixed set of graphs covering every kernel is enough:
each compiles once (Numba caches it on disk) and is held to 1e-10 in float64
and 1e-4 in float32, where tanh and σ use a vectorizable approximation.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unrolled.engines.compiled.engine import CompiledEngine
from unrolled.engines.compiled.kernels import blas
from unrolled.engines.reference import run as reference_run
from unrolled.graph.folded import Graph
from unrolled.models.small_networks import small_network

numba = pytest.importorskip("numba")

from helpers import embedded, make_inputs, perturbed_params  # noqa: E402
from test_engine_agreement import _data, assert_agree, cyclic_graphs  # noqa: E402

from unrolled.engines.compiled.kernels.arrays import BLAS_NAME, matmul, matmul_add  # noqa: E402
from unrolled.engines.compiled.kernels.scalars import exp1  # noqa: E402


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


def test_auto_takes_numba_at_every_size_when_it_reaches_numpys_blas(monkeypatch):
    """Through SciPy's BLAS (a second thread pool) large steps are faster in the NumPy loop; through
    NumPy's own, the Numba loop wins at every size (see blas.py)."""
    monkeypatch.setenv("UNROLLED_JIT", "1")
    eng = CompiledEngine(small_network("lstm"), jit="auto")
    assert eng.uses_jit(10_000) == (BLAS_NAME == "numpy")
    assert eng.uses_jit(2)


def test_the_numba_loop_fuses_elementwise_runs():
    eng = CompiledEngine(small_network("lstm"), jit=True)
    eng.loops.jit_namespace()
    assert "fused into one kernel" in eng.jit_code and "def fwd_r0(KIND, " in eng.jit_code


def test_a_stack_shows_each_layers_numba_loops():
    from unrolled.models import cells

    g = Graph("stack")
    h = cells.stack(g, "lstm", g.input("x", 3), 4, 2)
    g.loss("mse", g.matmul(g.param("V", (2, 4)), h, name="y"), g.input("goal", 2))
    eng = CompiledEngine(g, jit=True)
    assert len(eng.stages) == 2
    assert eng.jit_code.count("def forward_loop(") == 2 and eng.jit_code.count("def backward_loop(") == 2


@numba.njit  # not cached: its machine code calls whichever BLAS this process has (see kernels.arrays.matmul)
def _product(a, b, out):
    matmul(a, b, out)


@numba.njit
def _product_added(a, b, out):
    matmul_add(a, b, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1, 20])
def test_products_in_numba_take_any_view_blas_can_read(dtype, scale):
    """Row-strided slices, transposed views, one row, an empty inner size, and views BLAS cannot read
    (negative or two non-unit strides, which fall back to loops): each as ``a @ b``. At scale 10
    the float32 products are large enough for oneDNN, when it is installed."""
    rng = np.random.default_rng(0)
    k = scale
    big = rng.normal(size=(9 * k, 12 * k)).astype(dtype)
    W = rng.normal(size=(7 * k, 5 * k)).astype(dtype)
    cases = [
        (big[:4 * k, 2 * k:7 * k], W[:5 * k, :3 * k]),   # rows of a wider array
        (big[:4 * k, :5 * k], W.T[:, :3 * k]),           # a transposed view
        (big[:7 * k, :5 * k].T, W),                       # transposed left operand
        (big[2:3, :7 * k], W),                            # one row
        (big[::-1, :7 * k][:3 * k], W),                   # negative row stride: loops
        (big[::2, ::2][:3 * k, :5 * k], W[:5 * k, :2 * k]),  # no unit stride: loops
        (big[:3 * k, :0], W[:0, :4 * k]),                 # nothing to sum: zeros
    ]
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    for a, b in cases:
        out = np.full((a.shape[0], b.shape[1]), np.nan, dtype=dtype)
        _product(a, b, out)
        np.testing.assert_allclose(out, a @ b, rtol=rtol, atol=1e-4)
        start = rng.normal(size=out.shape).astype(dtype)  # matmul_add: the product added onto what is there
        onto = start.copy()
        _product_added(a, b, onto)
        np.testing.assert_allclose(onto, start + a @ b, rtol=rtol, atol=1e-4)
    for product in (_product, _product_added):
        wide = np.full((4 * k, 9 * k), 7.0, dtype=dtype)  # a row-strided output: only its columns are written
        product(big[:4 * k, :5 * k], W[:5 * k, :3 * k], wide[:, 2 * k:5 * k])
        expected = big[:4 * k, :5 * k] @ W[:5 * k, :3 * k] + (7 if product is _product_added else 0)
        np.testing.assert_allclose(wide[:, 2 * k:5 * k], expected, rtol=1e-4, atol=1e-4)
        assert (wide[:, :2 * k] == 7).all() and (wide[:, 5 * k:] == 7).all()


def test_products_in_numba_without_numpys_blas():
    """Without NumPy's BLAS (and oneDNN) the products go to SciPy's BLAS when every operand is
    contiguous, else to loops: ``matmul`` and ``matmul_add`` each way, in a process of their own."""
    code = (
        "import numba, numpy as np\n"
        "import unrolled.engines.compiled.kernels.blas as b\n"
        "b.GEMM = None  # as where NumPy's BLAS cannot be bound (an MKL NumPy, no /proc)\n"
        "import unrolled.engines.compiled.kernels.arrays as j\n"
        "assert j.BLAS_NAME in ('scipy', 'loops'), j.BLAS_NAME\n"
        "f = numba.njit(lambda a, b, o: j.matmul(a, b, o))\n"
        "g = numba.njit(lambda a, b, o: j.matmul_add(a, b, o))\n"
        "rng = np.random.default_rng(1)\n"
        "a, b = rng.normal(size=(5, 6)), rng.normal(size=(6, 4))\n"
        "for x, y in ((a, b), (a, np.asfortranarray(b)), (a[::-1], b)):\n"
        "    o = np.full((5, 4), np.nan); f(x, y, o); assert np.allclose(o, x @ y)\n"
        "    o = np.ones((5, 4)); g(x, y, o); assert np.allclose(o, 1 + x @ y)\n"
        "print('ok')\n")
    assert _python(code, UNROLLED_ONEDNN="0") == "ok"


def test_numpy_blas_is_found_for_numpys_own_openblas():
    if "scipy-openblas" not in str(np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})):
        pytest.skip("this NumPy does not bundle OpenBLAS")
    assert blas.GEMM is not None and BLAS_NAME == "numpy"


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
    """The NumPy loop with its elementwise runs fused into Numba kernels (jit="fuse")."""
    monkeypatch.setenv("UNROLLED_JIT", "1")
    g = GRAPHS[name]()
    rng = np.random.default_rng(3)
    T, B = 5, 4
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        params = perturbed_params(g, rng, dtype)
        inputs = {"x": rng.normal(size=(T, B, 3)).astype(dtype), "target": rng.integers(0, 3, (T, B))}
        eng = CompiledEngine(g, jit="fuse")
        assert not eng.uses_jit(B)
        assert_agree(reference_run(g, params, inputs), eng.run(params, inputs), tol)
    if name in ("lstm", "gru"):
        assert "fused into one kernel" in eng.code and "def fwd_r0" in eng.loops.kernel_code


@pytest.mark.parametrize("jit", [True, "fuse"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_one_hot_rows_are_picked_and_scattered(jit, chunk, monkeypatch):
    """``W · one_hot(tokens)`` runs as a row pick in the loop and its weight gradient as a scatter
    (Numba kernels), in chunks of steps: the same numbers as the reference's dense products."""
    if jit == "fuse":
        monkeypatch.setenv("UNROLLED_JIT", "1")
    g = embedded("one_hot")
    rng = np.random.default_rng(5)
    T, B = 5, 3
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        params = perturbed_params(g, rng, dtype)
        inputs = make_inputs(g, T, B, rng, dtype)
        eng = CompiledEngine(g, jit=jit, chunk_steps=chunk)
        assert "add_rows(" in eng.code
        assert_agree(reference_run(g, params, inputs), eng.run(params, inputs), tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_transposed_fills_a_column_block_exactly(dtype):
    """The scattered one-hot gradient ``[V, out]`` added into its columns of ``[out, in]``: sizes
    off the kernel's blocks of sixteen, into a column slice whose rows are strided."""
    from unrolled.engines.compiled.kernels.arrays import add_transposed

    rng = np.random.default_rng(0)
    for rows, cols, lo in ((37, 5, 3), (16, 16, 0), (512, 75, 0)):
        grad = rng.standard_normal((rows, cols + lo + 7)).astype(dtype)
        part = rng.standard_normal((cols, rows)).astype(dtype)
        want = grad.copy()
        want[:, lo:lo + cols] += part.T
        add_transposed(grad[:, lo:lo + cols], part)
        np.testing.assert_array_equal(grad, want)


def test_aligned_arrays_start_on_a_cache_line():
    """The engine's buffers and weight copies start on 64 bytes, whatever malloc gave: a weight
    read off the line slows oneDNN's step product ~9%."""
    for shape in ((3,), (25, 128), (2, 3, 5), (512, 203)):
        for dtype in (np.float32, np.float64):
            a = blas.aligned_empty(shape, dtype)
            assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
            assert a.ctypes.data % blas.ALIGN == 0
    w = np.arange(24, dtype=np.float64).reshape(4, 6)
    for src, dtype in ((w.T, None), (w[:, 1:5], np.float32), (w[::2], None)):
        got = blas.aligned(src, dtype)
        assert got.ctypes.data % blas.ALIGN == 0 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, src)
        assert got.dtype == (dtype or src.dtype)
    ready = blas.aligned_empty((8, 16), np.float32)
    assert blas.aligned(ready) is ready  # nothing copied when it already is one


@pytest.mark.parametrize("dtype", [None, np.float32])
def test_a_transposed_weight_is_copied_block_by_block_to_the_same_numbers(dtype):
    """A transposed view wider than one block (buffers.TRANSPOSE_BLOCK columns), flipped, strided
    or cut from a wider matrix, copies to exactly its numbers."""
    w = np.random.default_rng(0).standard_normal((300, 157))
    for src in (w.T, w[:, 7:150].T, w[::-1].T, w[::2, ::3].T, w[:3, :2].T, np.asfortranarray(w)):
        got = blas.aligned(src, dtype)
        assert got.flags.c_contiguous and got.ctypes.data % blas.ALIGN == 0 and got.shape == src.shape
        np.testing.assert_array_equal(got, src.astype(dtype or src.dtype))


def test_a_runs_buffers_and_weight_copies_are_aligned():
    g = embedded("one_hot")
    rng = np.random.default_rng(1)
    params = perturbed_params(g, rng, np.float32)
    inputs = make_inputs(g, 6, 4, rng, np.float32)
    eng = CompiledEngine(g, jit=True, whole=False)
    eng.run(params, inputs)
    held = eng.loops.buffers(6, 4, np.float32)
    assert held, "a run keeps its buffers"
    for name, a in held.items():
        assert a.ctypes.data % blas.ALIGN == 0, name


@numba.njit(cache=True)
def _exp_each(x, out):
    for i in range(x.shape[0]):
        out[i] = exp1(x[i])


def test_float32_exp_is_within_two_ulp_and_float64_is_the_c_librarys():
    x = np.concatenate([np.linspace(-87, 88, 400_001), [0.0, -1e-30, 1e-30, -0.5, 0.5]]).astype(np.float32)
    got = np.empty_like(x)
    _exp_each(x, got)
    exact = np.exp(x.astype(np.float64))
    assert (np.abs(got - exact) / exact).max() < 2 * 2.0**-24
    far = np.array([-88.0, -100.0, -np.inf], dtype=np.float32)  # clamped: e**-87, still a usable tiny weight
    low = np.empty_like(far)
    _exp_each(far, low)
    assert (low > 0).all() and (low < 2e-38).all()
    x64 = np.linspace(-700, 700, 10_001)
    got64 = np.empty_like(x64)
    _exp_each(x64, got64)
    np.testing.assert_allclose(got64, np.exp(x64), rtol=4e-16)  # NumPy's SIMD exp may differ by an ulp


# the Numba loops are what a user gets by default: random graphs too, fewer (each compiles for seconds)
@settings(max_examples=int(os.environ.get("UNROLLED_EXAMPLES", 8)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(g=cyclic_graphs(), T=st.integers(1, 6), B=st.integers(1, 3), seed=st.integers(0, 2**16),
       combine=st.sampled_from(["sum", "mean"]), dtype=st.sampled_from([np.float64, np.float32]),
       chunk=st.one_of(st.none(), st.integers(1, 3)))
def test_random_graphs_agree_in_the_numba_loops(g, T, B, seed, combine, dtype, chunk):
    params, inputs, masks, init = _data(g, T, B, seed, dtype)
    try:
        eng = CompiledEngine(g, jit=True, whole=False, chunk_steps=chunk)
    except ValueError as e:  # an op the Numba loop does not run (softmax in the core): said so, not hidden
        assert "cannot run" in str(e)
        return
    assert eng.uses_jit(B)
    expected = reference_run(g, params, inputs, masks=masks, init_states=init, combine=combine)
    got = eng.run(params, inputs, masks=masks, init_states=init, combine=combine)
    assert_agree(expected, got, 1e-10 if dtype == np.float64 else 1e-4)


def _float32s(lo: float, hi: float, every: int) -> np.ndarray:
    """Every ``every``-th float32 from ``lo`` to ``hi`` (both positive), by bit pattern: dense at every scale."""
    a, b = np.array([lo, hi], dtype=np.float32).view(np.int32)
    return np.arange(a, b, every, dtype=np.int32).view(np.float32)


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_float32_fast_functions_are_accurate_and_saturate(name):
    """The float32 tanh and σ the Numba kernels use: within the bound their docstrings state,
    exactly at their limits where float32 rounds to them (so that 1 - y^2 and y (1 - y), the
    derivatives computed from the kept value, are 0 there), at +-inf, and NaN for NaN."""
    from unrolled.engines.compiled.kernels import arrays as jitkernels
    from unrolled.graph.ops import sigmoid

    pos = _float32s(1e-30, 60.0, 997)
    x = np.concatenate([pos, -pos, np.float32([0.0, 100.0, -100.0, 3e38, -3e38])])
    got = np.empty((x.size, 1), np.float32)
    getattr(jitkernels, name)(x[:, None], got)
    got = got[:, 0].astype(np.float64)
    exact = np.tanh(x.astype(np.float64)) if name == "tanh" else sigmoid(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    normal = np.abs(exact) >= np.finfo(np.float32).tiny
    assert np.max(np.abs(got - exact)) <= 1e-7
    assert np.max(np.abs(got - exact)[normal] / ulp[normal]) <= (5 if name == "tanh" else 3)
    limit = np.float32(9.02) if name == "tanh" else np.float32(17.4)  # float32 rounds the function to 1 beyond
    assert np.all(got[x > limit] == 1.0)
    if name == "tanh":
        assert np.all(got[x < -limit] == -1.0)
    else:  # the lower tail keeps its relative precision down to -88, then is 0
        assert np.all(got[x < -88] == 0.0) and np.all(got[(x < 0) & (x >= -88)] > 0)
    special = np.float32([[np.inf], [-np.inf], [np.nan]])
    out = np.empty_like(special)
    getattr(jitkernels, name)(special, out)
    assert out[0, 0] == 1.0 and out[1, 0] == (-1.0 if name == "tanh" else 0.0) and np.isnan(out[2, 0])


def test_the_plain_numpy_engine_never_imports_the_whole_run_module():
    """With ``UNROLLED_JIT=0`` Numba is ruled out before the whole-run function is asked whether it
    can run the graph: the plain NumPy engine's start does not import a module it can never use."""
    code = (
        "import sys, numpy as np\n"
        "from unrolled.charlm import model as m\n"
        "from unrolled.engines.registry import make_engine\n"
        "config = m.ModelConfig(vocab_size=5, hidden=8, layers=2)\n"
        "engine = make_engine(m.build_graph(config))\n"
        "x = np.arange(12).reshape(4, 3) % 5\n"
        "r = engine.run(m.init_params(config, 0), {m.INPUT_NAME: x, m.TARGET_NAME: (x + 1) % 5})\n"
        "assert np.isfinite(r.loss) and r.grads\n"
        "assert 'not the whole-run function: UNROLLED_JIT=0 turns Numba off' in engine.explain(4, 3)\n"
        "print('imported' if 'unrolled.engines.compiled.wholestep' in sys.modules else 'not imported')\n")
    assert _python(code, UNROLLED_JIT="0") == "not imported"


def _python(code: str, **env) -> str:
    """What ``code`` prints, run in a fresh interpreter with ``env`` added to this one's environment."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()
