"""Bad numbers and bad flags: each refused in one line naming the flag, before any folder is made."""

from __future__ import annotations

import numpy as np
import pytest
from test_cli_train import TINY, corpus, one_line_error

from unrolled.charlm import memory
from unrolled.charlm.batching import iter_eval_chunks
from unrolled.charlm.model import load_model, score_text
from unrolled.cli import build_parser, main
from unrolled.words import count


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text(corpus())
    return p


@pytest.mark.parametrize("flags, needles", [
    (["--seed", "-1"], ["seed is -1", "--seed"]),
    (["--steps", "-2"], ["--steps"]),
    (["--warmup", "-1"], ["--warmup"]),
    (["--dropout", "1.5"], ["--dropout"]),
    (["--hidden", "1000000"], ["needs about", "TB of memory", "available", "--hidden"]),
])
def test_refused_settings_name_the_flag_and_make_no_folder(tmp_path, text_file, capsys, flags, needles):
    out = tmp_path / "nested" / "run"
    rc = main(["train", str(text_file), *TINY, "--steps", "2", *flags, "--out", str(out)])
    one_line_error(capsys, rc, *needles)
    assert not (tmp_path / "nested").exists()


def test_memory_refusal_gives_the_figure_and_what_is_available(tmp_path, text_file, capsys, monkeypatch):
    graph_bytes = {}
    real = memory.training_bytes

    def spy(*a, **kw):
        graph_bytes["n"] = real(*a, **kw)
        return graph_bytes["n"]

    monkeypatch.setattr("unrolled.charlm.training_run.training_bytes", spy)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    rc = main(["train", str(text_file), *TINY, "--steps", "2", "--out", str(tmp_path / "run")])
    line = one_line_error(capsys, rc, "1.0 KB is available", "--seq 8 × --batch 4")
    assert memory.human(graph_bytes["n"]) in line
    assert not (tmp_path / "run").exists()


