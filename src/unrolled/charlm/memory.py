"""How much memory a setting needs, estimated before any of it is allocated.

A model or a chunk too large for the machine otherwise ends deep inside NumPy
in a ``MemoryError`` traceback (or the system kills the process), after the
run has made its folder. The figures here are counted from the folded
graph's shapes alone, so a command can refuse such a setting first, with the
figure, the memory available, and the flag to change.

The count is deliberately simple and errs high: every parameter with its
gradient and the optimizer's moments, and every vertex's value at every one
of the ``T × B`` positions of a chunk, twice when training (the values the
backward pass reads and their gradients). The engines' work buffers are of
the same sizes as these values, so the estimate covers them within its
factor of two, not to the byte.
"""

from __future__ import annotations

import os

import numpy as np

from unrolled.graph.folded import Graph

# Arrays an optimizer keeps per parameter (its moments), beyond the parameter and its gradient.
OPTIMIZER_SLOTS = {"sgd": 1, "adagrad": 1, "rmsprop": 1, "adam": 2, "adamw": 2}


def parameter_count(graph: Graph) -> int:
    return sum(int(np.prod(p.shape, dtype=np.int64)) for p in graph.params.values())


def values_per_position(graph: Graph) -> int:
    """Numbers every vertex of one time step of one stream holds, all vertices together."""
    return sum(int(v.size) for v in graph.vertices.values())


def training_bytes(graph: Graph, T: int, B: int, dtype, optimizer: str) -> int:
    """Memory of one truncated-BPTT update over ``[T, B]`` chunks (see the module docstring)."""
    item = np.dtype(dtype).itemsize
    params = parameter_count(graph) * (2 + OPTIMIZER_SLOTS.get(optimizer, 2))
    return item * (params + 2 * T * B * values_per_position(graph))


def evaluation_bytes(graph: Graph, T: int, B: int, dtype) -> int:
    """Memory of a forward pass over ``[T, B]`` chunks, no gradients."""
    item = np.dtype(dtype).itemsize
    return item * (parameter_count(graph) + T * B * values_per_position(graph))


def available_bytes() -> int | None:
    """Memory the system could give this process now (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def human(n: float) -> str:
    """Bytes as a short figure: ``'2.4 GB'``, ``'16.0 TB'``."""
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def check_fits(needed: int, what: str, fix: str, available: int | None = None) -> None:
    """Refuse, in one sentence, a setting that needs more memory than the machine has available."""
    available = available_bytes() if available is None else available
    if available is not None and needed > available:
        raise ValueError(f"{what} needs about {human(needed)} of memory, but {human(available)} is available; {fix}")
