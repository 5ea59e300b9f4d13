"""Variable-length sequences in one padded batch: padding, loss masks, frozen state.

Rows of different lengths share one ``[T, B, ...]`` batch: :func:`pad` fills
the short rows, :func:`length_mask` keeps the loss to each row's own steps,
and :func:`freeze_after_end` rewires a graph so that a row's state stops
changing after its last step (fed by :func:`keep_feed`), so the final state a
batch returns for each row is that row's own.
"""

from __future__ import annotations

import copy

import numpy as np

from unrolled.graph.folded import Graph, Vertex
from unrolled.words import count

KEEP_INPUT = "keep"


def freeze_after_end(graph: Graph, keep: str = KEEP_INPUT) -> Graph:
    """A copy of ``graph`` in which every state stops changing after each row's last step.

    Each vertex ``s`` read through a delay gets its next value through a
    gate, ``keep`` being a new dense input that is 1 on a row's own steps and
    0 on its padding::

        s.raw_t = (what s was)
        s_t     = keep_t ⊙ s.raw_t + (1 - keep_t) ⊙ s_{t-1}

    With ``keep`` exactly 0 or 1 this is exact in floating point: on a row's
    steps ``s = s.raw``, after them ``s`` holds its last value, so the final
    state is the state at the row's last step, and no gradient reaches the
    padding's computations. Parameters, state names and everything else are
    unchanged, so the same parameters run both graphs. ``keep`` is one input
    the size of the largest state (sliced for smaller ones), because
    elementwise ops take equal sizes; :func:`keep_feed` builds it from the
    lengths. Only states read one step back can be frozen this way.
    """
    g = copy.deepcopy(graph.check())
    delayed = g.delayed()
    if not delayed:
        raise ValueError(f"freeze_after_end: graph '{graph.name}' has no state (no vertex is read through a delay)")
    deep = sorted(n for n, d in delayed.items() if d > 1)
    if deep:
        raise ValueError(
            f"freeze_after_end: '{deep[0]}' is read {count(delayed[deep[0]], 'step')} back; freezing after a row's end "
            f"keeps one step of history, so it supports states read one step back only"
        )
    width = max(g.vertices[n].size for n in delayed)
    k = g.input(keep, width)
    gates: dict[int, tuple[Vertex, Vertex]] = {}

    def gate(size: int) -> tuple[Vertex, Vertex]:
        if size not in gates:
            ks = k if size == width else g.slice(k, 0, size, name=_fresh(g, f"{keep}.{size}"))
            gates[size] = (ks, g.one_minus(ks, name=_fresh(g, f"{ks.name}.off")))
        return gates[size]

    for name in delayed:
        s = g.vertices[name]
        if s.kind != "op":
            raise ValueError(f"freeze_after_end: '{name}' is an input read through a delay; only computed states can be frozen")
        raw = g._add(Vertex(g, _fresh(g, f"{name}.raw"), s.size, "op", s.op, s.args, s.attrs))
        on, off = gate(s.size)
        kept = g.mul(on, raw, name=_fresh(g, f"{name}.kept"))
        held = g.mul(off, g.delay(s, 1), name=_fresh(g, f"{name}.held"))
        s.op, s.args, s.attrs = "add", (kept, held), {}
        g._changed()  # the graph caches its order and checks; s was rewired in place
    g.name = f"{graph.name}+frozen"
    return g.check()


def _fresh(g: Graph, name: str) -> str:
    while name in g.vertices or name in g.params:
        name += "_"
    return name


def _lengths(lengths, T: int | None) -> tuple[np.ndarray, int]:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be a 1-D array of whole numbers (one per row), got {lengths.dtype} {list(lengths.shape)}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"a length is {lengths.min()}; lengths must be at least 0")
    T = int(lengths.max(initial=0)) if T is None else int(T)
    if lengths.size and lengths.max() > T:
        raise ValueError(f"a row is {count(int(lengths.max()), 'step')} long but the batch covers T={T}; pad to at least that")
    return lengths, T


def length_mask(lengths, T: int | None = None) -> np.ndarray:
    """``[T, B]``: 1 on each row's own steps (``t < length``), 0 on its padding."""
    lengths, T = _lengths(lengths, T)
    return (np.arange(T)[:, None] < lengths[None, :]).astype(np.float64)


def last_step_mask(lengths, T: int | None = None) -> np.ndarray:
    """``[T, B]``: 1 at each row's last step only (a many-to-one loss); rows of length 0 get none."""
    lengths, T = _lengths(lengths, T)
    return (np.arange(T)[:, None] == lengths[None, :] - 1).astype(np.float64)


def keep_feed(graph: Graph, lengths, T: int | None = None, keep: str = KEEP_INPUT) -> np.ndarray:
    """The ``keep`` input of a graph from :func:`freeze_after_end`: ``[T, B, F]``, 1 on a row's steps, 0 after."""
    if keep not in graph.vertices or graph.vertices[keep].kind != "input":
        raise ValueError(f"graph '{graph.name}' has no input '{keep}'; build it with freeze_after_end(graph)")
    m = length_mask(lengths, T)
    return np.repeat(m[:, :, None], graph.vertices[keep].size, axis=2)


def pad(sequences, T: int | None = None, value=0) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of different lengths (each ``[L_i, ...]``) as one time-major batch ``[T, B, ...]`` and their lengths."""
    seqs = [np.asarray(s) for s in sequences]
    if not seqs:
        raise ValueError("pad: no sequences")
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    _, T = _lengths(lengths, T)
    tail = {s.shape[1:] for s in seqs}
    if len(tail) != 1:
        raise ValueError(f"pad: the sequences' steps have different shapes {sorted(tail)}")
    out = np.full((T, len(seqs)) + tail.pop(), value, dtype=np.result_type(*seqs))
    for b, s in enumerate(seqs):
        out[: len(s), b] = s
    return out, lengths
