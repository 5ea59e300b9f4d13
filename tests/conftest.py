"""Shared test fixtures: strict numerics and a seeded generator.

NumPy's floating-point warnings (overflow, invalid, divide by zero) become
errors, so a NaN born deep inside a computation fails the test where it is
born instead of three asserts later. Underflow stays ignored, as NumPy's
default: flushing exp(-800) to 0 is correct arithmetic, not a warning.
"""

from __future__ import annotations

import os

# The compiled engine's "auto" mode would hand small runs to Numba, compiling each
# test graph for seconds; tests take the NumPy loop unless they ask for jit=True
# (tests/test_jit.py does, on a fixed set of graphs).
os.environ.setdefault("UNROLLED_JIT", "0")
# Multithreaded BLAS on tiny test matrices spends its time waking and spinning threads,
# the more so on a machine whose few cores other jobs share; one thread is many times faster.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402  (after the environment is set: OpenBLAS reads it at import)
import pytest  # noqa: E402

from unrolled.engines.compiled import background  # noqa: E402

# A test that asks for a strategy gets it from the first run: no start on the NumPy loops while a
# child compiles (tests/test_background.py turns that on where it tests it).
background.set_enabled(False)


@pytest.fixture(autouse=True)
def strict_numpy():
    old = np.seterr(all="raise", under="ignore")
    try:
        yield
    finally:
        np.seterr(**old)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
