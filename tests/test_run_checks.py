"""What an engine run refuses at its entry, with a sentence, in both engines alike.

Non-finite values and negative masks (scanned once per run, skippable with
``check_finite=False``), parameters given as lists, ``None`` or under unknown
names, a graph changed after its engine was made, and the graph-building
mistakes met while writing odd graphs (a delay named after a state, a given
initial state nothing reads). Each case is run through the reference engine
and the compiled one; a parameter list also through the compiled engine's
whole-run function, where it used to fail inside Numba.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from helpers import GRAPHS, make_init_states, make_inputs, make_params

from unrolled.engines.compiled.engine import CompiledEngine
from unrolled.engines.reference import run as reference_run
from unrolled.engines.registry import available_engines, make_engine
from unrolled.engines.runio import scan_arrays
from unrolled.graph.folded import Graph

ENGINES = available_engines()
T, B = 4, 2


def _engines(g: Graph) -> list:
    """Every engine, and the whole-run function where Numba is installed (the path a list once broke)."""
    out = [make_engine(g, name) for name in ENGINES]
    if importlib.util.find_spec("numba") is not None:
        out.append(CompiledEngine(g, whole=True))
    return out


def _run_kw(g: Graph, rng) -> tuple[dict, dict]:
    """The parameters and everything else one run of ``g`` takes, each array given."""
    params = make_params(g, rng)
    kw = {"inputs": make_inputs(g, T, B, rng), "init_states": make_init_states(g, B, rng, every=True),
          "masks": {l.name: np.ones((T, B)) for l in g.losses}}
    return params, kw


# ------------------------------------------------------------------ NaN, inf, negative masks


def _poison(what: str, params: dict, kw: dict) -> None:
    """Put one bad value into the named array, at a place the expected message gives."""
    if what == "param":
        params["W"] = params["W"].copy()
        params["W"][1, 2] = np.nan
    elif what == "input":
        kw["inputs"]["x"][2, 1, 0] = np.inf
    elif what == "init":
        kw["init_states"]["h"][1, 3] = -np.inf
    elif what == "mask-nan":
        kw["masks"]["xent"][3, 0] = np.nan
    elif what == "mask-negative":
        kw["masks"]["xent"][1, 1] = -0.5
    elif what == "output-grad":
        kw["output_grads"] = {"y": np.zeros((T, B, 3))}
        kw["output_grads"]["y"][0, 1, 2] = np.nan
    elif what == "final-state-grad":
        kw["final_state_grads"] = {"h": np.zeros((B, 4))}
        kw["final_state_grads"]["h"][1, 0] = np.inf


BAD_VALUES = {
    "param": r"parameter 'W' holds nan at \[1, 2\]: a run needs finite values \(check_finite=False skips",
    "input": r"input 'x' holds inf at \[2, 1, 0\] \(\[t, b, feature\]\): a run needs finite values",
    "init": r"init_states\['h'\] holds -inf at \[1, 3\] \(\[b, feature\]\)",
    "mask-nan": r"mask of loss 'xent' holds nan at \[3, 0\] \(\[t, b\]\): .*use finite weights of 0 or more",
    "mask-negative": r"mask of loss 'xent' holds -0.5 at \[1, 1\] \(\[t, b\]\): .*use finite weights of 0 or more",
    "output-grad": r"output_grads\['y'\] holds nan at \[0, 1, 2\] \(\[t, b, feature\]\)",
    "final-state-grad": r"final_state_grads\['h'\] holds inf at \[1, 0\] \(\[b, feature\]\)",
}


def _engine(g: Graph, index: int):
    """The ``index``-th of :func:`_engines`; the whole-run function's, which looks for bad values in
    its own compiled pass, is skipped without Numba."""
    engines = _engines(g)
    if index >= len(engines):
        pytest.skip("Numba is not installed: no whole-run function")
    return engines[index]


@pytest.mark.parametrize("engine", range(3))
@pytest.mark.parametrize("what", sorted(BAD_VALUES))
def test_a_bad_value_is_named_with_its_place(engine, what, rng):
    g = GRAPHS["elman"]()
    params, kw = _run_kw(g, rng)
    _poison(what, params, kw)
    with pytest.raises(ValueError, match=BAD_VALUES[what]):
        _engine(g, engine).run(params, **kw)


@pytest.mark.parametrize("engine", range(3))
def test_check_finite_false_skips_the_scan(engine, rng):
    """The run goes ahead and the NaN flows through, as it would with no check at all."""
    g = GRAPHS["elman"]()
    params, kw = _run_kw(g, rng)
    _poison("param", params, kw)
    with np.errstate(all="ignore"):
        r = _engine(g, engine).run(params, check_finite=False, **kw)
    assert np.isnan(r.loss) and np.isnan(r.grads["W"]).all()


def test_the_whole_run_function_finds_a_bad_value_after_good_runs(rng):
    """Its own pass is what refuses: a clean run, then one with an infinity in the last entry of an
    input, then a clean one again (the flag of the refused run does not stick)."""
    pytest.importorskip("numba")
    g = GRAPHS["elman"]()
    engine = CompiledEngine(g, whole=True)
    params, kw = _run_kw(g, rng)
    first = engine.run(params, **kw)
    bad = {**kw, "inputs": {k: v.copy() for k, v in kw["inputs"].items()}}
    bad["inputs"]["x"][-1, -1, -1] = np.inf
    with pytest.raises(ValueError, match=r"input 'x' holds inf at \[3, 1, 2\]"):
        engine.run(params, **bad)
    assert engine.run(params, **kw).loss == first.loss


@pytest.mark.parametrize("engine", ENGINES)
def test_masks_are_checked_even_without_the_scan(engine, rng):
    g = GRAPHS["elman"]()
    params, kw = _run_kw(g, rng)
    _poison("mask-negative", params, kw)
    with pytest.raises(ValueError, match=BAD_VALUES["mask-negative"]):
        make_engine(g, engine).run(params, check_finite=False, **kw)


@pytest.mark.parametrize("engine", ENGINES)
def test_large_finite_values_and_index_inputs_pass(engine, rng):
    """The scan refuses only NaN and infinities: 1e300 is a number, and index inputs are not read."""
    g = GRAPHS["embedding"]()
    params, kw = _run_kw(g, rng)
    masks = {l.name: np.full((T, B), 1e300) for l in g.losses}
    r = make_engine(g, engine).run(params, **dict(kw, masks=masks))
    assert np.isfinite(r.loss)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_scan_names_every_nonfinite_value_and_passes_overflowing_squares(dtype):
    """The scan reads an array once, through its dot product with itself: values whose squares
    overflow (1e30 in float32, 1e200 in float64) still pass, and a NaN, an infinity or a negative
    infinity anywhere is named at its place."""
    big = 1e30 if dtype == np.float32 else 1e200
    scan_arrays({"W": np.full((3, 4), big, dtype=dtype), "b": np.array([-big, big], dtype=dtype)})
    for bad in (np.nan, np.inf, -np.inf):
        for at in [(0, 0), (2, 3), (1, 2)]:
            W = np.full((3, 4), 0.5, dtype=dtype)
            W[at] = bad
            with pytest.raises(ValueError, match=rf"parameter 'W' holds {bad} at \[{at[0]}, {at[1]}\]"):
                scan_arrays({"W": W})


# ------------------------------------------------------------------ parameters: lists, None, names


@pytest.mark.parametrize("engine", range(3))
def test_parameters_given_as_lists_run_as_arrays(engine, rng):
    g = GRAPHS["elman"]()
    engines = _engines(g)
    if engine >= len(engines):
        pytest.skip("Numba is not installed: no whole-run function")
    assert engine < 2 or engines[engine].uses_whole(B)
    params, kw = _run_kw(g, rng)
    want = reference_run(g, params, **kw)
    got = engines[engine].run({k: v.tolist() for k, v in params.items()}, **kw)
    assert abs(got.loss - want.loss) <= 1e-10 * abs(want.loss)
    for k in params:
        np.testing.assert_allclose(got.grads[k], want.grads[k], rtol=1e-9, atol=1e-12)


BAD_PARAMS = {
    "none": (lambda p: None, TypeError,
             r"params=None, but graph 'elman' has parameters W, b, out.V, out.c: pass params=graph.init_params\(\)"),
    "a list of arrays": (lambda p: list(p.values()), TypeError,
                         r"params is a list; pass a dict of arrays by parameter name"),
    "unknown name": (lambda p: dict(p, Wx=p["W"]), ValueError,
                     r"no parameter named 'Wx' in graph 'elman'; its parameters are W, b, out.V, out.c"),
    "integer list": (lambda p: dict(p, b=[1, 2, 3, 4]), ValueError,
                     r"parameter 'b' holds int64; use float32 or float64"),
    "list of the wrong shape": (lambda p: dict(p, b=[1.0, 2.0]), ValueError,
                                r"parameter 'b' is \[2\] but the graph says \[4\]"),
    "ragged list": (lambda p: dict(p, W=[[1.0, 2.0], [3.0]]), ValueError,
                    r"parameter 'W' is not a rectangular array of numbers .*; pass a NumPy array"),
    "strings": (lambda p: dict(p, b=["1", "2", "3", "4"]), ValueError,
                r"parameter 'b' holds <U1 values, not numbers"),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_parameters_get_one_sentence(engine, case, rng):
    g = GRAPHS["elman"]()
    params, kw = _run_kw(g, rng)
    change, error, match = BAD_PARAMS[case]
    with pytest.raises(error, match=match):
        make_engine(g, engine).run(change(params), **kw)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_graph_without_parameters_takes_params_none(engine):
    g = Graph("free")
    x = g.input("x", 2)
    g.output(g.tanh(g.add(x, g.state("h", 2).prev), name="h"))
    r = make_engine(g, engine).run(None, {"x": np.ones((3, 1, 2))})
    np.testing.assert_allclose(r.outputs["h"][:, 0, 0], np.tanh([1.0, 1 + np.tanh(1.0), 1 + np.tanh(1 + np.tanh(1.0))]))


# ------------------------------------------------------------------ a graph changed after make_engine


def _small() -> tuple[Graph, dict, dict]:
    g = Graph("g")
    x = g.input("x", 2)
    h = g.state("h", 2)
    g.tanh(g.matmul(g.param("W", (2, 4)), g.concat(x, h.prev)), name="h")
    y = g.output(g.matmul(g.param("V", (2, 2)), h, name="y"))
    g.loss("mse", y, g.input("goal", 2), name="l1")
    rng = np.random.default_rng(0)
    return g, g.init_params(0), {"x": rng.normal(size=(3, 2, 2)), "goal": rng.normal(size=(3, 2, 2))}


CHANGES = {
    "a new loss": (lambda g: g.loss("mse", g.vertices["h"], g.vertices["goal"], name="l2", reduce="sum"),
                   r"added loss 'l2'"),
    "a new output": (lambda g: g.output(g.tanh("y", name="z")), r"added vertex 'z'; added output 'z'"),
    "a new initial-state mode": (lambda g: g.set_init(g.vertices["h"], "learned"),
                                 r"added parameter 'h.init'.*added initial state 'h: init=learned'"),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_graph_changed_after_make_engine_is_refused_by_both(engine, change):
    g, params, inputs = _small()
    eng = make_engine(g, engine)
    before = eng.run(params, inputs)
    edit, what = CHANGES[change]
    edit(g)
    with pytest.raises(ValueError, match=rf"graph 'g' changed after its engine was made \({what}.*\): "
                                         rf".*make a new one with make_engine\(graph\)"):
        eng.run(g.init_params(0), inputs)
    # a new engine runs the changed graph, and agrees with the reference engine on it
    params = g.init_params(0)
    now = make_engine(g, engine).run(params, inputs)
    want = reference_run(g, params, inputs)
    assert abs(now.loss - want.loss) <= 1e-10 * abs(want.loss)
    if change == "a new loss":
        assert now.loss > before.loss


# ------------------------------------------------------------------ graph-building mistakes


def test_a_delay_named_after_a_state_says_what_to_write():
    g = Graph("s")
    x = g.input("x", 2)
    g.state("h", 2)
    with pytest.raises(ValueError, match=r"g.delay\(x, 1, name='h'\) cannot define state 'h': .* read with "
                                         r"h.prev; .* write g.identity\(g.delay\(x, 1\), name='h'\)"):
        g.delay(x, 1, name="h")
    g.output(g.identity(g.delay(x, 1), name="h"))  # what the message says: a state holding x one step ago
    xs = np.arange(6.0).reshape(3, 1, 2)
    for engine in ENGINES:
        h = make_engine(g, engine).run({}, {"x": xs}).outputs["h"]
        np.testing.assert_allclose(h, [[[0, 0]], [[0, 1]], [[2, 3]]])


def test_a_given_initial_state_nothing_reads_is_refused_at_check():
    g = Graph("unread")
    x = g.input("x", 2)
    g.state("h", 2, init="given")
    g.tanh(x, name="h")
    g.output(g.vertices["h"])
    with pytest.raises(ValueError, match=r"state 'h' has init='given' but no delay reads it, .*read it through "
                                         r"a delay \(h.prev\) or drop init='given'"):
        g.check()
    for engine in ENGINES:
        with pytest.raises(ValueError, match=r"state 'h' has init='given' but no delay reads it"):
            make_engine(g, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_state_shapes_follow_the_deepest_delay(engine, rng):
    """As the run docstrings say: [B, F] for a state read one step back, [D, B, F] oldest first for D > 1."""
    g = GRAPHS["delay3_and_1"]()
    params, kw = _run_kw(g, rng)
    r = make_engine(g, engine).run(params, **kw)
    for name, D in g.delayed().items():
        F = g.vertices[name].size
        assert r.final_states[name].shape == ((B, F) if D == 1 else (D, B, F))
        assert r.init_grads[name].shape == kw["init_states"][name].shape
    # a run of T steps, then one of 1 step from its final states, ends where one run of T + 1 steps ends
    longer = {k: np.concatenate([a, a[:1]]) for k, a in kw["inputs"].items()}
    whole = make_engine(g, engine).run(params, longer, init_states=kw["init_states"], backward=False)
    step = make_engine(g, engine).run(params, {k: a[T:] for k, a in longer.items()},
                                      init_states=r.final_states, backward=False)
    for name in g.delayed():
        np.testing.assert_allclose(step.final_states[name], whole.final_states[name], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ encoder-decoder and step-by-step loops


def test_seq2seq_parameters_get_the_same_sentences(rng):
    from test_flavors import tiny_batch, tiny_seq2seq

    model, enc, dec = tiny_seq2seq()
    params = {**enc.init_params(rng), **dec.init_params(rng)}
    inputs, masks = tiny_batch(enc, rng)
    with pytest.raises(ValueError, match=r"seq2seq: no parameter named 'dec.Wx' in the encoder or the decoder"):
        model.run(dict(params, **{"dec.Wx": params["out.W"]}), inputs, masks=masks)
    with pytest.raises(TypeError, match=r"seq2seq: params is NoneType; pass a dict of arrays by parameter name"):
        model.run(None, inputs, masks=masks)
    bad = dict(params, **{"out.b": np.full(params["out.b"].shape, np.nan)})
    with pytest.raises(ValueError, match=r"parameter 'out.b' holds nan at \[0\]"):
        model.run(bad, inputs, masks=masks)
    with np.errstate(all="ignore"):
        assert np.isnan(model.run(bad, inputs, masks=masks, check_finite=False).loss)


@pytest.mark.parametrize("engine", ENGINES)
def test_generation_scans_the_parameters_once(engine, monkeypatch):
    """A NaN parameter is refused at the first generated step; the later steps are not scanned again."""
    from unrolled.models.seq2seq import generate

    g = Graph("counter")
    h = g.state("h", 4)
    g.tanh(g.linear(g.param("W", (4, 7)), g.concat(g.one_hot(g.index_input("prev", 3)), h.prev), g.param("b", (4,))),
           name="h")
    g.output(g.linear(g.param("V", (3, 4)), h, g.param("c", (3,)), name="y"))
    params = g.init_params(0)
    eng, asked = make_engine(g, engine), []
    run = eng.run
    monkeypatch.setattr(eng, "run", lambda *a, **kw: asked.append(kw.get("check_finite", True)) or run(*a, **kw))
    gen = generate(eng, params, feedback={"prev": "y"}, start={"prev": 0}, steps=6, batch=2)
    assert gen.tokens["prev"].shape == (6, 2) and asked == [True] + [False] * 5
    params["b"][2] = np.inf
    with pytest.raises(ValueError, match=r"parameter 'b' holds inf at \[2\]"):
        generate(make_engine(g, engine), params, feedback={"prev": "y"}, start={"prev": 0}, steps=6, batch=2)


# ------------------------------------------------------------------ the trainer


def _trainer(engine: str, rng, **kw):
    from unrolled.train.optim import make_optimizer
    from unrolled.train.trainer import Trainer

    g = GRAPHS["elman"]()
    params, run_kw = _run_kw(g, rng)
    return Trainer(make_engine(g, engine), params, make_optimizer("sgd", 0.1), **kw), run_kw["inputs"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("tbptt", [False, True], ids=["batch", "tbptt"])
def test_the_trainer_refuses_what_its_caller_gives_it(engine, tbptt, rng):
    from unrolled.train.optim import make_optimizer
    from unrolled.train.trainer import Trainer

    kw = {"k1": 2, "k2": 3} if tbptt else {}
    trainer, inputs = _trainer(engine, rng, **kw)
    inputs["x"][1, 0, 2] = np.nan
    with pytest.raises(ValueError, match=r"input 'x' holds nan at \[1, 0, 2\] \(\[t, b, feature\]\)"):
        trainer.train_step(inputs)
    assert trainer.step_count == 0
    params = dict(trainer.params, b=np.array([0.0, np.inf, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"parameter 'b' holds inf at \[1\]: a run needs finite values$"):
        Trainer(trainer.engine, params, make_optimizer("sgd", 0.1), **kw)
    if tbptt:
        with pytest.raises(ValueError, match=r"init_states\['h'\] holds nan at \[0, 0\]"):
            trainer.tbptt.reset({"h": np.full((B, 4), np.nan)})


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("tbptt", [False, True], ids=["batch", "tbptt"])
def test_parameters_an_update_broke_show_as_a_skipped_update(engine, tbptt, rng):
    """Not as a refusal: the training loop reports a non-finite loss or gradient with its step."""
    trainer, inputs = _trainer(engine, rng, **({"k1": 2, "k2": 3} if tbptt else {}))
    trainer.train_step({k: a[:2] for k, a in inputs.items()})
    trainer.params["W"][0, 0] = np.nan  # as an update that overflowed (inf - inf) would leave it
    with np.errstate(all="ignore"):
        stats = trainer.train_step({k: a[2:] for k, a in inputs.items()})
    assert stats.skipped and np.isnan(stats.loss) and not np.isfinite(stats.grad_norm)
