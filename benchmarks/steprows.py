"""What one step product costs on one thread, row count by row count: where a row split's parts stand.

A row split (rowsplit.py) gives each part of a batch its own rows, and each
part's step loop calls oneDNN's ``sgemm`` once a step for each split product
(rows × the loop's width × the gate width, forward; its transpose back) on
one thread. oneDNN's kernel takes the rows in blocks, so the cost of a
product climbs in steps, not row by row: a part whose row count sits just
past a block's end pays for the whole next block. This script times the
product for each row count in a range, both ways, and names the block edges,
so that a choice of parts (how many rows each) can be read off it:

    python -m benchmarks.steprows                     # W2's shapes: rows 8-56, 128 -> 512 and back
    python -m benchmarks.steprows --rows 16-40 --inner 512 --outer 2048 --json

Each row count is timed in ``--rounds`` rounds of ``--reps`` calls, the row
counts taking turns within a round, and reports the median round. Run by
hand, on a quiet machine, like the rest of this folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def _operands(rows: int, k: int, n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (rng.standard_normal((rows, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32),
            np.zeros((rows, n), dtype=np.float32))


def product_call(sgemm, a: np.ndarray, b: np.ndarray, out: np.ndarray):
    """A call of ``sgemm`` computing ``out = a @ b`` (row-major, no transposes), with its arguments bound."""
    (m, k), n = a.shape, b.shape[1]
    args = (b"N", b"N", m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n, 0.0, out.ctypes.data, n)
    return lambda: sgemm(*args)


def measure(sgemm, rows: list[int], inner: int, outer: int, reps: int, rounds: int, seed: int = 0) -> list[dict]:
    """For each row count: the median round's microseconds a product (``rows × inner × outer``, the
    forward step product, and ``rows × outer × inner``, the one sent back), and GFLOP/s."""
    rng = np.random.default_rng(seed)
    shapes = {(r, way): (inner, outer) if way == "forward" else (outer, inner)
              for r in rows for way in ("forward", "back")}
    calls = {}
    for key, (k, n) in shapes.items():
        a, b, out = _operands(key[0], k, n, rng)
        call = product_call(sgemm, a, b, out)
        call()
        if not np.allclose(out, a @ b, rtol=1e-4, atol=1e-3):
            raise RuntimeError(f"sgemm computed a wrong {key[0]} x {k} x {n} product")
        calls[key] = (call, (a, b, out))  # the operands live as long as their call
    times: dict[tuple, list[float]] = {key: [] for key in shapes}
    for _ in range(rounds):
        for key, (call, _) in calls.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                call()
            times[key].append((time.perf_counter() - t0) / reps)
    out = []
    for r in rows:
        row = {"rows": r}
        for way in ("forward", "back"):
            s = statistics.median(times[(r, way)])
            row[f"{way}_us"] = s * 1e6
            row[f"{way}_gflops"] = 2 * r * inner * outer / s / 1e9
        out.append(row)
    return out


def block_edges(table: list[dict], jump: float = 0.1) -> list[int]:
    """The row counts whose forward product costs ``jump`` (a fraction) or more above the row count
    before it: where a new block of rows starts to be paid for."""
    return [b["rows"] for a, b in zip(table, table[1:])
            if b["rows"] == a["rows"] + 1 and b["forward_us"] > a["forward_us"] * (1 + jump)]


def _row_range(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"--rows {text!r}: give FIRST-LAST with 1 <= FIRST <= LAST, e.g. 8-56")
    return list(range(lo, hi + 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=_row_range, default=_row_range("8-56"), help="row counts FIRST-LAST (default 8-56)")
    ap.add_argument("--inner", type=int, default=128, help="the loop's width: a product's inner size (default 128)")
    ap.add_argument("--outer", type=int, default=512, help="the gates' width: its output size (default 512)")
    ap.add_argument("--reps", type=int, default=500, help="calls a round (default 500)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, the row counts taking turns (default 5)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    a = ap.parse_args(argv)
    from unrolled.engines.compiled.kernels import onednn

    if onednn.SGEMM is None:
        print('steprows: oneDNN is not loaded; install it with pip install "unrolled[fast]"', file=sys.stderr)
        return 2
    onednn.one_thread()  # as a part runs its products
    table = measure(onednn.SGEMM, a.rows, a.inner, a.outer, a.reps, a.rounds)
    report = {"onednn": onednn.version(), "inner": a.inner, "outer": a.outer, "load": os.getloadavg()[0],
              "block_edges": block_edges(table), "rows": table}
    if a.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"oneDNN {report['onednn']}, one thread: rows x {a.inner} x {a.outer} (forward) and rows x {a.outer} "
          f"x {a.inner} (back); median of {a.rounds} rounds of {a.reps} calls")
    print(f"{'rows':>5} {'forward us':>11} {'GFLOP/s':>8} {'back us':>9} {'GFLOP/s':>8}")
    for r in table:
        print(f"{r['rows']:>5} {r['forward_us']:>11.1f} {r['forward_gflops']:>8.0f} {r['back_us']:>9.1f} "
              f"{r['back_gflops']:>8.0f}")
    print(f"a new block of rows is paid for from: {', '.join(map(str, report['block_edges'])) or 'no clear edge'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
