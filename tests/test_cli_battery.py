"""The command-line battery's judge (tests/cli_battery.py): how it sorts an outcome. The battery itself runs
from the command line (`PYTHONPATH=src python tests/cli_battery.py`), not in the suite."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_battery as b  # noqa: E402

USAGE = "usage: unrolled train [-h] [--cell {lstm,gru}]\n                      [--hidden N]\n"


def test_a_one_line_refusal_naming_the_flag_is_clean():
    o = b.Outcome(2, "", USAGE + "unrolled train: error: argument --hidden: invalid int value: 'x'\n", 1.0)
    assert b.judge_error(o, ("--hidden",))[0] == b.CLEAN
    assert b.judge_error(o, ("--seed",))[0] == b.OTHER  # it does not name the flag at fault


def test_tracebacks_crashes_and_signals_are_tracebacks():
    for o in (b.Outcome(1, "", "Traceback (most recent call last):\n  ...\nValueError: x\n", 1.0),
              b.Outcome(-11, "", "", 1.0), b.Outcome(134, "", "munmap_chunk(): invalid pointer\n", 1.0)):
        assert b.judge_error(o)[0] == b.TRACEBACK
        assert b.judge_ok(o)[0] == b.TRACEBACK


def test_exit_0_on_bad_input_is_a_silent_wrong_answer_and_a_hang_is_other():
    assert b.judge_error(b.Outcome(0, "trained\n", "", 1.0))[0] == b.SILENT
    assert b.judge_error(b.Outcome(-9, "", "", 120.0, timed_out=True))[0] == b.OTHER
    assert b.judge_error(b.Outcome(1, "", "unrolled: error: a\nsecond line\n", 1.0))[0] == b.OTHER


def test_a_good_command_refused_or_badly_worded_is_other():
    assert b.judge_ok(b.Outcome(0, "done\n", "", 1.0)) is None
    assert b.judge_ok(b.Outcome(1, "", "unrolled train: error: no\n", 1.0))[0] == b.OTHER
    assert b.judge_ok(b.Outcome(0, "trained for 1 minutes\n", "", 1.0))[0] == b.OTHER


def test_a_refused_command_that_changes_a_guarded_file_has_lost_data(tmp_path, monkeypatch):
    ctx = b.Context(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest.npz").write_bytes(b"step 6")

    def clobbering_run(argv, **kw):
        (tmp_path / "run" / "latest.npz").write_bytes(b"step 3")
        return b.Outcome(1, "", "unrolled train: error: run is busy\n", 0.1)
    monkeypatch.setattr(ctx, "run", clobbering_run)
    case = b.Case("clobber", ["train"], needles=("run",), guard=("run",))
    assert b.judge(ctx, case)[0] == b.LOST


def test_every_case_has_a_unique_name_and_an_expectation():
    cases = b.all_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names)) and len(cases) > 200
    assert all(c.expect in ("error", "ok", "either") for c in cases)
    refusals = [c for c in cases if c.expect != "ok" and c.runner is None]
    assert [c.name for c in refusals if not c.needles] == []  # each says what its error must name
