"""BPTT gradients against central finite differences, per-copy bookkeeping, float32, bad feeds.

Everything that runs an engine is parametrized over
``engines.available_engines()``: the compiled engine, once it imports, must
pass the same tests as the reference engine. Per-copy contributions are a
reference-engine feature and are tested on it alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import GRAPHS, history_depths, make_init_states, make_inputs, make_params, numeric_grad, relative_error

from unrolled.engines.gradcheck import check_gradients
from unrolled.engines.registry import available_engines, make_engine
from unrolled.graph.folded import Graph
from unrolled.models import cells

ENGINES = available_engines()
T, B = 4, 2


def feeds(name: str, rng, *, T=T, B=B):
    g = GRAPHS[name]()
    return g, make_params(g, rng), make_inputs(g, T, B, rng), make_init_states(g, B, rng)


def assert_gradcheck(report, *must_cover) -> None:
    bad = {k: e for k, e in report.errors.items() if not e <= 1e-6}
    assert not bad, f"finite differences disagree: {bad}"
    missing = set(must_cover) - set(report.errors)
    assert not missing, f"not checked: {missing}"


# ------------------------------------------------------------ (a) finite differences


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_gradients_match_finite_differences(name, engine, rng):
    g, params, inputs, init = feeds(name, rng)
    report = check_gradients(g, params, inputs, init_states=init, engine=engine)
    dense = [f"input {v.name}" for v in g.inputs if v.kind == "input"]
    assert_gradcheck(report, *params, *dense, *(f"initial {k}" for k in init))


@pytest.mark.parametrize("engine", ENGINES)
def test_caller_given_initial_state_of_any_state(engine, rng):
    """init_states overrides zeros and learned starts alike; its gradient is checked too."""
    for name in ("coupled", "delay3_and_1", "lstm_learned_init"):
        g, params, inputs, _ = feeds(name, rng)
        init = make_init_states(g, B, rng, every=True)
        report = check_gradients(g, params, inputs, init_states=init, engine=engine)
        assert_gradcheck(report, *(f"initial {k}" for k in history_depths(g)))


@pytest.mark.parametrize("engine", ENGINES)
def test_learned_initial_state_gets_no_gradient_when_overridden(engine, rng):
    g, params, inputs, _ = feeds("learned_init", rng)
    init = make_init_states(g, B, rng, every=True)
    r = make_engine(g, engine).run(params, inputs, init_states=init)
    np.testing.assert_array_equal(r.grads["h.init"], 0)
    # without the override, h.init's gradient is the batch sum of the initial state's
    r = make_engine(g, engine).run(params, inputs)
    np.testing.assert_allclose(r.grads["h.init"], r.init_grads["h"].sum(axis=0), rtol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["elman", "two_losses", "delay2", "lstm"])
def test_masks(name, engine, rng):
    g, params, inputs, init = feeds(name, rng, T=5, B=3)
    masks = {}
    for k, loss in enumerate(g.losses):
        m = (rng.uniform(size=(5, 3)) < 0.6).astype(float)
        m[0, 0] = 1  # at least one counted (step, row)
        masks[loss.name] = m if k == 0 else m[:, 0]  # a [T] mask for the second loss
    report = check_gradients(g, params, inputs, init_states=init, masks=masks, engine=engine)
    assert_gradcheck(report, *params)
    # a masked-out (step, row) contributes nothing to the loss
    r = make_engine(g, engine).run(params, inputs, init_states=init, masks=masks, backward=False)
    for loss in g.losses:
        m = np.broadcast_to(np.asarray(masks[loss.name]).reshape(5, -1), (5, 3))
        assert np.all(r.step_losses[loss.name][m == 0] == 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_mean_and_sum_reductions(engine, rng):
    """'mean' divides the masked sum by the number of counted (step, row) pairs; 'sum' does not."""
    g_mean, g_sum = GRAPHS["elman"](), GRAPHS["sum"]()
    params, inputs = make_params(g_mean, rng), make_inputs(g_mean, 5, 3, rng)
    mask = np.ones((5, 3))
    mask[3:, 1] = 0
    r_mean = make_engine(g_mean, engine).run(params, inputs, masks={"xent": mask})
    r_sum = make_engine(g_sum, engine).run(params, inputs, masks={"xent": mask})
    np.testing.assert_allclose(r_sum.loss, r_mean.step_losses["xent"].sum(), rtol=1e-12)
    np.testing.assert_allclose(r_mean.loss * 13, r_sum.loss, rtol=1e-12)
    for k in params:
        np.testing.assert_allclose(r_mean.grads[k] * 13, r_sum.grads[k], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("engine", ENGINES)
def test_all_masked_loss_is_zero_not_nan(engine, rng):
    g, params, inputs, _ = feeds("elman", rng)
    r = make_engine(g, engine).run(params, inputs, masks={"xent": np.zeros(T)})
    assert r.loss == 0.0
    assert all(np.all(gr == 0) for gr in r.grads.values())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["elman", "delay3_and_1", "lstm_stack2", "coupled"])
def test_outside_seeds_by_finite_differences(name, engine, rng):
    """final_state_grads and output_grads are gradients of an augmented scalar.

    L' = L + Σ <G_final[h], final_state[h]> + Σ_t <G_out[y, t], y_t>
    """
    g, params, inputs, _ = feeds(name, rng)
    init = make_init_states(g, B, rng, every=True)
    eng = make_engine(g, engine)
    first = eng.run(params, inputs, init_states=init, backward=False)
    fsg = {k: rng.normal(size=v.shape) for k, v in first.final_states.items()}
    ogr = {k: rng.normal(size=v.shape) for k, v in first.outputs.items()}

    def augmented() -> float:
        r = eng.run(params, inputs, init_states=init, backward=False)
        return (r.loss + sum(float(np.sum(fsg[k] * r.final_states[k])) for k in fsg)
                + sum(float(np.sum(ogr[k] * r.outputs[k])) for k in ogr))

    r = eng.run(params, inputs, init_states=init, final_state_grads=fsg, output_grads=ogr)
    np.testing.assert_allclose(augmented(), r.loss + sum(np.sum(fsg[k] * r.final_states[k]) for k in fsg)
                               + sum(np.sum(ogr[k] * r.outputs[k]) for k in ogr), rtol=1e-14)
    for k in params:
        assert relative_error(numeric_grad(augmented, params[k]), r.grads[k]) <= 1e-6, k
    for k in init:
        assert relative_error(numeric_grad(augmented, init[k]), r.init_grads[k]) <= 1e-6, f"initial {k}"
    assert relative_error(numeric_grad(augmented, inputs["x"]), r.input_grads["x"]) <= 1e-6


@pytest.mark.parametrize("engine", ENGINES)
def test_graph_with_no_loss_and_no_inputs(engine, rng):
    """A free-running loop h = tanh(W·h_prev) from a learned start, seeded only from outside."""
    g = Graph("free")
    h = g.state("h", 3, init="learned")
    g.output(g.tanh(g.matmul(g.param("W", (3, 3)), h.prev), name="h"))
    params = make_params(g, rng)
    eng = make_engine(g, engine)
    seed = rng.normal(size=(5, 2, 3))

    def scalar():
        return float(np.sum(seed * eng.run(params, {}, steps=5, batch=2, backward=False).outputs["h"]))

    r = eng.run(params, {}, steps=5, batch=2, output_grads={"h": seed})
    assert r.loss == 0.0 and r.outputs["h"].shape == (5, 2, 3)
    for k in params:
        assert relative_error(numeric_grad(scalar, params[k]), r.grads[k]) <= 1e-6, k


# ------------------------------------------------------------ (b) per-copy contributions


@pytest.mark.parametrize("name", ["classic", "lstm_stack2", "delay3_and_1", "learned_init_delay2", "embedding"])
def test_per_copy_contributions_sum_to_the_gradient(name, rng):
    g, params, inputs, init = feeds(name, rng)
    eng = make_engine(g, "reference")
    r = eng.run(params, inputs, init_states=init, per_copy=True)
    depth = history_depths(g)
    for k, p in params.items():
        copies, steps = r.per_copy[k], r.copy_steps[k]
        if k.endswith(".init"):  # one copy per initial-state slot: steps -D .. -1
            assert steps == list(range(-depth[k[:-5]], 0))
        else:
            assert steps == list(range(T))
        assert copies.shape == (len(steps),) + p.shape and copies.dtype == np.float64
        scale = max(np.abs(r.grads[k]).max(), 1e-300)
        assert np.abs(copies.sum(axis=0) - r.grads[k]).max() <= 1e-12 * scale, k
    r_mean = eng.run(params, inputs, init_states=init, combine="mean")
    for k in params:
        n = len(r.copy_steps[k])
        np.testing.assert_allclose(r_mean.grads[k], r.per_copy[k].sum(axis=0) / n, rtol=1e-12, atol=1e-300)
        assert n == (depth[k[:-5]] if k.endswith(".init") else T)


@pytest.mark.parametrize("engine", ENGINES)
def test_combine_mean_is_sum_over_copies(engine, rng):
    g, params, inputs, _ = feeds("learned_init_delay2", rng)
    eng = make_engine(g, engine)
    r_sum, r_mean = eng.run(params, inputs), eng.run(params, inputs, combine="mean")
    assert r_mean.loss == r_sum.loss
    for k in params:
        n = 2 if k == "h.init" else T
        np.testing.assert_allclose(r_mean.grads[k], r_sum.grads[k] / n, rtol=1e-12)
    with pytest.raises(ValueError, match="combine='max'"):
        eng.run(params, inputs, combine="max")


def test_per_copy_by_hand():
    """h_t = u·x_t + w·h_{t-1} (scalars), no loss, seeds dL/dh_t = 1 for every t, so L = Σ_t h_t.

    Then dL/dh_t = Σ_{s≥t} w^(s-t) and the copy at step t contributes
    dL/du = x_t·dL/dh_t and dL/dw = h_{t-1}·dL/dh_t.
    """
    g = Graph("scalar")
    x = g.input("x", 1)
    h = g.state("h", 1)
    g.output(g.matmul(g.param("Wuw", (1, 2)), g.concat(x, h.prev), name="h"))
    u, w = 0.5, 0.8
    xs = np.array([1.0, -2.0, 3.0])
    hs, prev = [], 0.0
    for xt in xs:
        prev = u * xt + w * prev
        hs.append(prev)
    r = make_engine(g, "reference").run({"Wuw": np.array([[u, w]])}, {"x": xs.reshape(3, 1, 1)},
                                        output_grads={"h": np.ones((3, 1, 1))}, per_copy=True)
    np.testing.assert_allclose(r.outputs["h"].ravel(), hs, rtol=1e-15)
    dh = [1 + w + w * w, 1 + w, 1]
    want = [[xs[t] * dh[t], ([0.0] + hs)[t] * dh[t]] for t in range(3)]
    np.testing.assert_allclose(r.per_copy["Wuw"][:, 0, :], want, rtol=1e-14)
    np.testing.assert_allclose(r.init_grads["h"].ravel(), [w * dh[0]], rtol=1e-14)
    np.testing.assert_allclose(r.input_grads["x"].ravel(), np.multiply(u, dh), rtol=1e-14)


# ------------------------------------------------------------ (c) float32


def _all_arrays(r):
    for group in ("grads", "input_grads", "init_grads", "final_states", "outputs", "step_losses"):
        for k, a in getattr(r, group).items():
            yield f"{group}[{k}]", a
    for k, a in (r.per_copy or {}).items():
        yield f"per_copy[{k}]", a


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["elman", "lstm_stack2", "gru", "learned_init_delay2", "given_init_delay2", "mse",
                                  "embedding", "input_delay"])
def test_float32_is_close_to_float64_and_stays_float32(name, engine, rng):
    g, params, inputs, init = feeds(name, rng)
    if name in ("elman", "lstm_stack2"):
        init = make_init_states(g, B, rng, every=True)
    masks = {"xent" if "xent" in g.vertices else "mse": np.array([1.0, 0.0, 1.0, 1.0])}
    kw = dict(per_copy=True) if engine == "reference" else {}
    r64 = make_engine(g, engine).run(params, inputs, init_states=init, masks=masks, **kw)
    f32 = lambda d: {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in d.items()}  # noqa: E731
    r32 = make_engine(g, engine).run(f32(params), f32(inputs), init_states=f32(init), masks=masks, **kw)
    assert isinstance(r32.loss, float)
    np.testing.assert_allclose(r32.loss, r64.loss, rtol=1e-4)
    arrays64 = dict(_all_arrays(r64))
    arrays32 = dict(_all_arrays(r32))
    assert arrays32.keys() == arrays64.keys()
    for k, a in arrays32.items():
        assert a.dtype == np.float32, f"{k} is {a.dtype}"
        assert relative_error(a, arrays64[k]) <= 1e-4, k


# ------------------------------------------------------------ (d) bad feeds


@pytest.fixture
def elman_run(rng):
    g, params, inputs, _ = feeds("elman", rng)

    def run(engine, **changes):
        kw = dict(inputs=inputs)
        kw.update(changes)
        return make_engine(g, engine).run(params, kw.pop("inputs"), **kw)

    return run, inputs


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("change, match", [
    (lambda i: {"inputs": dict(i, x=i["x"][:, :, :2])}, r"input 'x' has shape \[4, 2, 2\]; it must be \[T, B, 3\]"),
    (lambda i: {"inputs": dict(i, x=i["x"][0])}, r"input 'x' has shape \[2, 3\]; it must be \[T, B, 3\]"),
    (lambda i: {"inputs": dict(i, target=i["target"][..., None])}, r"input 'target' has shape \[4, 2, 1\]; it must be \[T, B\]"),
    (lambda i: {"inputs": dict(i, target=np.full((T, B), 3))}, r"index input 'target' holds 3, outside 0..2"),
    (lambda i: {"inputs": dict(i, target=np.full((T, B), -1))}, r"index input 'target' holds -1, outside 0..2"),
    (lambda i: {"inputs": dict(i, target=np.zeros((T, B)))}, r"index input 'target' holds float64; it must hold integers"),
    (lambda i: {"inputs": {"x": i["x"]}}, r"input 'target' was not given"),
    (lambda i: {"inputs": dict(i, z=i["x"])}, r"no input named z in graph 'elman'; its inputs are target, x"),
    (lambda i: {"inputs": dict(i, target=i["target"][:3])}, r"input 'target' covers \[T, B\] = \[3, 2\]"),
    (lambda i: {"masks": {"nope": np.ones((T, B))}}, r"a mask names 'nope', which is not a loss; losses: xent"),
    (lambda i: {"masks": {"xent": np.ones((T, B + 1))}}, r"mask of loss 'xent' is \[4, 3\]; it must be \[T, B\]"),
    (lambda i: {"init_states": {"h": np.zeros((B, 5))}}, r"init_states\['h'\] has shape \[2, 5\]; it must be \[2, 4\]"),
    (lambda i: {"init_states": {"a": np.zeros((B, 4))}}, r"init_states names 'a', which no delay reads; states of graph 'elman': h"),
    (lambda i: {"final_state_grads": {"h": np.zeros(4)}}, r"final_state_grads\['h'\] has shape \[4\]"),
    (lambda i: {"output_grads": {"h": np.zeros((T, B, 4))}}, r"output_grads names 'h', which is not an output"),
    (lambda i: {"output_grads": {"y": np.zeros((T, B, 4))}}, r"output_grads\['y'\] is \[4, 2, 4\]; it must be \[4, 2, 3\]"),
], ids=["x-features", "x-rank", "index-rank", "index-high", "index-negative", "index-float", "missing",
        "unknown-input", "length", "unknown-mask", "mask-shape", "init-shape", "init-unknown", "fsg-shape",
        "og-unknown", "og-shape"])
def test_bad_feeds(elman_run, engine, change, match):
    run, inputs = elman_run
    with pytest.raises(ValueError, match=match):
        run(engine, **change(inputs))


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_parameters_and_missing_given_state(engine, rng):
    g, params, inputs, _ = feeds("given_init", rng)
    eng = make_engine(g, engine)
    with pytest.raises(ValueError, match=r"state 'h' has init=given but no initial value was passed.*\[2, 4\]"):
        eng.run(params, inputs)
    init = make_init_states(g, B, rng)
    with pytest.raises(ValueError, match=r"no value for parameter\(s\) W"):
        eng.run({k: v for k, v in params.items() if k != "W"}, inputs, init_states=init)
    with pytest.raises(ValueError, match=r"parameter 'W' is \[4, 6\] but the graph says \[4, 7\]"):
        eng.run(dict(params, W=params["W"][:, :6]), inputs, init_states=init)
    with pytest.raises(ValueError, match=r"parameters mix dtypes"):
        eng.run(dict(params, W=params["W"].astype(np.float32)), inputs, init_states=init)
    with pytest.raises(ValueError, match=r"parameter '\w+' holds int64; use float32 or float64"):
        eng.run({k: v.astype(np.int64) for k, v in params.items()}, inputs, init_states=init)


@pytest.mark.parametrize("engine", ENGINES)
def test_graph_without_inputs_needs_steps_and_batch(engine):
    g = Graph("free")
    h = g.state("h", 2, init="learned")
    g.output(g.tanh(g.matmul(g.param("W", (2, 2)), h.prev), name="h"))
    with pytest.raises(ValueError, match="graph 'free' has no inputs: pass steps=T and batch=B"):
        make_engine(g, engine).run(g.init_params(), {})


def test_a_failing_step_names_the_vertex_and_the_step():
    """An overflow at step 2 is reported with the vertex and the step (reference engine wording)."""
    g = Graph("boom")
    x = g.input("x", 1)
    g.output(g.scale(g.add(x, g.state("h", 1).prev, name="a"), 1e200, name="h"))
    xs = np.zeros((4, 1, 1))
    xs[2] = 1e200
    with np.errstate(over="raise"), pytest.raises(RuntimeError, match=r"vertex 'h' = scale\(\.\.\.\) at step 2"):
        make_engine(g, "reference").run({}, {"x": xs}, backward=False)


def test_engine_names():
    assert "reference" in ENGINES
    with pytest.raises(ValueError, match="unknown engine 'fast'; known engines: compiled, reference"):
        make_engine(GRAPHS["elman"](), "fast")


def test_cells_stack_prefixes(rng):
    """A two-layer stack reads layer 0's h in layer 1; each layer has its own parameters."""
    g = Graph("s")
    top = cells.stack(g, "gru", g.input("x", 2), 3, 2)
    assert top.name == "l1.h" and g.vertices["l1.xh"].args[0].name == "l0.h"
    assert {"l0.W", "l1.W", "l0.Un", "l1.Un"} <= set(g.params)
    with pytest.raises(ValueError, match="at least one layer"):
        cells.stack(g, "gru", top, 3, 0)
