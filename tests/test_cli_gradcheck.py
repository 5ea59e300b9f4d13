"""`unrolled gradcheck NAME`, called in-process through the CLI's main()."""

from __future__ import annotations

import re

import pytest

from unrolled.cli import main
from unrolled.models import cells

SUMMARY = re.compile(r"^(\w+): largest relative error (\S+) \((.+)\) (<=|>) (\S+): (ok|FAILED)$", re.M)


@pytest.mark.parametrize("name", ["elman", "jordan", "lstm", "gru"])
def test_known_network_passes(name, capsys):
    assert main(["gradcheck", name]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    (summary,) = SUMMARY.findall(out)
    assert summary[0] == name and summary[5] == "ok"
    assert float(summary[1]) <= 1e-6
    # one line per checked array before the summary, each with its error
    rows = [l for l in out.splitlines() if "relative error" in l and not l.startswith(name)]
    assert rows and all(float(l.split()[-1]) <= 1e-6 for l in rows)
    assert float(summary[1]) == max(float(l.split()[-1]) for l in rows)


def test_options_are_used(capsys):
    assert main(["gradcheck", "gru", "--seed", "3", "--steps", "2", "--batch", "1"]) == 0
    assert "gru: largest relative error" in capsys.readouterr().out


def test_failing_tolerance_exits_1(capsys):
    assert main(["gradcheck", "elman", "--tolerance", "0"]) == 1
    (summary,) = SUMMARY.findall(capsys.readouterr().out)
    assert summary[3] == ">" and summary[5] == "FAILED"


def test_unknown_name_is_one_line_and_exit_2(capsys):
    assert main(["gradcheck", "transformer"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "unknown network 'transformer'" in lines[0]
    assert all(name in lines[0] for name in cells.CELLS)


def test_missing_name_is_a_usage_error(capsys):
    assert main(["gradcheck"]) == 2
    assert "Traceback" not in capsys.readouterr().err
