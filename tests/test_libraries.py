"""kernels/libraries.py and blas.py's NumPy BLAS: which library a weight gradient runs on, and that
both give one answer.

The choice is a measurement, so what is tested is the rule that turns timings into a choice, when
it measures at all (only where both libraries run on one thread, as in a row split's part), that
it measures a shape once, and that the product on either library adds ``gᵀ · x`` where it belongs
(helpers.PATHS runs every graph's row split with the weight gradients on NumPy's BLAS too).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from unrolled.engines.compiled.kernels import blas, libraries, onednn


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(libraries, "_choices", {})


def operands(rows: int, outputs: int, inputs: int, dtype=np.float32):
    """A weight gradient's ``g [rows, outputs]`` and ``x [rows, inputs]``."""
    return np.ones((rows, outputs), dtype), np.ones((rows, inputs), dtype)


@contextlib.contextmanager
def one_thread_each():
    """Both libraries on one thread, as inside a row split's part."""
    with blas.numpy_blas_on_one_thread(), onednn.products_on_one_thread():
        yield


def test_numpy_blas_is_taken_only_when_it_wins_clearly():
    ones = [1.0] * 5
    assert libraries.choose(ones, [0.5, 0.6, 0.9, 0.7, 1.2])  # median ratio 0.7
    assert not libraries.choose(ones, [0.97, 0.96, 0.98, 0.9, 1.0])  # within the margin: oneDNN
    assert not libraries.choose(ones, [1.3, 1.2, 1.1, 1.0, 0.5])  # one lucky round decides nothing


def test_nothing_is_measured_unless_both_run_on_one_thread(monkeypatch):
    monkeypatch.setattr(libraries, "_measure", lambda *a: pytest.fail("measured"))
    with monkeypatch.context() as m:
        m.setattr(onednn, "threads", lambda: 2)
        assert libraries.on_numpy_blas_faster(*operands(1024, 512, 128)) is False  # oneDNN on 2 threads
    with blas.numpy_blas_on_one_thread(), monkeypatch.context() as m:
        m.setattr(onednn, "threads", lambda: 2)
        assert libraries.on_numpy_blas_faster(*operands(1024, 512, 128)) is False  # ... with NumPy's on 1
    with one_thread_each():
        assert libraries.on_numpy_blas_faster(*operands(2, 3, 4)) is False  # below onednn.SMALL
        assert libraries.on_numpy_blas_faster(*operands(1024, 512, 128, np.float64)) is False  # never oneDNN's
    assert libraries.chosen() == {}


def test_a_shape_is_measured_once_on_one_thread(monkeypatch):
    if onednn.SGEMM is None or blas.THREAD_COUNT is None:
        pytest.skip("needs oneDNN and NumPy's OpenBLAS: nothing is measured")
    calls = []

    def measure(g, x):
        calls.append((*g.shape, x.shape[1]))
        return [1.0] * 5, [0.5] * 5

    monkeypatch.setattr(libraries, "_measure", measure)
    with one_thread_each():
        assert libraries.on_numpy_blas_faster(*operands(1024, 512, 128))
        assert libraries.on_numpy_blas_faster(*operands(1024, 512, 128))
    assert calls == [(1024, 512, 128)]
    assert libraries.chosen() == {(1024, 512, 128, "<f4"): True}


def test_measuring_times_both_libraries_in_turns():
    if onednn.SGEMM is None or blas.GEMM is None:
        pytest.skip("needs oneDNN and NumPy's BLAS")
    with one_thread_each():
        on_onednn, on_numpy = libraries._measure(*operands(256, 128, 64))
    assert len(on_onednn) == len(on_numpy) > 0
    assert all(t > 0 for t in on_onednn + on_numpy)


@pytest.mark.parametrize("faster", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_weight_gradient_adds_its_product_into_the_columns_it_is_given(monkeypatch, faster, dtype):
    """Into a column slice of a weight's gradient, as a split product's halves write, on either library."""
    monkeypatch.setattr(libraries, "on_numpy_blas_faster", lambda *shape: faster)
    rng = np.random.default_rng(0)
    g, x = rng.standard_normal((300, 40)).astype(dtype), rng.standard_normal((300, 24)).astype(dtype)
    grads = np.ones((40, 64), dtype=dtype)
    libraries.weight_gradient(g, x, grads[:, 16:40])
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(grads[:, 16:40], 1 + g.T.astype(np.float64) @ x, rtol=tol, atol=tol)
    assert (grads[:, :16] == 1).all() and (grads[:, 40:] == 1).all()


def test_numpy_blas_takes_only_what_it_can_read_as_it_is():
    if blas.GEMM is None:
        pytest.skip("NumPy's BLAS is not reachable here")
    a, b = np.ones((4, 6), np.float32), np.ones((6, 5), np.float32)
    out = np.zeros((4, 10), np.float32)
    assert blas.on_numpy_blas(a, b, out[:, ::2]) is False  # every other column: no BLAS operand
    assert (out == 0).all()
    assert blas.on_numpy_blas(a, b.astype(np.float64), out[:, :5]) is False  # mixed dtypes
    assert blas.on_numpy_blas(a, b, out[:, :5]) and (out[:, :5] == 6).all()


def test_one_thread_is_given_back_when_the_last_leaves():
    if blas.THREAD_COUNT is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS found here")
    get, put = blas.THREAD_COUNT
    before = get()
    put(2)
    try:
        with blas.numpy_blas_on_one_thread():
            assert blas.numpy_blas_threads() == 1
            with blas.numpy_blas_on_one_thread():  # a second user: the count stays one
                assert blas.numpy_blas_threads() == 1
            assert blas.numpy_blas_threads() == 1
        assert blas.numpy_blas_threads() == 2
    finally:
        put(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_transposed_copy_is_the_view_s_values_in_place_or_made_once(dtype):
    """blas.aligned_copy: a weight's columns read as rows (a transposed view, rows apart by the
    weight's width) come out as a contiguous, cache-line aligned array equal to the view, written
    into the array kept under its key; anything else goes to buffers.aligned as before."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((7, 12)).astype(dtype)
    keep = {}
    for view in (W[:, 3:8].T, W.T):
        out = blas.aligned_copy(view, keep, "k")
        assert np.array_equal(out, view) and out.flags.c_contiguous and out.dtype == dtype
        assert out.ctypes.data % blas.ALIGN == 0
        assert keep["k"] is out and blas.aligned_copy(view, keep, "k") is out  # kept for the next run
        keep.clear()
    # not a transposed view: as buffers.aligned copies it (NumPy lays out W[:, cols] column-major,
    # so its transpose is contiguous already)
    for other in (W[:, 3:8], W[:, [0, 2, 5]].T):
        out = blas.aligned_copy(other, keep, "p")
        assert np.array_equal(out, other) and out.flags.c_contiguous
    # laid out as the copy would be already: still a copy, never the input (callers write it)
    laid_out = blas.aligned(W[:, 3:8])
    out = blas.aligned_copy(laid_out, keep, "q")
    assert out is not laid_out and not np.shares_memory(out, laid_out) and np.array_equal(out, laid_out)
    if blas.OMATCOPY is None:
        pytest.skip("NumPy's BLAS has no omatcopy here: only the fallback ran")