def test_memory_estimate_counts_parameters_moments_and_chunk_values():
    from unrolled.charlm.model import ModelConfig, build_graph

    g = build_graph(ModelConfig(cell="elman", hidden=10, layers=1, vocab_size=5))
    P = 10 * 15 + 10 + 5 * 10 + 5  # W [10, 5 + 10], b, out.W, out.b
    assert memory.parameter_count(g) == P
    per = memory.values_per_position(g)
    assert memory.training_bytes(g, 7, 3, "float32", "adam") == 4 * (4 * P + 2 * 7 * 3 * per)
    assert memory.training_bytes(g, 7, 3, "float64", "sgd") == 8 * (3 * P + 2 * 7 * 3 * per)
    assert memory.evaluation_bytes(g, 7, 3, "float32") == 4 * (P + 7 * 3 * per)
    assert memory.human(2_400_000_000) == "2.4 GB" and memory.human(999) == "999 bytes"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flags")
    text = tmp / "t.txt"
    text.write_text(corpus(80, seed=3))
    assert main(["train", str(text), *TINY, "--steps", "2", "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def test_evaluate_seq_beyond_the_text_is_cut_to_it(trained, tmp_path, capsys):
    model = load_model(trained)
    text = "the cat sat on the mat and the dog ran"
    base = score_text(model, text, seq=8, batch=2, engine="reference")
    huge = score_text(model, text, seq=10**10, batch=2, engine="reference")
    assert huge.scored == base.scored == len(text) - 1
    assert huge.nats == pytest.approx(base.nats, rel=1e-6)
    ids = np.arange(len(text)) % 5
    shapes = [x.shape for x, _, _ in iter_eval_chunks(ids, 30_000, 2)]
    assert shapes == [(-(-(len(text) - 1) // 2), 2)]  # one chunk, as long as a stream, not as the flag
    f = tmp_path / "t.txt"
    f.write_text(text)
    assert main(["evaluate", str(trained), str(f), "--seq", str(10**10), "--engine", "reference"]) == 0
    assert f"{len(text) - 1} predictions scored" in capsys.readouterr().out


def test_evaluate_refuses_chunks_larger_than_memory(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000)
    f = tmp_path / "t.txt"
    f.write_text(corpus(20))
    rc = main(["evaluate", str(trained), str(f), "--seq", "500", "--engine", "reference"])
    one_line_error(capsys, rc, "needs about", "10.0 KB is available", "--seq")


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "-inf"])
def test_temperature_not_a_finite_number_is_one_usage_error(tmp_path, capsys, value):
    rc = main(["sample", str(tmp_path / "none.npz"), f"--temperature={value}"])
    assert rc == 2
    one_line_error(capsys, rc, f"--temperature {value}", "finite")


def test_steps_zero_is_documented_as_no_limit():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    help_text = " ".join(train.format_help().split())
    assert "0 = no step limit" in help_text


def test_counts_are_singular_only_for_one(tmp_path, text_file, capsys):
    assert count(1, "minute") == "1 minute" and count(2, "minute") == "2 minutes"
    assert count(0.5, "minute", spec="g") == "0.5 minutes" and count(1.0, "minute", spec="g") == "1 minute"
    assert count(1, "vertex", "vertices") == "1 vertex" and count(12345, "character", spec=",") == "12,345 characters"
    rc = main(["train", str(text_file), *TINY, "--steps", "1", "--minutes", "1", "--out", str(tmp_path / "r")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "or for 1 minute\n" in out and "1 minutes" not in out


@pytest.mark.parametrize("flags", [["--seconds", "nan"], ["--seconds", "0"], ["--hidden", "0"]])
def test_demo_bad_numbers_are_one_usage_error(capsys, flags):
    rc = main(["demo", *flags])
    assert rc == 2
    one_line_error(capsys, rc, flags[0])


# found by tests/cli_battery.py


def _argparse_error(capsys, rc, *needles):
    """argparse's refusal: its usage lines, then one line naming the flag."""
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("unrolled ") and "error" in last, err
    for n in needles:
        assert n in last, last


@pytest.mark.parametrize("argv", [["sample", "x.npz"], ["demo"], ["diagnose", "elman", "-o", "g.png"],
                                  ["gradcheck", "elman"]])  # train: TrainConfig's rule, in one line
@pytest.mark.parametrize("value", ["-1", str(2 ** 63), "1.5"])
def test_every_seed_outside_numpys_range_is_refused_naming_seed(capsys, argv, value):
    _argparse_error(capsys, main([*argv, "--seed", value]), "--seed", value)


def test_a_seed_at_the_ends_of_the_range_is_taken():
    parser = build_parser()
    assert parser.parse_args(["sample", "x.npz", "--seed", "0"]).seed == 0
    assert parser.parse_args(["sample", "x.npz", "--seed", str(2 ** 63 - 1)]).seed == 2 ** 63 - 1


def test_layers_beyond_the_bound_are_refused_at_once(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(text_file), *TINY, "--steps", "2", "--layers", "100000", "--out", str(out)])
    one_line_error(capsys, rc, "--layers", "100,000", "at most 1,000")
    assert not out.exists()


def test_minutes_zero_is_refused_saying_how_to_have_no_limit(tmp_path, text_file, capsys):
    rc = main(["train", str(text_file), *TINY, "--minutes", "0", "--out", str(tmp_path / "run")])
    assert rc == 2
    one_line_error(capsys, rc, "--minutes 0", "leave --minutes out for no time limit")


def test_k1_zero_is_documented_as_seq():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert " ".join(train.format_help().split()).count("(default, or 0: --seq)") == 2


@pytest.mark.parametrize("flags, needles", [
    (["--encoding", "bogus-enc"], ["'bogus-enc'", "--encoding"]),
    (["--k1", "10", "--k2", "5"], ["k1 = 10", "--k1 <= --k2"]),
])
def test_train_refusals_name_their_flags(tmp_path, text_file, capsys, flags, needles):
    rc = main(["train", str(text_file), *TINY, "--steps", "2", *flags, "--out", str(tmp_path / "run")])
    one_line_error(capsys, rc, *needles)


def test_evaluate_names_its_encoding_flag(trained, text_file, capsys):
    rc = main(["evaluate", str(trained), str(text_file), "--encoding", "bogus-enc"])
    one_line_error(capsys, rc, "--encoding")


def test_demo_refuses_a_network_beyond_memory_before_making_it(capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 ** 9)
    rc = main(["demo", "--hidden", "1000000", "--seconds", "1"])
    one_line_error(capsys, rc, "--hidden 1,000,000", "needs about", "lower --hidden")


def test_demo_refuses_seconds_beyond_an_hour(capsys):
    rc = main(["demo", "--seconds", "1e10"])
    assert rc == 2
    one_line_error(capsys, rc, "--seconds 1e+10", "unrolled train")


@pytest.mark.parametrize("flags", [["--marker-rate", "2"], ["--marker-rate", "nan"], ["--lr", "nan"], ["--lr", "0"],
                                   ["--symbols", "1"], ["--task", "latch", "--symbols", "1"]])
def test_diagnose_refuses_values_that_are_never_right_whatever_the_task(tmp_path, capsys, flags):
    out = tmp_path / "g.png"
    rc = main(["diagnose", "elman", "-o", str(out), *flags])
    assert rc == 2
    one_line_error(capsys, rc, flags[-2])
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--batch", "-1"], ["--tolerance", "nan"], ["--tolerance", "-1"]])
def test_gradcheck_bad_numbers_are_one_usage_error(capsys, flags):
    rc = main(["gradcheck", "elman", *flags])
    assert rc == 2
    one_line_error(capsys, rc, flags[0])


@pytest.mark.parametrize("flags, needle", [(["--seconds", "nan"], "--seconds"), (["--systems", "bogus"], "--systems")])
def test_bench_checks_its_flags_before_its_corpus(capsys, flags, needle):
    rc = main(["bench", "W1", *flags, "--corpus", "/nonexistent/corpus.txt"])
    one_line_error(capsys, rc, needle)


def test_bench_usage_errors_name_unrolled_bench(capsys):
    _argparse_error(capsys, main(["bench", "W1", "--scaling", "x"]), "unrolled bench", "--scaling")
