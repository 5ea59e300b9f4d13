"""Data-parallel scaling on one machine: N ranks x 1 thread against 1 process x N threads.

    python -m benchmarks.scaling                    # W2 and W3, 2 ranks / 2 threads, 5 timed updates
    python -m benchmarks.scaling W2 --updates 10 --json

Each configuration runs in fresh processes (``mpiexec -n N python -m
benchmarks.scaling --worker W2`` with one thread per rank, or one process
with N threads) that train the workload's model with the library's
``Trainer`` (truncated BPTT over the workload's [T, B] chunks, Adam, global
norm clipping, mean loss) on random characters, and report:

- ``update_ms``: median wall time of one update (the global batch of B streams);
- ``chars_per_s``: T x B / update time;
- ``allreduce_ms``: median time inside the update's allreduce on rank 0, which
  includes waiting for the slower rank;
- ``wire_ms``: the same allreduce timed alone, right after a barrier: the
  transfer and the sum without the waiting;
- ``param_bytes``: the bytes one allreduce carries.

Run by hand, never by the tests; the figures depend on the machine and on
what else runs on it (note both with the figures, see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
VOCAB = 96  # printable ASCII, about what a text corpus has


def _env(threads: int) -> dict:
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    env.update({v: str(threads) for v in THREAD_VARIABLES})
    return env


def _launch(workload: str, ranks: int, threads: int, updates: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", workload, "--updates", str(updates)]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    p = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["exit " + str(p.returncode)])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def worker(workload_id: str, updates: int, warmup: int = 2) -> dict:
    """Train ``updates`` timed updates of the workload (after ``warmup``), on as many ranks as launched."""
    import numpy as np

    from unrolled.engines.registry import make_engine
    from unrolled.train import distributed
    from unrolled.train.optim import make_optimizer
    from unrolled.train.trainer import Trainer

    from .peer_unrolled import _graph
    from .workloads import get

    w = get(workload_id)
    dp = distributed.from_environment()
    g = _graph(w, VOCAB)
    params = g.init_params(0, np.float32)
    trainer = Trainer(make_engine(g), params, make_optimizer(w.optimizer, w.lr), clip_norm=w.clip_at,
                      combine="sum", k1=w.T, k2=w.T, comm=dp)
    reduce_s: list[float] = []
    if dp is not None:  # time the allreduce inside the update
        inner = dp.allreduce_sum

        def timed(arrays, scale=None):
            t0 = time.perf_counter()
            out = inner(arrays, scale)
            reduce_s.append(time.perf_counter() - t0)
            return out

        dp.allreduce_sum = timed
    rng = np.random.default_rng(0)
    update_s = []
    for k in range(warmup + updates):
        ids = rng.integers(0, VOCAB, size=(w.T + 1, w.B))
        x, y = ids[:-1], ids[1:]
        if dp is not None:
            x, y = dp.shard(x), dp.shard(y)
        t0 = time.perf_counter()
        trainer.train_step({"x": x, "target": y})
        if k >= warmup:
            update_s.append(time.perf_counter() - t0)
    grads = [np.zeros_like(p) for p in params.values()]
    out = {"workload": w.id, "ranks": dp.size if dp else 1, "update_ms": 1e3 * _median(update_s),
           "chars_per_s": w.T * w.B / _median(update_s), "param_bytes": int(sum(p.nbytes for p in params.values()))}
    if dp is not None:
        wire = []
        for _ in range(updates):
            dp.comm.Barrier()
            t0 = time.perf_counter()
            inner(grads)
            wire.append(time.perf_counter() - t0)
        out["allreduce_ms"] = 1e3 * _median(reduce_s[warmup:])
        out["wire_ms"] = 1e3 * _median(wire)
    return out if dp is None or dp.is_root else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("workloads", nargs="*", default=["W2", "W3"], metavar="W",
                   help="training workloads by the names BENCHMARKS.md gives them "
                        "(default: W2 W3, char-rnn's LSTM 2x128 and the large LSTM)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the data-parallel run = threads of the other")
    p.add_argument("--updates", type=int, default=5, help="timed updates per configuration")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--worker", metavar="W", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        out = worker(a.worker, a.updates)
        if out:
            print(json.dumps(out), flush=True)
        return 0
    n = a.ranks
    results = {}
    for w in a.workloads:
        print(f"{w}: 1 process x {n} threads …", file=sys.stderr, flush=True)
        threads = _launch(w, 1, n, a.updates, a.timeout)
        print(f"{w}: {n} ranks x 1 thread …", file=sys.stderr, flush=True)
        ranks = _launch(w, n, 1, a.updates, a.timeout)
        results[w] = {f"1x{n}": threads, f"{n}x1": ranks}
    if a.json:
        print(json.dumps(results))
        return 0
    print(f"{'':4} {'config':>14} {'update ms':>10} {'chars/s':>9} {'allreduce ms':>13} {'wire ms':>8} {'MB':>6}")
    for w, r in results.items():
        for name, v in r.items():
            label = f"1 proc x {n} thr" if name.startswith("1x") else f"{n} ranks x 1 thr"
            if "error" in v:
                print(f"{w:4} {label:>14} error: {v['error']}")
                continue
            print(f"{w:4} {label:>14} {v['update_ms']:10.1f} {v['chars_per_s']:9.0f} "
                  f"{v.get('allreduce_ms', float('nan')):13.2f} {v.get('wire_ms', float('nan')):8.2f} "
                  f"{v['param_bytes'] / 1e6:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
