"""Check a network's gradients against central finite differences.

Builds a small instance of the named network (elman, jordan, lstm, gru)
with random weights and inputs, compares the engine's BPTT gradients with
finite differences in float64, prints the largest relative error and exits
0 when it is at most the tolerance (1e-6), 1 otherwise.
"""

from __future__ import annotations

import math

from unrolled.models import cells
from unrolled.models.small_networks import check_network

from . import UsageError, seed


def add_arguments(p) -> None:
    p.add_argument("name", help=f"network: {', '.join(cells.CELLS)}")
    p.add_argument("--seed", type=seed, default=0, help="random weights and inputs (default 0)")
    p.add_argument("--steps", type=int, default=5, help="sequence length T (default 5)")
    p.add_argument("--batch", type=int, default=3, help="batch size B (default 3)")
    p.add_argument("--tolerance", type=float, default=1e-6, help="largest relative error accepted (default 1e-6)")


def run(args) -> int:
    if args.name not in cells.CELLS:
        raise UsageError(f"unknown network '{args.name}'; known networks: {', '.join(cells.CELLS)}")
    for flag in ("steps", "batch"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: give a whole number of at least 1")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):  # 0: nothing but an exact match passes
        raise UsageError(f"--tolerance {args.tolerance}: give a relative error of 0 or more, e.g. 1e-6")
    report = check_network(args.name, seed=args.seed, T=args.steps, B=args.batch)
    for name, err in sorted(report.errors.items()):
        print(f"  {name:<20} relative error {err:.2e}")
    worst, err = report.worst
    ok = err <= args.tolerance
    print(f"{args.name}: largest relative error {err:.2e} ({worst}) {'<=' if ok else '>'} {args.tolerance:g}: "
          f"{'ok' if ok else 'FAILED'}")
    return 0 if ok else 1
