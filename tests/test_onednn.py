"""oneDNN's sgemm, when installed, computes the same products as NumPy, for every operand layout
the engine hands it; it is skipped for what it cannot take, and can be turned off."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import perturbed_params

from unrolled.engines.compiled.engine import CompiledEngine
from unrolled.engines.compiled.kernels import blas, onednn
from unrolled.engines.reference import run as reference_run
from unrolled.models.small_networks import small_network

try:  # Numba takes oneDNN's address at import: before a test swaps in a counting function
    import unrolled.engines.compiled.kernels.arrays  # noqa: F401
except ImportError:  # no Numba
    pass

try:
    importlib.metadata.version(onednn.DISTRIBUTION)
    INSTALLED = True
except importlib.metadata.PackageNotFoundError:
    INSTALLED = False

needs_onednn = pytest.mark.skipif(onednn.SGEMM is None, reason="oneDNN is not installed (the fast extra)")


@pytest.fixture
def calls(monkeypatch):
    """How many products went to oneDNN during the test."""
    count = [0]
    real = onednn.SGEMM
    if real is not None:
        def counting(*args):
            count[0] += 1
            return real(*args)
        monkeypatch.setattr(onednn, "SGEMM", counting)
    return count


def _operands(rng, dtype=np.float32):
    """Pairs of operands of ``a @ b`` in every layout a run produces, each product above oneDNN.SMALL."""
    big = rng.normal(size=(300, 240)).astype(dtype)
    W = rng.normal(size=(200, 160)).astype(dtype)
    return [
        (big[:100, :120], W[:120, :100]),       # rows of wider arrays (row-strided)
        (big[:100, :150], W.T[:150, :100]),     # a transposed view on the right
        (big[:200, :100].T, W[:, :100]),        # a transposed view on the left (G.T @ X)
        (np.ascontiguousarray(big[:100, :120]), np.ascontiguousarray(W[:120])),  # plain
    ]


@needs_onednn
def test_products_through_onednn_match_numpy_for_every_layout(calls):
    rng = np.random.default_rng(0)
    for a, b in _operands(rng):
        assert a.shape[0] * a.shape[1] * b.shape[1] >= onednn.SMALL
        np.testing.assert_allclose(blas.product(a, b), a @ b, rtol=1e-4, atol=1e-4)
        out = np.full((a.shape[0], b.shape[1]), np.nan, dtype=np.float32)
        blas.product(a, b, out=out)
        np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-4)
    assert calls[0] == 8


@needs_onednn
def test_onednn_accumulates_into_a_row_strided_slice(calls):
    """The weight gradients: ``grads[W][:, lo:hi] += G.T @ X``, written in place."""
    rng = np.random.default_rng(1)
    G, X = rng.normal(size=(300, 64)).astype(np.float32), rng.normal(size=(300, 40)).astype(np.float32)
    grad = rng.normal(size=(64, 100)).astype(np.float32)
    assert 64 * 300 * 40 >= onednn.SMALL
    expected = grad.copy()
    expected[:, 30:70] += G.T @ X
    blas.product(G.T, X, out=grad[:, 30:70], accumulate=True)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-4)
    assert calls[0] == 1


def test_what_onednn_cannot_take_goes_to_numpy(calls):
    """float64, small products, 3-D operands and views with no unit stride are NumPy's."""
    rng = np.random.default_rng(2)
    a64, b64 = rng.normal(size=(120, 120)), rng.normal(size=(120, 120))
    np.testing.assert_array_equal(blas.product(a64, b64), a64 @ b64)
    a, b = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_allclose(blas.product(a, b), a @ b, rtol=1e-6)
    x3 = rng.normal(size=(6, 120, 120)).astype(np.float32)
    W = rng.normal(size=(120, 100)).astype(np.float32)
    np.testing.assert_allclose(blas.product(x3, W), x3 @ W, rtol=1e-4, atol=1e-4)
    big = rng.normal(size=(240, 240)).astype(np.float32)
    for view in (big[::2, ::2][:120, :120], big[::-1][:120, :120]):  # no unit stride; a negative one
        assert view.shape[0] * view.shape[1] * W.shape[1] >= onednn.SMALL
        np.testing.assert_allclose(blas.product(view, W), view @ W, rtol=1e-4, atol=1e-4)
        out = np.ones((120, 100), dtype=np.float32)
        blas.product(view, W, out=out, accumulate=True)
        np.testing.assert_allclose(out, 1 + view @ W, rtol=1e-4, atol=1e-4)
    assert calls[0] == 0


