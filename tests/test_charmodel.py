"""The language model's configs, graph, checkpoints, scoring and sampling, without the command line."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from unrolled.charlm.model import (
    MODEL_FORMAT,
    ModelConfig,
    Score,
    TrainConfig,
    build_graph,
    checkpoint_contents,
    graph_from_checkpoint,
    init_params,
    load_model,
    score_text,
)
from unrolled.charlm.sampling import Sampler
from unrolled.engines.registry import make_engine
from unrolled.models import cells
from unrolled.train.checkpoint import save_checkpoint

VOCAB = list("\n abcdefgh")


def tiny(cell="lstm", **kw) -> ModelConfig:
    return ModelConfig(cell=cell, hidden=8, layers=kw.pop("layers", 2), vocab_size=len(VOCAB), **kw)


def saved_model(tmp_path, config=None, name="m.npz", seed=0, **meta):
    config = config or tiny()
    arrays, m = checkpoint_contents(config, TrainConfig(seq=6, batch=3), VOCAB, init_params(config, seed), **meta)
    path = tmp_path / name
    save_checkpoint(path, arrays, m)
    return path


@pytest.mark.parametrize("cell", cells.CELLS)
def test_graph_of_every_cell_starts_near_a_uniform_guess(cell, rng):
    config = tiny(cell, dtype="float64")
    g = build_graph(config)
    assert [v.name for v in g.inputs] == ["x", "y"]
    assert g.outputs[0].name == "logits" and g.losses[0].reduce == "mean"
    params = init_params(config, 0)
    x = rng.integers(0, len(VOCAB), (5, 3))
    r = make_engine(g, "reference").run(params, {"x": x, "y": np.roll(x, -1, 0)}, backward=False)
    assert r.outputs["logits"].shape == (5, 3, len(VOCAB))
    assert abs(r.loss - math.log(len(VOCAB))) < 0.5  # small random weights: close to ln V nats


def test_fresh_lstm_gates_start_alike_as_in_torch():
    """A fresh LSTM's four gates start from the same bias (nn.LSTM's rule): a forget gate started at 1.0
    learned slower per update on text than PyTorch's model (benchmarks/QUALITY.md, issue 22)."""
    config = tiny(layers=3, dtype="float64")
    params = init_params(config, 0)
    H = config.hidden
    for k in range(config.layers):
        gates = params[f"l{k}.b"].reshape(4, H)  # i, f, g, o
        assert np.array_equal(gates, np.broadcast_to(gates[0], gates.shape)), f"layer {k}: the gates start apart"
    given = init_params(dataclasses.replace(config, forget_bias=1.0), 0)  # still there when asked for
    assert np.all(given["l0.b"].reshape(4, H)[1] == 1.0) and np.all(given["l0.b"].reshape(4, H)[[0, 2, 3]] == 0.0)


def test_dropout_inputs_only_in_the_training_graph():
    config = tiny(dropout=0.5)
    train, infer = build_graph(config), build_graph(config, train=False)
    assert set(cells.dropout_rates(train)) == {"l1.dropout", "out.dropout"}
    assert cells.dropout_rates(infer) == {}
    assert list(train.params) == list(infer.params)
    assert cells.dropout_rates(build_graph(dataclasses.replace(config, dropout=0.0))) == {}


def test_embedding_replaces_one_hot():
    g = build_graph(tiny(embedding=4))
    assert g.params["embed"].shape == (len(VOCAB), 4)
    assert g.params["l0.W"].shape == (32, 4 + 8)
    assert build_graph(tiny()).params["l0.W"].shape == (32, len(VOCAB) + 8)


def test_init_params_follow_the_seed_and_dtype():
    a, b, c = init_params(tiny(), 1), init_params(tiny(), 1), init_params(tiny(), 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["l0.W"], c["l0.W"])
    assert a["l0.W"].dtype == np.float32
    assert init_params(tiny(dtype="float64"), 1)["l0.W"].dtype == np.float64


@pytest.mark.parametrize("bad, words", [
    (dict(cell="transformer"), "unknown cell"),
    (dict(hidden=0), "hidden"),
    (dict(layers=0), "layers"),
    (dict(dropout=1.0), "dropout"),
    (dict(embedding=-1), "embedding"),
    (dict(dtype="float16"), "float32"),
])
def test_model_config_errors(bad, words):
    with pytest.raises(ValueError, match=words):
        dataclasses.replace(tiny(), **bad).check()


