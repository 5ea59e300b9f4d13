"""Time unrolled against the tools a user would pick instead, on this machine.

Runs the workloads of BENCHMARKS.md (min-char-rnn's Elman network, char-rnn's
LSTM 2x128, a large LSTM, sampling, peak memory of one long BPTT step, start-up
time) with unrolled and each peer (PyTorch on the CPU, eager and compiled, JAX
when installed, a plain NumPy loop where min-char-rnn has one), one after
another, each in a fresh process, and prints median chars/s with min-max,
unrolled's ratio to each peer, GFLOP/s and % of the machine's matrix-product
peak measured in the same run, and the two LSTM training workloads at 1 and 2
threads; --json prints one object. --runs 3 makes three full runs and judges
the targets on their median. Only same-run ratios mean anything on a shared machine.

The benchmark code lives in the repository's benchmarks/ folder (not in the
installed package): run this from a source checkout.
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