def test_mismatched_operands_get_numpys_error(calls):
    a, b = np.ones((40, 70), np.float32), np.ones((80, 50), np.float32)
    with pytest.raises(ValueError, match="mismatch"):
        blas.product(a, b)
    with pytest.raises(ValueError):
        blas.product(np.ones((40, 80), np.float32), b, out=np.empty((40, 60), np.float32))
    assert calls[0] == 0


@pytest.mark.skipif(not INSTALLED or not sys.platform.startswith("linux"), reason="the fast extra's oneDNN wheel is not installed")
def test_the_installed_onednn_is_found():
    assert onednn.SGEMM is not None, f"{onednn.DISTRIBUTION} is installed but libdnnl was not loaded"
    assert onednn.version() == importlib.metadata.version(onednn.DISTRIBUTION)


@pytest.mark.skipif(not INSTALLED, reason="the onednn-cpu-gomp wheel is not installed")
def test_the_wheels_library_is_loaded_without_looking_for_the_systems(monkeypatch):
    def system_lookup(name):  # runs ldconfig in a process of its own: every import would wait for it
        raise AssertionError(f"looked for the system's {name} though the wheel's loads")

    monkeypatch.setattr(onednn.ctypes.util, "find_library", system_lookup)
    assert onednn._find() is not None


def test_unrolled_onednn_0_turns_it_off():
    code = ("from unrolled.engines.compiled.kernels import blas, onednn\n"
            "import unrolled.engines.compiled.kernels.arrays as j\n"
            "print(onednn.SGEMM is None, onednn.version(), 'oneDNN' in j.PRODUCTS)")
    env = dict(os.environ, UNROLLED_ONEDNN="0")
    pytest.importorskip("numba")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "None", "False"]


@needs_onednn
@pytest.mark.parametrize("jit", [False, True])
def test_the_engine_agrees_with_the_reference_when_its_products_go_to_onednn(jit, calls):
    """An LSTM wide enough that its step products (32 x 64 x 256) and weight products leave NumPy."""
    if jit:
        pytest.importorskip("numba")
    g = small_network("lstm", n_in=24, hidden=64, n_out=10)
    rng = np.random.default_rng(3)
    T, B = 7, 32
    params = perturbed_params(g, rng, np.float32)
    inputs = {"x": rng.normal(size=(T, B, 24)).astype(np.float32), "target": rng.integers(0, 10, (T, B))}
    eng = CompiledEngine(g, jit=jit)
    expected = reference_run(g, {k: v.astype(np.float64) for k, v in params.items()},
                             {"x": inputs["x"].astype(np.float64), "target": inputs["target"]})
    got = eng.run(params, inputs)
    assert abs(got.loss - expected.loss) <= 1e-4 * abs(expected.loss)
    for k in expected.grads:
        np.testing.assert_allclose(got.grads[k], expected.grads[k], rtol=1e-3, atol=1e-4 * np.abs(expected.grads[k]).max())
    assert calls[0] > 0  # the whole-sequence products (the Numba loop calls oneDNN by its address)


@needs_onednn
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_runs_products_after_its_parent_did():
    """OpenMP's thread pool does not survive fork; without onednn's fork hook the child hangs."""
    code = (
        "import multiprocessing as mp, numpy as np\n"
        "from unrolled.engines.compiled.kernels import blas\n"
        "a = np.ones((400, 400), np.float32)\n"
        "blas.product(a, a)\n"
        "def child(_):\n"
        "    return float(blas.product(a, a)[0, 0])\n"
        "if __name__ == '__main__':\n"
        "    with mp.get_context('fork').Pool(2) as p:\n"
        "        print(p.map(child, range(3)), float(blas.product(a, a)[0, 0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["[400.0,", "400.0,", "400.0]", "400.0"]
