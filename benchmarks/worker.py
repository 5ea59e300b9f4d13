"""Run ONE (workload, system) pair in this process and print one JSON line.

    python -m benchmarks.worker W1 torch --seconds 2 --reps 5 --warmup 3

The harness starts one fresh worker per pair, so that imports, thread pools,
allocator state and peak memory of one system never leak into another. The
last line of stdout is the result: the peer's dict plus `gflops` and
`version`, or `{"error": "..."}` when the system is not installed, does not
cover the workload, or failed.

Only the standard library is imported at module level: the thread limit
(`--threads`) must be in place before NumPy, PyTorch or JAX start their
thread pools.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import sys
import traceback

SYSTEMS = ("unrolled", "torch", "jax", "numpy")

# Which workloads each peer covers (BENCHMARKS.md: the NumPy loop does W1, W4).
COVERS = {
    "unrolled": {"W1", "W2", "W3", "W4", "W5", "W6", "W7"},
    "torch": {"W1", "W2", "W3", "W4", "W5", "W6", "W7"},
    "jax": {"W1", "W2", "W3", "W4", "W5", "W6", "W7"},
    "numpy": {"W1", "W4"},
}

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# XLA on the CPU runs one computation on one thread with these (its Eigen pool off).
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def limit_threads(n: int) -> None:
    """Let every library of this process use at most `n` cores, JAX on the CPU.

    The environment variables cover OpenBLAS, MKL and OpenMP (and with it
    unrolled's oneDNN threads); with `n` = 1, XLA's flags keep JAX on one
    thread; pinning the process to `n` CPUs covers the rest (XLA sizes its
    pool from the affinity mask). On a machine with exactly `n` cores the
    pinning is a no-op.
    """
    for var in THREAD_VARIABLES:
        os.environ.setdefault(var, str(n))
    if n == 1 and "intra_op_parallelism_threads" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_ONE_THREAD).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # CPU benchmarks, even where JAX sees a GPU
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > n:
            os.sched_setaffinity(0, cpus[:n])
    except (AttributeError, OSError):
        pass


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def run_one(workload_id: str, system: str, protocol, corpus_path=None) -> dict:
    from . import corpus as corpus_mod
    from . import workloads

    w = workloads.get(workload_id)
    if system not in SYSTEMS:
        return {"error": f"unknown system {system!r}: choose from {', '.join(SYSTEMS)}"}
    if w.id not in COVERS[system]:
        return {"error": f"n/a: the {system} peer does not cover {w.id}"}
    try:
        lib = importlib.import_module(system)
    except ImportError as e:
        return {"error": f"not installed ({e})"}
    try:
        peer = importlib.import_module(f"benchmarks.peer_{system}")
        data = corpus_mod.load(corpus_path)
        out = peer.run(w, data, protocol)
    except Exception as e:  # report, never crash the whole run
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=-4)}
    if "chars_per_s" in out:
        out["gflops"] = out["chars_per_s"] * w.flops_per_char / 1e9
    out["version"] = getattr(lib, "__version__", None) or _dist_version(system)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker",
                                description="Run one (workload, system) pair; print one JSON line.")
    p.add_argument("workload", help="W1 .. W6")
    p.add_argument("system", choices=SYSTEMS)
    p.add_argument("--seconds", type=float, default=2.0, help="minimum length of one repetition")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--loss-steps", type=int, default=20, help="final loss = mean over this many last steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="cores every library may use")
    p.add_argument("--corpus", default=None, help="corpus file (default ../shared/data/shakespeare.txt)")
    p.add_argument("--variant", default="", help="a peer's configuration (torch: eager or compile)")
    a = p.parse_args(argv)
    limit_threads(a.threads)

    from .protocol import Protocol

    protocol = Protocol(a.seconds, a.reps, a.warmup, a.loss_steps, a.seed, a.threads, a.variant)
    try:
        out = run_one(a.workload, a.system, protocol, a.corpus)
    except (ValueError, FileNotFoundError) as e:
        out = {"error": str(e)}
    sys.stdout.flush()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
