"""kernels/layouts.py: which layout of a weight the step products read, and that both give one answer.

The choice is a measurement, so what is tested is the rule that turns timings into a choice, when
it measures at all, that it measures a shape once, and that the loops read either layout right
(helpers.PATHS runs every graph with the weights read transposed too).
"""

from __future__ import annotations

import numpy as np
import pytest

from unrolled.engines.compiled.kernels import layouts, onednn


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(layouts, "_choices", {})


def test_the_transposed_view_is_taken_only_when_it_wins_clearly():
    copy = [1.0, 1.0, 1.0, 1.0, 1.0]
    assert layouts.choose(copy, [0.5, 0.6, 0.9, 0.7, 1.2])  # median ratio 0.7
    assert not layouts.choose(copy, [0.97, 0.96, 0.98, 0.9, 1.0])  # within the margin: keep the copy
    assert not layouts.choose(copy, [1.3, 1.2, 1.1, 1.0, 0.5])  # one lucky round decides nothing


def test_small_products_and_float64_are_not_measured(monkeypatch):
    monkeypatch.setattr(layouts, "_measure", lambda *a: pytest.fail("measured"))
    assert layouts.reads_transposed(2, 3, 4, np.float32) is False  # below onednn.SMALL
    assert layouts.reads_transposed(64, 512, 2048, np.float64) is False  # never oneDNN's
    assert layouts.chosen() == {}


def test_a_shape_is_measured_once(monkeypatch):
    if onednn.SGEMM is None:
        pytest.skip("oneDNN is not loaded: nothing is measured")
    calls = []

    def measure(rows, inner, cols, dtype):
        calls.append((rows, inner, cols))
        return [1.0] * layouts.ROUNDS, [0.5] * layouts.ROUNDS

    monkeypatch.setattr(layouts, "_measure", measure)
    assert layouts.reads_transposed(64, 512, 2048, np.float32)
    assert layouts.reads_transposed(64, 512, 2048, np.float32)
    assert calls == [(64, 512, 2048)]
    assert layouts.chosen() == {(64, 512, 2048, "<f4", onednn.threads()): True}


def test_measuring_times_both_layouts_in_turns():
    if onednn.SGEMM is None:
        pytest.skip("oneDNN is not loaded")
    straight, transposed = layouts._measure(64, 128, 512, np.dtype(np.float32))
    assert len(straight) == len(transposed) == layouts.ROUNDS
    assert all(t > 0 for t in straight + transposed)
