"""Where a generated character's time goes, stretch by stretch, on each thread of the split sampler.

W4 splits each step's products across threads (feedsplit.py); the threads meet
at barriers, and a step is as long as the slowest thread's work between each
pair of barriers, not as its total. A profiler sees one Numba function; this
script rewrites the sampler's generated loop with the processor's cycle
counter read at every stretch (each product, each fused loop, each copy, each
barrier, the sampling) and sums the cycles per thread and stretch:

    python -m benchmarks.stretches              # W4's model, the threads the sampler chooses
    python -m benchmarks.stretches --chars 2000 --runs 10 --rounds 3

A thread's time at a barrier is its wait for the other; the waits show which
thread each stretch waits for. The counter's rate is measured against
``time.perf_counter`` over the same runs, so the figures are microseconds.
The instrumented loop is compiled apart (not cached) and run in place of the
sampler's own; the reads of the counter add a little to every stretch.
Run by hand, like the rest of this folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .corpus import load
from .peer_unrolled import sampler
from .workloads import WORKLOADS


@intrinsic
def cycles(typingctx):
    """The processor's cycle counter (``llvm.readcyclecounter``: RDTSC on x86)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


BODY = " " * 8  # the step loop's body in the generated code
COMMENT = re.compile(r"# ([\w.]+) = (\w+)\(")


def instrument(code: str) -> tuple[str, list[str]]:
    """``generate_part``'s source with a count of cycles around each stretch of its step loop, into
    ``TICKS[PART, stretch]`` (a new second argument), and the stretches' names in order."""
    out, names, in_loop, barriers = [], [], False, 0
    lines = code.split("\n")

    def tick(name: str) -> None:
        out.append(f"{BODY}_now = cycles(); TICKS[PART, {len(names) - 1}] += _now - _at; _at = _now")
        names.append(name)

    for i, line in enumerate(lines):
        body = line.startswith(BODY) and not line.startswith(BODY + " ")
        if in_loop and body:
            text = line.strip()
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if text.startswith("if not barrier("):
                barriers += 1
                tick(f"wait {barriers}")
            elif COMMENT.match(text) and not COMMENT.match(out[-1].strip()):
                tick(COMMENT.match(text).group(1))
            elif text == "if PART == 0:" and "n_prime - 1" in nxt:
                tick("sample")
        if line.startswith("    return N"):
            out.append(f"{BODY}_now = cycles(); TICKS[PART, {len(names) - 1}] += _now - _at")
        out.append(line)
        if line.strip().startswith("for t in range(N)"):
            in_loop = True
            out.append(f"{BODY}_at = cycles()")
            names.append("feed")
    text = "\n".join(out).replace("def generate_part(PART, BAR, ", "def generate_part(PART, TICKS, BAR, ")
    return text, names


def compile_instrumented(code: str):
    """The instrumented loop, compiled by Numba with the same imports as the sampler's own."""
    import numba

    from unrolled.engines.compiled.feedback import LOOP_IMPORTS, SPIN_IMPORT

    ns = {"cycles": cycles}
    exec(compile(LOOP_IMPORTS + SPIN_IMPORT + "\n" + code, "<stretches>", "exec"), ns)
    return numba.njit(nogil=True, error_model="numpy")(ns["generate_part"])


def time_stretches(gen) -> tuple[np.ndarray, list[str]]:
    """Put the instrumented loop in place of ``gen``'s split loop (a :class:`Generator` that has run
    split once); the array its runs add cycles to, ``[thread, stretch]``, and the stretches' names."""
    if not gen._split_fns:
        raise SystemExit(f"the sampler ran on {gen.ran_on} thread(s); nothing is split to time")
    key = next(iter(gen._split_fns))
    _, buffers = gen._split_fns[key]
    code, names = instrument(gen.split_code[key])
    inner = compile_instrumented(code)
    ticks = np.zeros((key[0], len(names)), np.int64)
    gen._split_fns[key] = (lambda part, bar, *args: inner(part, ticks, bar, *args), buffers)
    return ticks, names


def measure(workload: str, chars: int, runs: int, rounds: int) -> dict:
    """Per round: µs per character, the counter's rate, and µs per character per thread and stretch."""
    w = dataclasses.replace(WORKLOADS[workload], T=chars)
    generate, gen = sampler(w, load(), seed=0)
    generate()
    ticks, names = time_stretches(gen)
    generate()  # compiles the instrumented loop
    out = []
    for _ in range(rounds):
        ticks[:] = 0
        t0 = time.perf_counter()
        for _ in range(runs):
            generate()
        seconds = time.perf_counter() - t0
        rate = ticks[0].sum() / seconds  # thread 0 counts every cycle from its loop's start to its end
        per = runs * w.T
        out.append({"us_per_char": seconds / per * 1e6, "counter_ghz": rate / 1e9,
                    "threads": [{n: float(ticks[p, i] / rate / per * 1e6) for i, n in enumerate(names)}
                                for p in range(ticks.shape[0])]})
    return {"workload": workload, "threads": ticks.shape[0], "chars": w.T, "runs": runs, "stretches": names, "rounds": out}


def table(result: dict) -> str:
    """The median over rounds of each thread's µs per character in each stretch, one row a stretch."""
    rounds = result["rounds"]
    n = result["threads"]
    lines = [f"{result['workload']}: {result['threads']} threads, {result['chars']} chars x {result['runs']} runs, "
             f"median of {len(rounds)} rounds: {np.median([r['us_per_char'] for r in rounds]):.2f} us/char",
             f"{'stretch':<14}" + "".join(f"{'thread ' + str(p):>10}" for p in range(n))]
    for name in result["stretches"]:
        lines.append(f"{name:<14}" + "".join(f"{np.median([r['threads'][p][name] for r in rounds]):>10.2f}"
                                             for p in range(n)))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", nargs="?", default="W4", help="a sampling workload (default W4)")
    ap.add_argument("--chars", type=int, default=2000, help="characters a run")
    ap.add_argument("--runs", type=int, default=10, help="runs a round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the table gives their median")
    ap.add_argument("--json", action="store_true", help="every round's figures as one JSON object")
    args = ap.parse_args(argv)
    result = measure(args.workload, args.chars, args.runs, args.rounds)
    if args.json:
        import json

        print(json.dumps(result, indent=1))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
