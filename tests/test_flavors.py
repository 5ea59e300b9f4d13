"""The four flavors learn their tasks end to end (fixed seed, threshold asserted, each under 60 s),
and the encoder–decoder machinery under them is exact: gradients through the bridge, generation, scheduled sampling.
"""

from __future__ import annotations

import contextlib
import ctypes
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import numeric_grad, relative_error

from unrolled.engines.registry import make_engine
from unrolled.graph.folded import Graph
from unrolled.models import cells, flavors
from unrolled.models.seq2seq import BidirectionalEncoder, Seq2Seq, generate, scheduled_inputs
from unrolled.train.variable_length import freeze_after_end, keep_feed, length_mask, pad

SECONDS = 60  # the bar for each flavor on a 2-core machine
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@contextlib.contextmanager
def single_threaded_blas():
    """Tiny matrices gain nothing from BLAS threads and lose a lot when the cores are shared; use one."""
    lib = None
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        paths = [line.split()[-1] for line in maps if "openblas" in line and ".so" in line]
        lib = ctypes.CDLL(paths[0]) if paths else None
    pairs = [("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
             ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
             ("openblas_set_num_threads", "openblas_get_num_threads")]
    for set_name, get_name in pairs:
        if lib is not None and hasattr(lib, set_name) and hasattr(lib, get_name):
            before = getattr(lib, get_name)()
            getattr(lib, set_name)(1)
            try:
                yield
            finally:
                getattr(lib, set_name)(before)
            return
    yield


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with single_threaded_blas():
        yield


def check(result: flavors.FlavorResult) -> None:
    print(result)
    assert result.passed, str(result)
    assert result.seconds < SECONDS, str(result)


# ------------------------------------------------------------------------------------- the flavors


def test_many_to_one_adding_problem():
    """Lengths 20-50 in one padded batch; held-out MSE <= 0.005 (always answering 1 scores ~0.17)."""
    check(flavors.run_many_to_one(flavors.ManyToOneConfig(), log=None))


def test_many_to_many_echo_with_truncated_bptt():
    """Echo at delay 6 over 8 symbols, BPTT(10; 4) on endless streams; >= 99% per-step accuracy held out."""
    check(flavors.run_many_to_many(flavors.EchoConfig(), log=None))


def test_one_to_many_spells_every_digit_name_exactly():
    result = flavors.run_one_to_many(flavors.OneToManyConfig(), log=None)
    check(result)
    assert [flavors.spell(result.params, d) for d in range(10)] == list(flavors.DIGIT_NAMES)


def test_encoder_decoder_reverses_held_out_digit_strings():
    """Strings of 3-5 digits, lengths mixed in each batch; >= 99% exact match on 500 strings never trained on."""
    check(flavors.run_seq2seq(flavors.Seq2SeqConfig(), log=None))


def test_encoder_decoder_with_scheduled_sampling():
    """A quarter of the decoder's inputs are its own previous predictions; shorter strings keep it quick."""
    cfg = flavors.Seq2SeqConfig(min_len=2, max_len=4, sampling=0.25, eval_every=50)
    check(flavors.run_seq2seq(cfg, log=None))


def test_example_script_runs(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["one_to_many.py", "--updates", "200"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(EXAMPLES / "one_to_many.py"), run_name="__main__")
    assert done.value.code == 0
    assert "7 -> seven" in capsys.readouterr().out


# ------------------------------------------------------------------------------- seq2seq machinery

V, H = 4, 3


def tiny_seq2seq(bidirectional: bool = False, sampling: float = 0.0):
    enc = Graph("enc")
    x = enc.one_hot(enc.index_input("src", V), name="src1h")
    if bidirectional:
        xr = enc.one_hot(enc.index_input("src_rev", V), name="src_rev1h")
        cells.bidirectional(enc, "gru", x, xr, H)
        enc = freeze_after_end(enc)
        encoder = BidirectionalEncoder(enc, x="src", x_reversed="src_rev", fwd="fwd.h", bwd="bwd.h", engine="reference")
        bridge = {"dec.h": "enc"}
    else:
        cells.lstm(enc, x, H, prefix="enc.")
        enc = freeze_after_end(enc)
        encoder = enc
        bridge = {"dec.h": "enc.h", "dec.c": "enc.c"}
    dec = Graph("dec")
    prev = dec.one_hot(dec.index_input("prev", V), name="prev1h")
    h = cells.gru(dec, prev, 2 * H, prefix="dec.") if bidirectional else cells.lstm(dec, prev, H, prefix="dec.")
    y = dec.output(dec.linear(dec.param("out.W", (V, h.size)), h, dec.param("out.b", (V,)), name="logits"))
    dec.loss("cross_entropy", y, dec.index_input("next", V), name="xent")
    model = Seq2Seq(encoder, dec, bridge=bridge, feedback={"prev": "logits"}, sampling=sampling, engine="reference")
    return model, enc, dec


def tiny_batch(enc, rng, B=3):
    src, lengths = pad([rng.integers(0, V, n) for n in (4, 2, 3)][:B])
    nxt, out_len = pad([rng.integers(0, V, n) for n in (2, 3, 1)][:B])
    prev = np.vstack([np.zeros((1, B), dtype=np.int64), nxt[:-1]])
    inputs = {"src": src, "keep": keep_feed(enc, lengths), "prev": prev, "next": nxt}
    return inputs, {"xent": length_mask(out_len, nxt.shape[0])}


@pytest.mark.parametrize("bidirectional", [False, True], ids=["lstm", "bidirectional-gru"])
def test_seq2seq_gradients_flow_through_the_bridge(bidirectional, rng):
    """Every parameter's gradient, the encoder's included, against finite differences of the decoder's loss."""
    model, enc, dec = tiny_seq2seq(bidirectional)
    params = {k: v + rng.normal(0, 0.3, v.shape) for k, v in {**enc.init_params(rng), **dec.init_params(rng)}.items()}
    inputs, masks = tiny_batch(enc, rng)
    r = model.run(params, inputs, masks=masks)
    assert any(k.startswith(("enc.", "fwd.", "bwd.")) and np.abs(g).max() > 1e-3 for k, g in r.grads.items())

    def loss():
        return model.run(params, inputs, masks=masks, backward=False).loss

    for k in params:
        assert relative_error(numeric_grad(loss, params[k]), r.grads[k]) < 1e-7, k


def test_generation_feeds_back_its_own_predictions(rng):
    model, enc, dec = tiny_seq2seq()
    params = {**enc.init_params(rng), **dec.init_params(rng)}
    params = {k: v + rng.normal(0, 0.5, v.shape) for k, v in params.items()}
    inputs, _ = tiny_batch(enc, rng)
    enc_inputs = {"src": inputs["src"], "keep": inputs["keep"]}
    gen = model.generate(params, enc_inputs, start={"prev": 0}, steps=5)
    np.testing.assert_array_equal(gen.tokens["prev"][1:], gen.predictions["logits"][:-1])
    # the same tokens fed in one teacher-forced run give the same outputs
    full = model.run(params, {**enc_inputs, "prev": gen.tokens["prev"], "next": np.zeros((5, 3), dtype=np.int64)},
                     backward=False)
    np.testing.assert_allclose(full.outputs["logits"], gen.outputs["logits"], rtol=1e-12, atol=1e-13)


def test_generation_stops_at_the_end_token(rng):
    g = Graph("counter")
    prev = g.one_hot(g.index_input("prev", 3), name="p1h")
    h = cells.elman(g, prev, 4)
    g.output(g.linear(g.param("V", (3, 4)), h, g.param("c", (3,)), name="y"))
    params = g.init_params(0)
    params["V"][:] = 0.0
    params["c"][:] = [0.0, 0.0, 1.0]  # always predicts 2
    gen = generate(make_engine(g, "reference"), params, feedback={"prev": "y"}, start={"prev": np.zeros(2, int)},
                   steps=10, end=2)
    assert gen.predictions["y"].shape == (1, 2)
    np.testing.assert_array_equal(gen.lengths, [1, 1])


def test_scheduled_sampling_inputs(rng):
    model, enc, dec = tiny_seq2seq()
    params = {k: v + rng.normal(0, 0.5, v.shape) for k, v in {**enc.init_params(rng), **dec.init_params(rng)}.items()}
    inputs, _ = tiny_batch(enc, rng)
    enc_part = {"src": inputs["src"], "keep": inputs["keep"]}
    dec_part = {"prev": inputs["prev"], "next": inputs["next"]}
    init = model.bridged(model.encode(params, enc_part).final_states)
    dec_p = {k: params[k] for k in dec.params}
    assert scheduled_inputs(model.decoder, dec_p, dec_part, feedback={"prev": "logits"}, ratio=0.0, rng=0) is dec_part
    free = scheduled_inputs(model.decoder, dec_p, dec_part, feedback={"prev": "logits"}, ratio=1.0, rng=0,
                            init_states=init)
    gen = model.generate(params, enc_part, start={"prev": inputs["prev"][0]}, steps=inputs["prev"].shape[0])
    np.testing.assert_array_equal(free["prev"], gen.tokens["prev"])  # ratio 1 is free running
    mixed = scheduled_inputs(model.decoder, dec_p, dec_part, feedback={"prev": "logits"}, ratio=0.5, rng=1,
                             init_states=init)
    flips = np.random.default_rng(1).random(mixed["prev"].shape) < 0.5
    flips[0] = False  # the first input is always the true start
    assert flips.any()
    np.testing.assert_array_equal(mixed["prev"][~flips], dec_part["prev"][~flips])
    # where flipped, the input is the argmax of the previous output of a run on these very inputs
    ran = model.decoder.run(dec_p, mixed, init_states=init, backward=False).outputs["logits"].argmax(-1)
    np.testing.assert_array_equal(mixed["prev"][1:][flips[1:]], ran[:-1][flips[1:]])
    np.testing.assert_array_equal(mixed["next"], dec_part["next"])  # targets are never touched
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        scheduled_inputs(model.decoder, dec_p, dec_part, feedback={"prev": "logits"}, ratio=1.5, rng=0)


def test_seq2seq_mistakes_are_named():
    model, enc, dec = tiny_seq2seq()
    with pytest.raises(ValueError, match="share no state name"):
        Seq2Seq(enc, dec)
    with pytest.raises(ValueError, match=r"is \[3\] but encoder state\(s\) \['enc.h', 'enc.c'\] give \[6\]"):
        Seq2Seq(enc, dec, bridge={"dec.h": ["enc.h", "enc.c"]})
    with pytest.raises(ValueError, match="no delay of the decoder reads"):
        Seq2Seq(enc, dec, bridge={"out": "enc.h"})
