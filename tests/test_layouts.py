"""kernels/layouts.py: which layout of a weight the step products read, on which library, and that
every choice gives one answer.

The choice is a measurement, so what is tested is the rule that turns timings into a choice, when
it measures at all and what, that it measures a shape once, and that the loops read either layout
on either library right (helpers.PATHS runs every graph with the weights read transposed on NumPy's
BLAS too).
"""

from __future__ import annotations

import numpy as np
import pytest

from unrolled.engines.compiled.kernels import blas, layouts, onednn
from unrolled.engines.compiled.rowsplit import products_as_in_a_part

Kernel = layouts.Kernel


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(layouts, "_choices", {})


def test_another_kernel_is_taken_only_when_it_wins_clearly():
    default = [1.0, 1.0, 1.0, 1.0, 1.0]
    assert layouts.choose([default, [0.5, 0.6, 0.9, 0.7, 1.2]]) == 1  # median ratio 0.7
    assert layouts.choose([default, [0.97, 0.96, 0.98, 0.9, 1.0]]) == 0  # within the margin: the default
    assert layouts.choose([default, [1.3, 1.2, 1.1, 1.0, 0.5]]) == 0  # one lucky round decides nothing
    assert layouts.choose([default, [0.8] * 5, [0.6] * 5, [0.9] * 5]) == 2  # the fastest of several
    assert layouts.choose([default]) == 0


def test_numpy_blas_is_a_candidate_only_where_both_run_on_one_thread():
    assert layouts.candidates(False) == [Kernel(False, False), Kernel(True, False)]
    assert layouts.candidates(True) == [Kernel(False, False), Kernel(True, False),
                                        Kernel(False, True), Kernel(True, True)]


def test_small_products_and_float64_are_not_measured(monkeypatch):
    monkeypatch.setattr(layouts, "_measure", lambda *a: pytest.fail("measured"))
    assert layouts.step_kernel(2, 3, 4, np.float32) == layouts.DEFAULT  # below onednn.SMALL
    assert layouts.step_kernel(64, 512, 2048, np.float64) == layouts.DEFAULT  # never oneDNN's
    assert layouts.chosen() == {}


def test_a_shape_is_measured_once_per_thread_setting(monkeypatch):
    if onednn.SGEMM is None:
        pytest.skip("oneDNN is not loaded: nothing is measured")
    calls = []

    def measure(rows, inner, cols, dtype, kernels):
        calls.append((rows, inner, cols, len(kernels)))
        return [[1.0] * layouts.ROUNDS] + [[0.5] * layouts.ROUNDS] * (len(kernels) - 1)

    monkeypatch.setattr(layouts, "_measure", measure)
    monkeypatch.setattr(onednn, "threads", lambda: 2)
    assert layouts.step_kernel(64, 512, 2048, np.float32) == Kernel(True, False)
    assert layouts.step_kernel(64, 512, 2048, np.float32) == Kernel(True, False)
    assert calls == [(64, 512, 2048, 2)]  # oneDNN on two threads: its two layouts only
    assert layouts.chosen() == {(64, 512, 2048, "<f4", 2, False): Kernel(True, False)}
    monkeypatch.undo()
    if blas.THREAD_COUNT is None or blas.GEMM is None:
        return
    def numpy_straight_fastest(rows, inner, cols, dtype, kernels):
        calls.append((rows, inner, cols, len(kernels)))
        return [[1.0 if k != Kernel(False, True) else 0.4] * layouts.ROUNDS for k in kernels]

    monkeypatch.setattr(layouts, "_choices", {})
    monkeypatch.setattr(layouts, "_measure", numpy_straight_fastest)
    with products_as_in_a_part():  # as in a row split's part: NumPy's BLAS is measured too
        assert layouts.step_kernel(64, 512, 2048, np.float32) == Kernel(False, True)
    assert calls[-1] == (64, 512, 2048, 4)


def test_measuring_times_every_kernel_in_turns():
    if onednn.SGEMM is None:
        pytest.skip("oneDNN is not loaded")
    kernels = layouts.candidates(blas.GEMM is not None)
    with products_as_in_a_part():
        times = layouts._measure(64, 128, 512, np.dtype(np.float32), kernels)
    assert len(times) == len(kernels)
    assert all(len(ts) == layouts.ROUNDS and all(t > 0 for t in ts) for ts in times)
