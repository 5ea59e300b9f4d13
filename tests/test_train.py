"""The trainer: engine + clipping + schedule + optimizer, dropout masks, seeds, resume, fit."""

from __future__ import annotations

import json
import math

import helpers
import numpy as np
import pytest

from unrolled.engines.registry import make_engine
from unrolled.graph.folded import Graph
from unrolled.models import cells
from unrolled.train.clip import global_norm
from unrolled.train.lr_schedules import Cosine, StepDecay, make_schedule
from unrolled.train.optim import make_optimizer
from unrolled.train.tbptt import TruncatedBPTT, split_stream
from unrolled.train.trainer import Batch, Trainer, fit


def setup(rng, graph=None, T=5, B=3):
    g = graph or helpers.elman()
    eng = make_engine(g, "reference")
    params = helpers.make_params(g, rng)
    return g, eng, params, helpers.make_inputs(g, T, B, rng)


def dropout_graph() -> Graph:
    g = Graph("drop")
    h = cells.dropout_stack(g, "gru", g.input("x", helpers.N_IN), 4, 2, dropout_rate=0.5)
    y = g.output(g.linear(g.param("V", (helpers.N_OUT, 4)), h, g.param("c", (helpers.N_OUT,)), name="y"))
    g.loss("cross_entropy", y, g.index_input("target", helpers.N_OUT), name="xent")
    return g


def copy(params):
    return {k: v.copy() for k, v in params.items()}


# ------------------------------------------------------------------------------------ one update


def test_an_update_is_run_clip_schedule_step(rng):
    g, eng, params, inputs = setup(rng)
    schedule = StepDecay(0.1, step_size=2, gamma=0.5)
    trainer = Trainer(eng, copy(params), make_optimizer("sgd", 1.0, momentum=0.9), schedule=schedule, clip_norm=0.5)
    manual, opt = copy(params), make_optimizer("sgd", 1.0, momentum=0.9)
    for step in range(5):
        stats = trainer.train_step(inputs)
        r = eng.run(manual, inputs)
        norm = global_norm(r.grads)
        scale = min(1.0, 0.5 / (norm + 1e-6))
        opt.step(manual, {k: v * scale for k, v in r.grads.items()}, lr=schedule.lr_at(step))
        assert stats.step == step + 1 and stats.lr == schedule.lr_at(step)
        assert stats.grad_norm == pytest.approx(norm, rel=1e-14)  # before clipping
        assert stats.loss == pytest.approx(r.loss, rel=1e-14)
    for k in params:
        np.testing.assert_allclose(trainer.params[k], manual[k], rtol=1e-13, atol=1e-15)


def test_clip_by_value_and_the_norm_before_it(rng):
    g, eng, params, inputs = setup(rng)
    r = eng.run(params, inputs)
    trainer = Trainer(eng, copy(params), make_optimizer("sgd", 1.0), clip_value=1e-3)
    stats = trainer.train_step(inputs)
    assert stats.grad_norm == pytest.approx(global_norm(r.grads), rel=1e-14)
    for k in params:
        np.testing.assert_allclose(params[k] - trainer.params[k], np.clip(r.grads[k], -1e-3, 1e-3), atol=1e-15)


def test_weight_decay_belongs_to_the_optimizer(rng):
    g, eng, params, inputs = setup(rng)
    trainer = Trainer(eng, copy(params), make_optimizer("adamw", 0.1, weight_decay=0.5))
    trainer.apply_gradients({k: np.zeros_like(v) for k, v in params.items()})
    for k in params:
        np.testing.assert_allclose(trainer.params[k], params[k] * (1 - 0.1 * 0.5), rtol=1e-14)


def test_schedule_and_optimizer_default_rate(rng):
    g, eng, params, inputs = setup(rng)
    cosine = Cosine(0.2, total_steps=4)
    t = Trainer(eng, copy(params), make_optimizer("adam", 0.01), schedule=cosine)
    lrs = [t.train_step(inputs).lr for _ in range(6)]
    assert lrs == [cosine.lr_at(s) for s in range(6)] and lrs[-1] == 0.0
    assert Trainer(eng, copy(params), make_optimizer("adam", 0.01)).train_step(inputs).lr == 0.01


def test_non_finite_gradient_skips_the_update(rng):
    g, eng, params, inputs = setup(rng)
    trainer = Trainer(eng, copy(params), make_optimizer("sgd", 0.1), clip_norm=1.0)
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    grads["W"][0, 0] = np.inf
    stats = trainer.apply_gradients(grads)
    assert stats.skipped and math.isinf(stats.grad_norm) and stats.step == 1
    for k in params:
        np.testing.assert_array_equal(trainer.params[k], params[k])


# ---------------------------------------------------------------------------- dropout and seeds


def run_trainer(seed, rng_data, steps=4):
    g = dropout_graph()
    eng = make_engine(g, "reference")
    params = g.init_params(0)
    trainer = Trainer(eng, params, make_optimizer("adam", 0.01), clip_norm=1.0, seed=seed)
    for _ in range(steps):  # the trainer fills the dropout masks itself
        trainer.train_step({"x": rng_data.normal(size=(4, 3, helpers.N_IN)),
                            "target": rng_data.integers(0, helpers.N_OUT, (4, 3))})
    return trainer


