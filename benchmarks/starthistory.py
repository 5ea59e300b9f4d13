"""Does a start run slower right after a start that compiled? W6's warm start after two histories.

W6 times fresh processes of well under a second, one after another. This
measures whether what ran just before moves such a start: each round makes
a warm cache for the engine (one cold start), then times the engine's warm
start after each of two histories, in turns (the order flips from round to round):

- after a compile: a cold start of the engine in a throwaway cache, whose
  child compiles every loop and kernel (what the engine's warm row followed
  in the harness before every start was settled);
- after a short process: a cold start of the plain NumPy engine (what its
  warm row followed).

With ``--settle`` the harness's untimed settling start (``_Runner.settle``)
runs between the history and the timed start, as the harness runs it. The
report is the median of the rounds' ratios, after a compile over after a
short process: above 1, the compile's aftermath slows the next start.

    python -m benchmarks.starthistory --rounds 8 [--settle] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace

from . import workloads
from .harness import PLAIN_NUMPY_ENV, SUBJECT, _Runner, cache_env, child_env, run_child

HISTORIES = ("after_compile", "after_short")


def rounds(n: int, new_round, settle=None) -> list[dict]:
    """``n`` rounds; ``new_round()`` is a context giving a round's ``(time_warm, histories)``: a
    warm start's seconds, and each history by name (an untimed call). Each history runs, then
    ``settle`` (untimed) if given, then the timed warm start; the order flips from round to round."""
    out = []
    for i in range(n):
        with new_round() as (time_warm, histories):
            row = {}
            for name in (list(histories) if i % 2 == 0 else list(histories)[::-1]):
                histories[name]()
                if settle is not None:
                    settle()
                row[name] = time_warm()
        out.append(row)
    return out


def summary(rows: list[dict]) -> dict:
    """Each history's median seconds and the median of the rounds' ratios (after a compile / short)."""
    first, second = HISTORIES
    return {**{f"{h}_s": statistics.median(r[h] for r in rows) for h in HISTORIES},
            "ratio": statistics.median(r[first] / r[second] for r in rows), "rounds": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.starthistory", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--settle", action="store_true", help="the harness's settling start before each timed one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--corpus", default=None, help="corpus file (default ../shared/data/shakespeare.txt)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds {a.rounds}: give 1 or more")
    runner = _Runner(SimpleNamespace(threads=a.threads, seconds=1, reps=1, warmup=0, corpus=a.corpus, timeout=None),
                     print, 0.0, None)
    w6 = workloads.get("W6")
    args = runner.worker_args(w6, SUBJECT, a.threads)

    def start(extra_env: dict) -> float:
        out = run_child(args, {**child_env(a.threads), **extra_env}, runner.timeout)
        if "error" in out:
            raise SystemExit(f"starthistory: a W6 start failed: {out['error']}")
        return out["wall_s"]

    def in_a_throwaway_cache(extra_env: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="unrolled-bench-history-") as tmp:
            start({**extra_env, **cache_env(Path(tmp))})

    @contextlib.contextmanager
    def new_round():
        with tempfile.TemporaryDirectory(prefix="unrolled-bench-cache-") as tmp:
            warm_env = cache_env(Path(tmp))
            start(warm_env)  # the round's cache, made warm by one cold start
            yield (lambda: start(warm_env)), {"after_compile": lambda: in_a_throwaway_cache({}),
                                              "after_short": lambda: in_a_throwaway_cache(PLAIN_NUMPY_ENV)}

    rows = rounds(a.rounds, new_round, (lambda: runner.settle(w6)) if a.settle else None)
    result = summary(rows)
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        for i, r in enumerate(rows):
            print(f"round {i}: after a compile {r['after_compile'] * 1e3:.0f} ms, "
                  f"after a short process {r['after_short'] * 1e3:.0f} ms")
        print(f"median ratio, after a compile / after a short process: {result['ratio']:.3f}"
              f"{' (settled)' if a.settle else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
