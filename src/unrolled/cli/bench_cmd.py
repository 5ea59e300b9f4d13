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


def add_arguments(p) -> None:
    p.add_argument("rest", nargs="*", metavar="W", help="workloads by the names BENCHMARKS.md gives them (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--systems", help="comma-separated: unrolled,torch,jax,numpy (default all)")
    p.add_argument("--seconds", help="minimum length of one timed repetition (default 2)")
    p.add_argument("--reps", help="timed repetitions (default 5)")
    p.add_argument("--warmup", help="untimed warm-up steps (default 3)")
    p.add_argument("--threads", help="cores every system may use (default 2)")
    p.add_argument("--scaling", metavar="N,M", help="thread counts at which the two LSTM training workloads are also reported "
                                                    "(default 1,2; none to skip)")
    p.add_argument("--corpus", metavar="FILE", help="the text the workloads train on "
                                                    "(default $UNROLLED_BENCH_CORPUS, else ../shared/data/shakespeare.txt)")
    p.add_argument("--start-rounds", metavar="N", help="cold and warm starts of every start-up row, the rows taking "
                                                        "turns; each reports its median (default 3)")
    p.add_argument("--runs", metavar="N", help="full runs one after another, then the targets judged on their "
                                                "median (default 1)")


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
    argv = list(args.rest)
    if args.json:
        argv.append("--json")
    for flag in ("systems", "seconds", "reps", "warmup", "threads", "scaling", "corpus", "start_rounds", "runs"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    try:
        return int(_harness().main(argv, prog="unrolled bench") or 0)
    except SystemExit as e:  # the harness's own parser printed its usage error, under our name
        return e.code if isinstance(e.code, int) else 2