def test_a_seed_makes_a_run_bit_identical():
    a = run_trainer(5, np.random.default_rng(1)).params
    b = run_trainer(5, np.random.default_rng(1)).params
    c = run_trainer(6, np.random.default_rng(1)).params
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)  # the dropout masks differ


def test_dropout_masks_on_in_training_off_in_evaluation(rng):
    g = dropout_graph()
    eng = make_engine(g, "reference")
    params = g.init_params(0)
    trainer = Trainer(eng, params, make_optimizer("sgd", 0.0), seed=3)
    inputs = {"x": rng.normal(size=(4, 3, helpers.N_IN)), "target": rng.integers(0, helpers.N_OUT, (4, 3))}
    ones = cells.dropout_masks(g, 4, 3, train=False)
    evaluated = trainer.evaluate(inputs)
    want = eng.run(params, {**inputs, **ones}, backward=False)
    np.testing.assert_array_equal(evaluated.outputs["y"], want.outputs["y"])
    trained = trainer.train_step(inputs).result
    masks = cells.dropout_masks(g, 4, 3, rng=np.random.default_rng(3), train=True)
    again = eng.run(params, {**inputs, **masks}, backward=False)
    np.testing.assert_array_equal(trained.outputs["y"], again.outputs["y"])
    assert not np.array_equal(trained.outputs["y"], evaluated.outputs["y"])


# ------------------------------------------------------------------------------- truncated BPTT


def test_trainer_with_k1_k2_runs_truncated_bptt(rng):
    g, eng, params, _ = setup(rng)
    stream = helpers.make_inputs(g, 12, 2, rng)
    trainer = Trainer(eng, copy(params), make_optimizer("sgd", 0.1), k1=3, k2=6)
    manual, tb, opt = copy(params), TruncatedBPTT(eng, 3, 6), make_optimizer("sgd", 0.1)
    for chunk in split_stream(stream, 3):
        stats = trainer.train_step(chunk)
        r = tb.step(manual, chunk)
        opt.step(manual, r.grads)
        assert stats.loss == r.loss
    for k in params:
        np.testing.assert_array_equal(trainer.params[k], manual[k])
    with pytest.raises(ValueError, match="carries the state itself"):
        trainer.train_step(chunk, init_states={"h": np.zeros((2, helpers.HIDDEN))})


def test_resume_is_exact_with_dropout_schedule_and_truncation(rng):
    g = dropout_graph()
    eng = make_engine(g, "reference")
    stream = {"x": rng.normal(size=(24, 2, helpers.N_IN)), "target": rng.integers(0, helpers.N_OUT, (24, 2))}
    chunks = list(split_stream(stream, 3))

    def make():
        sched = make_schedule("cosine", 0.05, total_steps=8, warmup_steps=2)
        return Trainer(eng, g.init_params(0), make_optimizer("adam", 0.05), schedule=sched, clip_norm=1.0,
                       k1=3, k2=5, seed=9)

    whole = make()
    for c in chunks:
        whole.train_step(c)
    first = make()
    for c in chunks[:3]:
        first.train_step(c)
    arrays, meta = first.state_arrays(), json.loads(json.dumps(first.state_meta()))
    second = make()
    second.params.update({k: v.copy() for k, v in first.params.items()})
    second.load_state({k: v.copy() for k, v in arrays.items()}, meta)
    for c in chunks[3:]:
        second.train_step(c)
    assert second.step_count == whole.step_count == 8
    for k in whole.params:
        np.testing.assert_array_equal(second.params[k], whole.params[k])


# ------------------------------------------------------------------------------------------- fit


def test_fit_takes_batches_in_any_form_and_stops_when_told(rng):
    g, eng, params, inputs = setup(rng)
    masks = {"xent": np.ones((5, 3))}
    trainer = Trainer(eng, params, make_optimizer("adam", 0.05))
    batches = [inputs, (inputs, masks), Batch(inputs, masks)] * 10
    history = fit(trainer, batches, steps=20)
    assert len(history.losses) == 20 == trainer.step_count
    assert history.losses[-1] < history.losses[0]  # it learns the one batch
    assert len(history.grad_norms) == len(history.lrs) == 20
    history = fit(trainer, batches, callback=lambda s: s.step < 23)
    assert len(history.losses) == 3


def test_mistakes_are_named(rng):
    g, eng, params, _ = setup(rng)
    opt = make_optimizer("sgd", 0.1)
    with pytest.raises(ValueError, match="both k1 and k2"):
        Trainer(eng, params, opt, k1=3)
    with pytest.raises(ValueError, match="clip_norm"):
        Trainer(eng, params, opt, clip_norm=0)
    with pytest.raises(ValueError, match="clip_value"):
        Trainer(eng, params, opt, clip_value=-1)
    with pytest.raises(ValueError, match="combine"):
        Trainer(eng, params, opt, combine="max")
