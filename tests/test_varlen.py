"""Variable-length sequences in one padded batch: masks, states frozen after each row's end.

The oracle is each sequence run alone, unpadded: the padded batch must give
the same losses, gradients, final states (and gradients arriving through the
final states, as an encoder receives them from its decoder).
"""

from __future__ import annotations

import helpers
import numpy as np
import pytest

from unrolled.engines.registry import available_engines, make_engine
from unrolled.train.tbptt import TruncatedBPTT, split_stream
from unrolled.train.variable_length import (
    freeze_after_end,
    keep_feed,
    last_step_mask,
    length_mask,
    pad,
)

ENGINES = available_engines()
CASES = ["elman", "jordan", "coupled", "lstm", "lstm_stack2", "gru", "learned_init", "embedding", "two_losses"]
LENGTHS = np.array([7, 2, 5, 1, 7])


def _alone(eng, params, inputs, b, L, **kw):
    return eng.run(params, {k: a[:L, b : b + 1] for k, a in inputs.items()}, **kw)


def _row_masks(g, lengths, T):
    return {l.name: length_mask(lengths, T) for l in g.losses}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES)
def test_padded_batch_equals_each_sequence_alone(case, engine, rng):
    g = helpers.GRAPHS[case]()
    for l in g.losses:
        l.reduce = "sum"  # sums add up row by row; the mean is checked below
    fg = freeze_after_end(g)
    params = helpers.make_params(g, rng)
    T, B = int(LENGTHS.max()), len(LENGTHS)
    inputs = helpers.make_inputs(g, T, B, rng)
    batch = make_engine(fg, engine).run(params, {**inputs, "keep": keep_feed(fg, LENGTHS, T)},
                                        masks=_row_masks(g, LENGTHS, T))
    eng = make_engine(g, engine)
    loss, grads = 0.0, {k: np.zeros_like(v) for k, v in params.items()}
    for b, L in enumerate(LENGTHS):
        r = _alone(eng, params, inputs, b, L)
        loss += r.loss
        for k in grads:
            grads[k] += r.grads[k]
        for name, s in r.final_states.items():
            np.testing.assert_allclose(batch.final_states[name][b], s[0], rtol=1e-12, atol=1e-14)
        for name, sl in r.step_losses.items():
            np.testing.assert_allclose(batch.step_losses[name][:L, b], sl[:, 0], rtol=1e-12, atol=1e-14)
            assert not batch.step_losses[name][L:, b].any()
    assert batch.loss == pytest.approx(loss, rel=1e-12)
    for k in params:
        np.testing.assert_allclose(batch.grads[k], grads[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_mean_reduction_averages_over_every_rows_own_steps(rng):
    g = helpers.elman()  # reduce="mean"
    fg = freeze_after_end(g)
    params = helpers.make_params(g, rng)
    T, B = int(LENGTHS.max()), len(LENGTHS)
    inputs = helpers.make_inputs(g, T, B, rng)
    batch = make_engine(fg).run(params, {**inputs, "keep": keep_feed(fg, LENGTHS, T)},
                                masks={"xent": length_mask(LENGTHS, T)})
    eng = make_engine(g, "reference")
    weight = LENGTHS / LENGTHS.sum()
    singles = [_alone(eng, params, inputs, b, L) for b, L in enumerate(LENGTHS)]
    assert batch.loss == pytest.approx(sum(w * r.loss for w, r in zip(weight, singles)), rel=1e-12)
    for k in params:
        want = sum(w * r.grads[k] for w, r in zip(weight, singles))
        np.testing.assert_allclose(batch.grads[k], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["elman", "lstm", "gru"])
def test_gradients_through_final_states_match_each_sequence_alone(case, rng):
    """An encoder's case: the only gradient arrives through each row's final state."""
    g = helpers.GRAPHS[case]()
    fg = freeze_after_end(g)
    params = helpers.make_params(g, rng)
    T, B = int(LENGTHS.max()), len(LENGTHS)
    inputs = helpers.make_inputs(g, T, B, rng)
    zero = {l.name: np.zeros((T, B)) for l in g.losses}
    seeds = {n: rng.normal(size=(B, g.vertices[n].size)) for n in g.delayed()}
    batch = make_engine(fg, "reference").run(params, {**inputs, "keep": keep_feed(fg, LENGTHS, T)}, masks=zero,
                                             final_state_grads=seeds)
    eng = make_engine(g, "reference")
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    for b, L in enumerate(LENGTHS):
        r = _alone(eng, params, inputs, b, L, masks={l.name: np.zeros((L, 1)) for l in g.losses},
                   final_state_grads={n: s[b : b + 1] for n, s in seeds.items()})
        for k in grads:
            grads[k] += r.grads[k]
        for k, ig in r.input_grads.items():
            np.testing.assert_allclose(batch.input_grads[k][:L, b], ig[:, 0], rtol=1e-10, atol=1e-13)
            assert not batch.input_grads[k][L:, b].any()  # padding gets no gradient
    for k in params:
        np.testing.assert_allclose(batch.grads[k], grads[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_frozen_graph_gradients_by_finite_differences(rng):
    g = helpers.lstm()
    fg = freeze_after_end(g)
    params = helpers.make_params(g, rng)
    lengths = np.array([3, 1, 4])
    inputs = helpers.make_inputs(g, 4, 3, rng)
    eng = make_engine(fg, "reference")
    feed = {**inputs, "keep": keep_feed(fg, lengths, 4)}
    seeds = {"h": rng.normal(size=(3, 3)), "c": rng.normal(size=(3, 3))}
    masks = {"xent": length_mask(lengths, 4)}
    r = eng.run(params, feed, masks=masks, final_state_grads=seeds)

    def objective():
        out = eng.run(params, feed, masks=masks, backward=False)
        return out.loss + sum(float((out.final_states[n] * s).sum()) for n, s in seeds.items())

    for k in params:
        assert helpers.relative_error(helpers.numeric_grad(objective, params[k]), r.grads[k]) < 1e-7, k


def test_zero_length_row_keeps_its_initial_state(rng):
    g = helpers.elman(init="given")
    fg = freeze_after_end(g)
    params = helpers.make_params(g, rng)
    inputs = helpers.make_inputs(g, 3, 2, rng)
    h0 = rng.normal(size=(2, helpers.HIDDEN))
    r = make_engine(fg).run(params, {**inputs, "keep": keep_feed(fg, [0, 3], 3)}, init_states={"h": h0},
                            masks={"xent": length_mask([0, 3], 3)})
    np.testing.assert_array_equal(r.final_states["h"][0], h0[0])


def test_frozen_streams_over_truncated_bptt_chunks(rng):
    """Rows ending in different chunks of a stream still end with their own last state."""
    g = helpers.gru()
    fg = freeze_after_end(g)
    params = helpers.make_params(g, rng)
    lengths = np.array([9, 3, 6, 10])
    T = 10
    inputs = helpers.make_inputs(g, T, 4, rng)
    feed = {**inputs, "keep": keep_feed(fg, lengths, T)}
    tb = TruncatedBPTT(make_engine(fg, "reference"), 3, 5)
    mask = length_mask(lengths, T)
    for s, chunk in zip(range(0, T, 3), split_stream(feed, 3)):
        r = tb.step(params, chunk, masks={"xent": mask[s : s + 3]})
    eng = make_engine(g, "reference")
    for b, L in enumerate(lengths):
        alone = _alone(eng, params, inputs, b, L, backward=False)
        np.testing.assert_allclose(r.final_states["h"][b], alone.final_states["h"][0], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------- the rewrite


def test_rewrite_keeps_names_and_leaves_the_original_alone():
    g = helpers.lstm()
    before = str(g)
    fg = freeze_after_end(g)
    assert str(g) == before
    assert set(fg.params) == set(g.params)
    assert fg.delayed() == g.delayed()
    assert fg.vertices["keep"].kind == "input" and fg.vertices["keep"].size == 3
    text = str(fg)
    assert "h.raw" in text and "c.raw" in text and "h : [3] = add(h.kept, h.held)" in text


def test_keep_is_as_wide_as_the_widest_state():
    g = helpers.coupled()  # states of sizes 3 and 4
    fg = freeze_after_end(g)
    assert fg.vertices["keep"].size == 4
    assert keep_feed(fg, [2, 1], 3).shape == (3, 2, 4)


def test_rewrite_refuses_what_it_cannot_freeze():
    with pytest.raises(ValueError, match="read 2 steps back"):
        freeze_after_end(helpers.delayed(2))
    with pytest.raises(ValueError, match="duplicate name 'x'"):
        freeze_after_end(helpers.elman(), keep="x")


# ---------------------------------------------------------------------------------------- helpers


def test_masks_from_lengths():
    np.testing.assert_array_equal(length_mask([2, 0, 3]), [[1, 0, 1], [1, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(last_step_mask([2, 0, 3], 4), [[0, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="T=2"):
        length_mask([3], 2)
    with pytest.raises(ValueError, match="at least 0"):
        length_mask([-1, 2])
    with pytest.raises(ValueError, match="whole numbers"):
        length_mask([1.5])


def test_pad():
    x, lengths = pad([np.array([1, 2, 3]), np.array([4])])
    np.testing.assert_array_equal(x, [[1, 4], [2, 0], [3, 0]])
    np.testing.assert_array_equal(lengths, [3, 1])
    v, _ = pad([np.ones((2, 3)), np.ones((1, 3))], T=4, value=-1)
    assert v.shape == (4, 2, 3) and v[3, 0, 0] == -1
    with pytest.raises(ValueError, match="different shapes"):
        pad([np.ones((2, 3)), np.ones((1, 2))])


def test_last_step_mask_reads_each_rows_answer(rng):
    """Many-to-one: the loss at each row's own last step only, whatever the padding."""
    g = helpers.elman(reduce="sum")
    params = helpers.make_params(g, rng)
    lengths = np.array([4, 2, 3])
    inputs = helpers.make_inputs(g, 4, 3, rng)
    r = make_engine(g, "reference").run(params, inputs, masks={"xent": last_step_mask(lengths, 4)})
    full = make_engine(g, "reference").run(params, inputs, backward=False)
    want = sum(full.step_losses["xent"][L - 1, b] for b, L in enumerate(lengths))
    assert r.loss == pytest.approx(want, rel=1e-13)
