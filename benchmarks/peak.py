"""The machine's fp32 matrix-product peak, measured in a fresh process.

    python -m benchmarks.peak --threads 2

Times float32 `A @ B` (2048 x 2048) with NumPy, with `torch.mm` when
PyTorch is installed, and with oneDNN's sgemm when unrolled's fast extra
installed it (unrolled's products go there, and a peak below what a system
reaches would make its % of peak meaningless); prints one JSON line with the
best GFLOP/s of each and `peak_gflops`, the largest. "Best of several"
because a shared machine only ever makes a product slower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .worker import limit_threads


def best_gflops(matmul, n: int, tries: int) -> float:
    flops = 2.0 * n**3
    matmul()                            # first call: thread start-up, page faults
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def measure(n: int = 2048, tries: int = 10, threads: int = 2) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    result = {"n": n, "tries": tries, "numpy_gflops": best_gflops(lambda: np.matmul(a, b, out=out), n, tries)}
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tout = torch.empty(n, n)
        result["torch_gflops"] = best_gflops(lambda: torch.mm(ta, tb, out=tout), n, tries)
    try:
        from unrolled.engines.compiled.kernels import onednn
    except ImportError:
        onednn = None
    if onednn is not None and onednn.SGEMM is not None:
        ptr = a.ctypes.data, b.ctypes.data, out.ctypes.data
        result["onednn_gflops"] = best_gflops(
            lambda: onednn.SGEMM(b"N", b"N", n, n, n, 1.0, ptr[0], n, ptr[1], n, 0.0, ptr[2], n), n, tries)
    result["peak_gflops"] = max(v for k, v in result.items() if k.endswith("_gflops"))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peak", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    limit_threads(a.threads)
    print(json.dumps(measure(a.n, a.tries, a.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
