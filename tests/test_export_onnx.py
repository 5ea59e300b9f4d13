"""ONNX export of any graph: ONNX Runtime must give the reference engine's outputs and final states.

Every model passes ``onnx.checker`` (``to_onnx`` runs it); float32 outputs
and final states agree with ``reference.run(..., backward=False)`` to 1e-5,
for T in {1, 7, 50} and B in {1, 4}, from the default initial states and
from given ones. ``unrolled evaluate --onnx`` prints the checkpoint's figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from helpers import GRAPHS, make_init_states, make_inputs, make_params  # noqa: E402
from test_engine_agreement import cyclic_graphs  # noqa: E402

import unrolled  # noqa: E402
from unrolled.charlm.model import load_model  # noqa: E402
from unrolled.cli import main  # noqa: E402
from unrolled.engines.reference import run as reference_run  # noqa: E402
from unrolled.export.onnx import FINAL_PREFIX, INIT_PREFIX, OnnxRunner, export_onnx, to_onnx  # noqa: E402
from unrolled.graph import ops  # noqa: E402
from unrolled.graph.folded import Graph  # noqa: E402

TOL = 1e-5
TOL_FLOAT64 = 1e-9  # random graphs, 50 steps (test_random_graphs_match_the_engine)
SRC = str(Path(unrolled.__file__).parents[1])  # the tree under test, for a subprocess
NAMED = ["elman", "jordan", "lstm", "gru", "lstm_stack2", "delay2", "delay3_and_1", "learned_init_delay2",
         "given_init_delay2", "embedding", "one_hot", "input_delay"]
_MODELS: dict[str, tuple] = {}


def _exported(name: str):
    """One graph, its float32 parameters and its model in ONNX Runtime, built once for every T and B."""
    if name not in _MODELS:
        g = GRAPHS[name]()
        params = make_params(g, np.random.default_rng(len(name)), np.float32)
        _MODELS[name] = g, params, OnnxRunner(to_onnx(g, params))
    return _MODELS[name]


def assert_same_as_engine(g: Graph, params, runner: OnnxRunner, T: int, B: int, seed: int, every_state: bool,
                          dtype=np.float32, tol: float = TOL):
    rng = np.random.default_rng(seed)
    inputs = make_inputs(g, T, B, rng, dtype)
    init = make_init_states(g, B, rng, every=every_state, dtype=dtype)
    want = reference_run(g, params, inputs, init_states=init, backward=False)
    outputs, finals = runner.run(inputs, init)
    assert set(outputs) == set(want.outputs) and set(finals) == set(want.final_states)
    for ours, theirs in ((outputs, want.outputs), (finals, want.final_states)):
        for name, a in theirs.items():
            assert ours[name].shape == a.shape, name
            np.testing.assert_allclose(ours[name], a, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("T", [1, 7, 50])
@pytest.mark.parametrize("name", NAMED)
def test_onnx_runtime_matches_the_engine(name, T, B):
    g, params, runner = _exported(name)
    assert_same_as_engine(g, params, runner, T, B, seed=T * 10 + B, every_state=False)
    assert_same_as_engine(g, params, runner, T, B, seed=T * 10 + B + 1, every_state=True)


@pytest.mark.parametrize("name", ["lstm", "one_hot", "embedding", "delay3_and_1"])
def test_float64_models_match_the_engine_closely(name):
    g = GRAPHS[name]()
    params = make_params(g, np.random.default_rng(3), np.float64)
    rng = np.random.default_rng(4)
    inputs = make_inputs(g, 7, 4, rng)
    init = make_init_states(g, 4, rng, every=True)
    want = reference_run(g, params, inputs, init_states=init, backward=False)
    outputs, finals = OnnxRunner(to_onnx(g, params)).run(inputs, init)
    for name, a in want.outputs.items():
        np.testing.assert_allclose(outputs[name], a, rtol=1e-12, atol=1e-12)
    for name, a in want.final_states.items():
        np.testing.assert_allclose(finals[name], a, rtol=1e-12, atol=1e-12)


@settings(max_examples=int(os.environ.get("UNROLLED_EXAMPLES", 5)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(g=cyclic_graphs(), T=st.sampled_from([1, 7, 50]), B=st.sampled_from([1, 4]), seed=st.integers(0, 2**16),
       every_state=st.booleans())
def test_random_graphs_match_the_engine(g, T, B, seed, every_state):
    """In float64: a random recurrence may be chaotic, and over 50 steps it amplifies float32's
    rounding, which differs between the two runtimes, beyond any tolerance that still tests; the
    named models above hold float32. A recurrence may also grow without bound (a state fed its own
    square): the reference engine then stops at the overflow, and there is nothing to compare."""
    params = make_params(g, np.random.default_rng(seed), np.float64)
    try:
        assert_same_as_engine(g, params, OnnxRunner(to_onnx(g, params)), T, B, seed, every_state,
                              np.float64, TOL_FLOAT64)
    except RuntimeError as e:
        if "overflow encountered" not in str(e):
            raise
        reject()


def test_interface_names_inputs_states_and_outputs(tmp_path):
    g, params, _ = _exported("learned_init_delay2")
    path = tmp_path / "m.onnx"
    model = export_onnx(g, params, path)
    assert path.stat().st_size > 0
    main = model.graph
    assert [i.name for i in main.input] == ["x", INIT_PREFIX + "h"]  # the loss's target is not an input
    assert {o.name for o in main.output} == {"y", FINAL_PREFIX + "h"}
    assert [n.op_type for n in main.node].count("Scan") == 1
    runner = OnnxRunner(path)
    assert runner.states == {"h": 2}
    # the learned initial state is the default: a run without init_states starts from it
    x = np.random.default_rng(0).normal(size=(3, 2, 3)).astype(np.float32)
    want = reference_run(g, params, {"x": x, "target": np.zeros((3, 2), dtype=np.int64)}, backward=False)
    outputs, _ = runner.run({"x": x})
    np.testing.assert_allclose(outputs["y"], want.outputs["y"], rtol=TOL, atol=TOL)


def test_the_documented_library_call_exports_any_graph(tmp_path):
    """README and docs/export.md: ``unrolled.export.export_onnx(graph, params, path)``."""
    import unrolled.export

    g, params, _ = _exported("gru")
    unrolled.export.export_onnx(g, params, tmp_path / "gru.onnx")
    assert_same_as_engine(g, params, unrolled.export.OnnxRunner(tmp_path / "gru.onnx"), 7, 4, seed=9,
                          every_state=True)


def test_final_states_carry_into_the_next_chunk():
    """Two chunks with the state carried through ONNX equal one run over both."""
    g, params, runner = _exported("delay3_and_1")
    rng = np.random.default_rng(5)
    inputs = make_inputs(g, 9, 2, rng, np.float32)
    first = {k: v[:4] for k, v in inputs.items()}
    second = {k: v[4:] for k, v in inputs.items()}
    _, state = runner.run(first)
    outputs, finals = runner.run(second, state)
    whole = reference_run(g, params, inputs, backward=False)
    np.testing.assert_allclose(outputs["y"], whole.outputs["y"][4:], rtol=TOL, atol=TOL)
    np.testing.assert_allclose(finals["h"], whole.final_states["h"], rtol=TOL, atol=TOL)


def test_an_op_without_a_rule_names_the_vertex_and_the_op(monkeypatch):
    g, params, _ = _exported("gru")
    monkeypatch.setitem(ops.OPS, "one_minus", dataclasses.replace(ops.OPS["one_minus"], onnx=None))
    with pytest.raises(ValueError, match=r"vertex '1mz' = one_minus\(\.\.\.\) cannot be exported: op 'one_minus' "
                                         r"has no ONNX rule"):
        to_onnx(g, params)


def test_every_op_has_a_rule():
    assert [name for name, op in ops.OPS.items() if op.onnx is None] == []


def test_a_loss_feeding_an_output_is_exported():
    g = Graph("loss_out")
    x = g.input("x", 3)
    h = g.state("h", 3)
    g.tanh(g.linear(g.param("W", (3, 6)), g.concat(x, h.prev), g.param("b", (3,))), name="h")
    loss = g.loss("cross_entropy", h, g.index_input("t", 3), name="xent")
    g.output(loss.vertex)
    params = make_params(g, np.random.default_rng(1), np.float32)
    assert_same_as_engine(g, params, OnnxRunner(to_onnx(g, params)), 5, 3, seed=2, every_state=True)


# ------------------------------------------------------- the character model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx_lm")
    text = folder / "train.txt"
    text.write_text("the cat sat on a mat and the dog ran to the red barn\n" * 8)
    run = folder / "run"
    assert main(["train", str(text), "--engine", "reference", "--hidden", "8", "--layers", "2", "--seq", "7",
                 "--batch", "3", "--lr", "0.02", "--steps", "4", "--sample-every", "0", "--out", str(run)]) == 0
    model = folder / "model.onnx"
    assert main(["export", str(run), "-o", str(model)]) == 0
    return text, run, model


def bits_line(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("bits/char"))


def test_evaluate_onnx_prints_the_checkpoints_figures(trained, capsys, tmp_path):
    text, run, model = trained
    other = tmp_path / "other.txt"
    other.write_text("a red cat ran to the barn; the dog sat!\n")  # '!' and ';' are not in the vocabulary
    for file in (text, other):
        ours = bits_line(capsys, ["evaluate", str(run), str(file)])
        assert bits_line(capsys, ["evaluate", "--onnx", str(model), str(file)]) == ours
        assert bits_line(capsys, ["evaluate", "--onnx", str(model), str(file), "--seq", "5", "--batch", "2"]) == \
            bits_line(capsys, ["evaluate", str(run), str(file), "--seq", "5", "--batch", "2"])


def test_the_vocabulary_travels_in_the_metadata(trained):
    _, run, model = trained
    meta = OnnxRunner(model).metadata
    assert json.loads(meta["unrolled.vocabulary"]) == load_model(run).vocabulary


def one_line_error(capsys, argv, rc=1) -> str:
    capsys.readouterr()
    assert main(argv) == rc
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_evaluate_onnx_refuses_what_it_cannot_score(trained, capsys, tmp_path):
    text, run, model = trained
    assert "not both" in one_line_error(capsys, ["evaluate", str(run), str(text), "--onnx", str(model)], rc=2)
    g, params, _ = _exported("elman")
    export_onnx(g, params, tmp_path / "g.onnx")
    assert "is not a language model exported by 'unrolled export'" in one_line_error(
        capsys, ["evaluate", "--onnx", str(tmp_path / "g.onnx"), str(text)])
    assert "is not an ONNX model" in one_line_error(capsys, ["evaluate", "--onnx", str(text), str(text)])


def test_without_the_extra_the_command_names_it(trained, capsys, monkeypatch, tmp_path):
    _, run, _ = trained
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    err = one_line_error(capsys, ["export", str(run), "-o", str(tmp_path / "m.onnx")])
    assert err.endswith('pip install "unrolled[export]"')


def test_the_core_imports_without_the_extra():
    code = ("import sys\n"
            "for m in ('onnx', 'onnxruntime', 'safetensors'): sys.modules[m] = None\n"
            "import unrolled, unrolled.charlm.model, unrolled.cli, unrolled.export.onnx, unrolled.export.charmodel\n"
            "from unrolled.export import export_onnx, to_onnx, OnnxRunner\n"
            "from unrolled.cli import build_parser; build_parser()\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ | {"PYTHONPATH": SRC})


def test_bad_feeds_are_one_sentence():
    g, params, runner = _exported("elman")
    x = np.zeros((3, 2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="init_states names 'nope', which the model does not carry; its states are h"):
        runner.run({"x": x}, {"nope": np.zeros((2, 4), dtype=np.float32)})
    with pytest.raises(ValueError, match="ONNX Runtime refused the feeds"):
        runner.run({"x": x}, {"h": np.zeros((2, 5), dtype=np.float32)})


def test_softplus_and_exp_are_exported():
    """Ops added by one table entry each (ops.py) export through their entries' ONNX rules."""
    g = Graph("softplus_exp")
    x, h = g.input("x", 3), g.state("h", 3)
    a = g.linear(g.param("W", (3, 6)), g.concat(x, h.prev), g.param("b", (3,)))
    g.tanh(g.sub(g.softplus(a), g.exp(g.scale(h.prev, -1.0))), name="h")
    g.output(g.exp(g.scale(h, 0.5), name="y"))
    params = make_params(g, np.random.default_rng(1), np.float32)
    assert_same_as_engine(g, params, OnnxRunner(to_onnx(g, params)), 5, 3, seed=2, every_state=True)
