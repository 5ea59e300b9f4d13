"""Time unrolled against the tools a user would pick instead, on this machine.

`unrolled bench` hands its whole command line to the benchmark harness
(benchmarks/harness.py), whose parser and help are the only ones; it lives in
the repository's benchmarks/ folder, not in the installed package, so this
runs from a source checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The harness (benchmarks/harness.py) parses the options: `unrolled bench --help` lists them.
FORWARDS_ARGUMENTS = True


def add_arguments(p) -> None:
    """None of its own: every argument goes to the harness as it was typed."""


def _harness():
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / "benchmarks" / "harness.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            from benchmarks import harness

            return harness
    raise OSError("benchmarks/ not found: `unrolled bench` runs from a source checkout of unrolled "
                  "(cd into it, or run python -m benchmarks.harness there)")


def run(args) -> int:
    try:
        return int(_harness().main(list(args.forwarded), prog="unrolled bench") or 0)
    except SystemExit as e:  # the harness's own parser printed its help or usage error, under our name
        return e.code if isinstance(e.code, int) else 2