@pytest.mark.parametrize("bad, words", [
    (dict(seq=0), "--seq"),
    (dict(lr=-1.0), "--lr"),
    (dict(clip=-1.0), "--clip"),
    (dict(val_fraction=0.0), "--val-fraction"),
    (dict(k1=10, k2=5), "k1"),
    (dict(lr_schedule="cosine", steps=0), "--steps"),
    (dict(minutes=-1.0), "minutes"),
])
def test_train_config_errors(bad, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**bad).check()


def test_k1_and_k2_default_to_seq():
    c = TrainConfig(seq=17)
    assert (c.bptt_k1, c.bptt_k2) == (17, 17)
    assert (TrainConfig(seq=17, k1=5).bptt_k1, TrainConfig(seq=17, k1=5).bptt_k2) == (5, 17)


# ------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    path = saved_model(tmp_path, step=7)
    g, params, meta = graph_from_checkpoint(path)
    expected = init_params(tiny(), 0)
    assert set(params) == set(g.params) == set(expected)
    assert all(np.array_equal(params[k], expected[k]) for k in params)
    assert meta["vocabulary"] == VOCAB and meta["step"] == 7 and meta["model_format"] == MODEL_FORMAT


def test_folder_without_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="neither latest.npz nor best.npz"):
        load_model(tmp_path)


def test_foreign_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "other.npz", {"W": np.zeros(3)}, {"kind": "something.else"})
    with pytest.raises(ValueError, match="not a language-model checkpoint"):
        load_model(tmp_path / "other.npz")


def test_incompatible_model_format(tmp_path):
    path = saved_model(tmp_path)
    g, params, meta = graph_from_checkpoint(path)
    arrays = {f"param.{k}": v for k, v in params.items()}
    save_checkpoint(tmp_path / "new.npz", arrays, {**meta, "model_format": MODEL_FORMAT + 1})
    with pytest.raises(ValueError, match=f"format {MODEL_FORMAT + 1}.*reads format {MODEL_FORMAT}"):
        load_model(tmp_path / "new.npz")


def test_unknown_config_field_is_refused(tmp_path):
    path = saved_model(tmp_path)
    _, params, meta = graph_from_checkpoint(path)
    meta["model"]["attention"] = True
    save_checkpoint(tmp_path / "x.npz", {f"param.{k}": v for k, v in params.items()}, meta)
    with pytest.raises(ValueError, match="attention.*newer version"):
        load_model(tmp_path / "x.npz")


def test_missing_or_misshapen_parameter(tmp_path):
    _, params, meta = graph_from_checkpoint(saved_model(tmp_path))
    arrays = {f"param.{k}": v for k, v in params.items() if k != "out.b"}
    save_checkpoint(tmp_path / "a.npz", arrays, meta)
    with pytest.raises(ValueError, match="no array for parameter 'out.b'"):
        load_model(tmp_path / "a.npz")
    arrays["param.out.b"] = np.zeros(3, dtype=np.float32)
    save_checkpoint(tmp_path / "b.npz", arrays, meta)
    with pytest.raises(ValueError, match="'out.b' is float32\\[3\\]"):
        load_model(tmp_path / "b.npz")


# ------------------------------------------------------------------ scoring


def test_score_skips_and_counts_unknown_characters(tmp_path):
    m = load_model(saved_model(tmp_path, config=tiny(dtype="float64")))
    clean = "abc defg\nhab cdef\n" * 3
    s = score_text(m, clean, seq=5, batch=2, engine="reference")
    assert (s.characters, s.scored, s.unknown) == (len(clean), len(clean) - 1, 0)
    dirty = clean.replace("c", "cZ", 2) + "é"
    t = score_text(m, dirty, seq=5, batch=2, engine="reference")
    assert t.unknown == 3 and t.unknown_chars == {"Z": 2, "é": 1}
    assert t.scored == len(clean) - 1
    assert t.nats == pytest.approx(s.nats, rel=1e-12)  # the same characters, scored the same way
    assert t.bits_per_char == pytest.approx(s.bits_per_char)


