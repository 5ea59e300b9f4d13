"""The command line as a new user meets it: --version, bench --corpus."""

from __future__ import annotations

import types

import unrolled
from unrolled.cli import bench_cmd, main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"unrolled {unrolled.__version__}"


def test_bench_passes_corpus_to_the_harness(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(bench_cmd, "_harness",
                        lambda: types.SimpleNamespace(main=lambda argv, prog: seen.append((argv, prog)) or 0))
    corpus = tmp_path / "c.txt"
    assert main(["bench", "W1", "--corpus", str(corpus), "--reps", "2"]) == 0
    assert seen == [(["W1", "--corpus", str(corpus), "--reps", "2"], "unrolled bench")]


def test_bench_passes_threads_and_scaling_to_the_harness(monkeypatch):
    seen = []
    monkeypatch.setattr(bench_cmd, "_harness",
                        lambda: types.SimpleNamespace(main=lambda argv, prog: seen.append(argv) or 0))
    assert main(["bench", "W2", "--threads", "1", "--scaling", "none"]) == 0
    assert seen == [["W2", "--threads", "1", "--scaling", "none"]]


def test_bench_passes_runs_to_the_harness(monkeypatch):
    seen = []
    monkeypatch.setattr(bench_cmd, "_harness",
                        lambda: types.SimpleNamespace(main=lambda argv, prog: seen.append(argv) or 0))
    assert main(["bench", "--runs", "3", "--json"]) == 0
    assert seen == [["--runs", "3", "--json"]]


def test_bench_help_is_the_harness_help_under_its_own_name(capsys):
    """One parser holds the options (the harness's): `unrolled bench --help` lists every one of them."""
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: unrolled bench")
    for flag in ("--runs", "--start-rounds", "--scaling", "--corpus", "--systems", "--json"):
        assert flag in out


def test_other_commands_still_refuse_arguments_they_do_not_know(capsys):
    assert main(["demo", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_bench_refuses_runs_below_one_under_its_own_name(capsys):
    assert main(["bench", "W1", "--runs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unrolled bench: error:") and "--runs >= 1" in err


def test_bench_names_a_missing_corpus(tmp_path, capsys):
    rc = main(["bench", "W1", "--corpus", str(tmp_path / "none.txt")])
    out = capsys.readouterr()
    assert rc != 0
    assert "none.txt not found: pass --corpus FILE" in out.out + out.err
