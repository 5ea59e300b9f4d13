"""Issue 19's targets, judged on one report or on the median of several.

A target is met on the median of three full runs on one machine, one after
another; ``unrolled bench --runs 3`` makes them and prints this table, so
that nobody sums up the runs by hand. Speed ratios are unrolled over the
peer the target names (higher is better), memory is unrolled's peak over
PyTorch's and W6 is seconds (lower is better for both).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str       # as the table prints it
    workload: str   # "W1" .. "W6"
    measure: str    # "ratio" (unrolled / peer), "cold_s", "warm_s", or "ratio_cold_s" / "ratio_warm_s"
    peer: str       # the system the ratio is taken to; "best" is the fastest peer of that run
    bound: float
    at_least: bool  # True: met when value >= bound; False: when value <= bound

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound

    def bound_text(self) -> str:
        unit = " s" if self.measure in ("cold_s", "warm_s") else "×"
        return f"{'≥' if self.at_least else '≤'} {self.bound:g}{unit}"


TARGETS = [
    Target("W1 vs the best peer", "W1", "ratio", "best", 1.5, True),
    Target("W2 vs PyTorch", "W2", "ratio", "torch", 1.5, True),
    Target("W3 vs PyTorch", "W3", "ratio", "torch", 1.5, True),
    Target("W4 vs the best peer", "W4", "ratio", "best", 1.5, True),
    Target("W5 memory vs PyTorch", "W5", "ratio", "torch", 0.5, False),
    Target("W6 cold start", "W6", "cold_s", "", 3.0, False),
    Target("W6 warm start", "W6", "warm_s", "", 1.0, False),
    Target("W6 cold vs the plain NumPy engine", "W6", "ratio_cold_s", "unrolled-numpy", 1.0, False),
    Target("W6 warm vs the plain NumPy engine", "W6", "ratio_warm_s", "unrolled-numpy", 1.0, False),
]


def value(target: Target, report: dict) -> tuple[float, str] | None:
    """The target's figure in one report, and against whom; None when the report lacks it."""
    subject = report.get("workloads", {}).get(target.workload, {}).get("unrolled", {})
    if target.measure in ("cold_s", "warm_s"):
        return (subject[target.measure], "") if subject.get(target.measure) else None
    ratios = subject.get("ratio_to" if target.measure == "ratio" else target.measure, {})
    if target.peer == "best":  # the fastest peer is the one unrolled's ratio is smallest to
        ratios = {k: v for k, v in ratios.items() if k != "unrolled-numpy"}
        if not ratios:
            return None
        peer = min(ratios, key=ratios.get)
        return ratios[peer], peer
    return (ratios[target.peer], target.peer) if target.peer in ratios else None


def judge(reports: list[dict]) -> list[dict]:
    """Each target's figure run by run, their median and whether the median meets it."""
    rows = []
    for t in TARGETS:
        found = [value(t, r) for r in reports]
        figures = [f[0] for f in found if f is not None]
        median = statistics.median(figures) if figures else None
        rows.append({"target": t.name, "peer": t.peer, "bound": t.bound_text(), "runs": [f and f[0] for f in found],
                     "against": [f and f[1] for f in found], "median": median,
                     "met": None if median is None else t.met(median)})
    return rows


def render(reports: list[dict]) -> list[str]:
    """The targets as table lines: one column per run, then the median and met or missed."""
    rows = [r for r in judge(reports) if r["median"] is not None]
    if not rows:
        return []
    n = len(reports)
    head = "median of the runs" if n > 1 else "this run"
    lines = ["", f"targets (issue 19), {n} run{'s' if n > 1 else ''}: {head} is judged",
             f"  {'target':<36} " + " ".join(f"{f'run {i + 1}':>8}" for i in range(n))
             + f" {'median':>8}  {'bound':<7} verdict"]
    for r in rows:
        runs = " ".join(f"{'-' if v is None else f'{v:.3f}':>8}" for v in r["runs"])
        peers = sorted({p for p in r["against"] if p})
        name = r["target"] + (f" ({', '.join(peers)})" if peers and r["peer"] == "best" else "")
        lines.append(f"  {name:<36} {runs} {r['median']:>8.3f}  {r['bound']:<7} {'met' if r['met'] else 'MISSED'}")
    return lines