def test_score_figures():
    s = Score(characters=12, scored=8, nats=8 * math.log(2), unknown=2, unknown_chars={"Z": 2}, vocab_size=16)
    assert s.bits_per_char == pytest.approx(1.0)
    assert s.perplexity == pytest.approx(2.0)
    assert s.bits_per_char_charged == pytest.approx((8 * 1.0 + 2 * 4.0) / 10)


def test_score_needs_two_known_characters(tmp_path):
    m = load_model(saved_model(tmp_path))
    with pytest.raises(ValueError, match="at least 2"):
        score_text(m, "ZZZa", engine="reference")


def test_score_is_the_same_for_any_chunking(tmp_path):
    m = load_model(saved_model(tmp_path, config=tiny(dtype="float64")))
    text = "abc defg\nhab cdef\n" * 4
    a = score_text(m, text, seq=3, batch=1, engine="reference")
    b = score_text(m, text, seq=50, batch=1, engine="reference")
    assert a.nats == pytest.approx(b.nats, rel=1e-12)  # the state is carried across chunks


# ----------------------------------------------------------------- sampling


def test_stepping_one_character_at_a_time_equals_one_long_run(tmp_path):
    m = load_model(saved_model(tmp_path, config=tiny(dtype="float64")))
    s = Sampler.from_model(m, engine="reference")
    ids = s.encode_prime("abc de\nfg")
    logits, state = s._advance(ids[:1], None)
    for k in ids[1:]:
        logits, state = s._advance([k], state)
    whole, _ = s._advance(ids, None)
    np.testing.assert_allclose(logits, whole, rtol=1e-12, atol=1e-12)


def test_same_seed_same_text(tmp_path):
    s = Sampler.from_model(load_model(saved_model(tmp_path)), engine="reference")
    a = s.sample(40, seed=3, prime="ab")
    assert a == s.sample(40, seed=3, prime="ab")
    assert a != s.sample(40, seed=4, prime="ab")
    assert len(a) == 40 and set(a) <= set(VOCAB)


def test_temperature_and_top_k(tmp_path):
    s = Sampler.from_model(load_model(saved_model(tmp_path, config=tiny(dtype="float64"))), engine="reference")
    greedy = s.sample(30, temperature=0.0, seed=1)
    assert greedy == s.sample(30, temperature=0.0, seed=2)  # temperature 0: the likeliest, whatever the seed
    assert greedy == s.sample(30, top_k=1, seed=3)  # top-1 is the same rule
    # An untrained model's scores lie within hundredths of each other: cold is colder than their gaps.
    cold = s.sample(300, temperature=0.002, seed=1)
    hot = s.sample(300, temperature=20.0, seed=1)
    top = lambda text: max(text.count(c) for c in set(text)) / len(text)  # noqa: E731
    assert top(cold) > 0.4 and top(hot) < 0.2  # cold sticks to the likeliest characters, hot spreads out
    assert len(set(s.sample(300, temperature=20.0, top_k=2, seed=1))) < len(VOCAB)


def test_generator_and_engine_give_the_same_text(tmp_path, monkeypatch):
    import unrolled.charlm.sampling

    monkeypatch.setenv("UNROLLED_JIT", "0")  # the generator's NumPy form: no compilation in the tests
    monkeypatch.setattr(unrolled.charlm.sampling, "BLOCK", 7)  # several blocks, joined exactly
    m = load_model(saved_model(tmp_path, config=tiny(dtype="float64")))
    fast, literal = Sampler.from_model(m), Sampler.from_model(m, engine="reference")
    assert fast.generator is not None and literal.engine is not None
    for kw in (dict(prime="ab c", seed=5), dict(seed=6, temperature=0.7, top_k=4), dict(seed=7, temperature=0.0)):
        assert fast.sample(40, **kw) == literal.sample(40, **kw)
    monkeypatch.setattr(unrolled.charlm.sampling, "BLOCK", 1000)
    assert fast.sample(40, seed=5, prime="ab c") == literal.sample(40, seed=5, prime="ab c")  # blocks do not change it


def test_prime_outside_the_vocabulary_is_named(tmp_path):
    s = Sampler.from_model(load_model(saved_model(tmp_path)), engine="reference")
    with pytest.raises(ValueError, match=r"'Q' \(U\+0051\) at position 3"):
        s.generate(5, prime="abQ")  # raised at once, before any character is produced
    with pytest.raises(ValueError, match="temperature"):
        s.generate(5, temperature=-1.0)
