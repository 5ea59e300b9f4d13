"""Benchmarks: workloads W1-W5 of BENCHMARKS.md, the peers, and the harness.

Run by hand from the repository root, never in the test suite:

    python -m benchmarks.harness W1 W4 --json

Every (workload, system) pair runs in its own fresh process
(`benchmarks.worker`), one after another; the harness collects the results
and prints same-run ratios. See README.md in this folder.
"""
