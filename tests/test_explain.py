"""engine.explain(T, B, dtype): which strategy a run takes, and why, read from the engine's own decision."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import elman, make_inputs, make_params

from unrolled import make_engine
from unrolled.engines.compiled import loops, rowsplit
from unrolled.engines.compiled.engine import CompiledEngine

BIG = 10_000  # rows enough to take Elman's small steps past WHOLE_AUTO_MACS


def _strategies_line(text: str) -> set[str]:
    """The strategies the first line of ``explain`` names."""
    return {s.strip() for s in text.splitlines()[0].rsplit(":", 1)[1].split(",")}


def test_small_batch_takes_the_whole_run_function(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setenv("UNROLLED_JIT", "1")
    eng = make_engine(elman())
    text = eng.explain(20, 1, np.float32)
    assert _strategies_line(text) == {"whole"} == eng.strategies(20, 1, np.float32)
    assert "- the whole-run function: 1 rows x" in text and "<= WHOLE_AUTO_MACS" in text


def test_large_batch_takes_a_loop_and_says_the_whole_run_is_too_big(monkeypatch):
    monkeypatch.setenv("UNROLLED_JIT", "1")
    eng = make_engine(elman())
    text = eng.explain(20, BIG, np.float64)
    assert _strategies_line(text) == eng.strategies(20, BIG, np.float64)
    try:
        import numba  # noqa: F401
    except ImportError:
        assert "NumPy loop" in text and "Numba is not installed" in text
    else:
        assert "not the whole-run function" in text and "> WHOLE_AUTO_MACS" in text
        assert f"Numba loop, {BIG} rows" in text and "numba_loop" in _strategies_line(text)
    assert "rows not split: float64" in text


def test_jit_off_says_numpy_loop_and_why(monkeypatch):
    monkeypatch.setenv("UNROLLED_JIT", "0")
    eng = make_engine(elman())
    text = eng.explain(20, 1, np.float32)
    assert _strategies_line(text) == {"numpy_loop"} == eng.strategies(20, 1, np.float32)
    assert "- not the whole-run function: UNROLLED_JIT=0 turns Numba off" in text
    assert "- NumPy loop, 1 rows: UNROLLED_JIT=0 turns Numba off" in text
    assert "- no fused kernels: UNROLLED_JIT=0 turns Numba off" in text


def test_an_op_the_whole_run_function_lacks_is_named(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setenv("UNROLLED_JIT", "1")
    g = elman()
    g.output(g.softmax(g.vertices["y"], name="p"))
    eng = make_engine(g)
    text = eng.explain(20, 1, np.float32)
    assert "whole" not in eng.strategies(20, 1, np.float32)
    assert "- not the whole-run function: the whole-run function cannot run softmax" in text


def test_chunks_and_their_cause_are_named(monkeypatch):
    monkeypatch.setenv("UNROLLED_JIT", "0")
    eng = CompiledEngine(elman(), chunk_steps=3)
    text = eng.explain(10, 4, np.float64)
    assert "chunked" in _strategies_line(text) and "- chunks of 3 of 10 steps: chunk_steps=3" in text
    monkeypatch.setattr(loops, "CHUNK_BYTES", 1)
    monkeypatch.setattr(loops, "CHUNK_ROWS", 8)
    text = CompiledEngine(elman()).explain(10, 4, np.float64)
    assert "- chunks of 2 of 10 steps: a weight product needs CHUNK_ROWS (8) rows, 2 steps of 4" in text
    monkeypatch.setattr(loops, "CHUNK_ROWS", 1)
    text = CompiledEngine(elman()).explain(10, 4, np.float64)
    assert "- chunks of 1 of 10 steps: CHUNK_BYTES (1 bytes)" in text


def test_run_follows_the_route_explain_prints(monkeypatch):
    """The run asks route() and nothing else: a route to the whole-run function is taken."""
    pytest.importorskip("numba")
    monkeypatch.setenv("UNROLLED_JIT", "1")
    g = elman()
    eng = CompiledEngine(g)
    rng = np.random.default_rng(0)
    taken = []
    real = eng.whole.run
    monkeypatch.setattr(eng.whole, "run", lambda *a: taken.append(1) or real(*a))
    eng.run(make_params(g, rng), make_inputs(g, 3, 2, rng))
    assert eng.route(2, np.float64).whole and taken == [1]


def test_unsplit_reason_matches_parts():
    """A reason exactly when rowsplit.parts declines to split: one rule, two answers."""
    for B in (1, 15, 31, 32, 64, 500):
        for dtype in (np.float32, np.float64):
            for threads in ("auto", 1, 2, 8):
                split = rowsplit.parts(B, dtype, threads)
                why = rowsplit.unsplit_reason(B, dtype, threads)
                assert (split is None) == (why is not None), (B, dtype, threads, why)
    assert "float64" in rowsplit.unsplit_reason(500, np.float64)


def test_reference_engine_has_one_strategy():
    text = make_engine(elman(), "reference").explain(5, 3)
    assert text.startswith("reference engine, graph 'elman', 5 steps x 3 rows") and "DAG" in text


@pytest.mark.parametrize("value", ["fuse", "no", ""])
def test_an_unknown_unrolled_jit_value_is_refused_with_what_to_use(monkeypatch, value):
    """UNROLLED_JIT=fuse once chose the NumPy loops with fused kernels; read as 1 it would silently
    run something else, so every value but 0 and 1 stops the engine with the two it takes."""
    monkeypatch.setenv("UNROLLED_JIT", value)
    with pytest.raises(ValueError, match=r"UNROLLED_JIT=.*use 0 .* or 1 .*jit='fuse'"):
        CompiledEngine(elman())


def test_each_step_product_says_which_layout_of_its_weight_it_reads(monkeypatch):
    """The layouts the Numba loop's step products read (kernels/layouts.py), as measured for the
    run's own rows and product threads: here a measurement that finds the transposed view faster."""
    pytest.importorskip("numba")
    from unrolled.engines.compiled.kernels import layouts, onednn

    monkeypatch.setenv("UNROLLED_JIT", "1")
    monkeypatch.setattr(layouts, "_choices", {})
    monkeypatch.setattr(layouts, "_measure", lambda *shape: [[1.0] * layouts.ROUNDS, [0.5] * layouts.ROUNDS]
                        + [[0.9] * layouts.ROUNDS] * (len(shape[-1]) - 2))
    text = make_engine(_wide_elman()).explain(20, BIG, np.float32)
    lines = [line for line in text.splitlines() if "step products of" in line]
    assert len(lines) == 1, text
    if onednn.SGEMM is None:  # nothing reaches oneDNN: nothing is timed, the copies are read
        assert "forward reads its transposed copy, backward W as kept" in lines[0]
    else:
        assert "forward reads W through a transposed view, backward the copy through a transposed view" in lines[0]
        threads = 1 if "row_split" in _strategies_line(text) else onednn.threads()
        assert {key[-2] for key in layouts.chosen()} == {threads}


def test_a_step_product_on_numpy_blas_says_so(monkeypatch):
    """Where the rows split, each part's products run on one thread, and NumPy's BLAS is measured
    too: here a measurement that finds it faster in the kept layout."""
    pytest.importorskip("numba")
    from unrolled.engines.compiled.kernels import layouts, onednn

    monkeypatch.setenv("UNROLLED_JIT", "1")
    monkeypatch.setattr(layouts, "_choices", {})
    monkeypatch.setattr(layouts, "_measure", lambda *shape: [[1.0] * layouts.ROUNDS] * (len(shape[-1]) - 1)
                        + [[0.5] * layouts.ROUNDS])
    text = make_engine(_wide_elman()).explain(20, BIG, np.float32)
    line = next(line for line in text.splitlines() if "step products of" in line)
    if onednn.SGEMM is None or "row_split" not in _strategies_line(text):
        pytest.skip("no row split here: NumPy's BLAS is not a candidate")
    assert ("forward reads W through a transposed view on NumPy's BLAS, backward the copy through a "
            "transposed view on NumPy's BLAS") in line


def _wide_elman(hidden: int = 64):
    """An Elman network whose step products are large enough to reach oneDNN at BIG rows."""
    from unrolled.graph.folded import Graph
    from unrolled.models import cells

    g = Graph("wide")
    h = cells.elman(g, g.input("x", 8), hidden)
    g.output(h)
    g.loss("mse", h, g.input("target", hidden), name="loss")
    return g
