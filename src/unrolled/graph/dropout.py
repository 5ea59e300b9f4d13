"""Dropout as data: a mask input per dropped connection, so that every op stays a pure function.

It lives with the graph because a mask is a kind of input vertex: the cells
add masks, and a trainer (one layer up) fills them, without either knowing
the other.
"""

from __future__ import annotations

import numpy as np

from .folded import Graph
from .nodes import Vertex

DROPOUT_ATTR = "dropout"  # an input vertex carrying this attribute is a dropout mask, the value its rate


def dropout(g: Graph, x: Vertex, rate: float, *, name: str) -> Vertex:
    """Inverted dropout as data, so that every op stays a pure function::

        m_t ~ Bernoulli(1 - rate) / (1 - rate)     (training; all ones at evaluation)
        x̃_t = m_t ⊙ x_t

    ``m`` is a dense input ``name`` of ``x``'s size, fed ``[T, B, F]``; the
    input vertex records its rate (``vertex.attrs["dropout"]``) so that a
    trainer can fill it, see :func:`dropout_masks`. Returns ``x̃``, the
    vertex ``<name>.x``.
    """
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"dropout rate {rate!r} for '{x.name}': a rate must be in [0, 1)")
    m = g.input(name, x.size)
    m.attrs[DROPOUT_ATTR] = float(rate)
    return g.mul(m, x, name=f"{name}.x")


def dropout_rates(graph: Graph) -> dict[str, float]:
    """The graph's dropout-mask inputs and their rates (see :func:`dropout`)."""
    return {v.name: v.attrs[DROPOUT_ATTR] for v in graph.inputs if DROPOUT_ATTR in v.attrs}


def dropout_masks(graph: Graph, T: int, B: int, *, rng=None, train: bool = True, dtype=None) -> dict:
    """A value for every dropout-mask input of ``graph``: ``[T, B, F]`` each.

    Training (``train=True``): independent ``Bernoulli(1 - rate) / (1 - rate)``
    entries drawn from ``rng`` (a seed or a ``numpy.random.Generator``), so
    the expected value of every masked unit is unchanged. Evaluation: ones,
    which makes the network exactly the one without dropout.
    """
    dtype = np.float64 if dtype is None else dtype
    rng = np.random.default_rng(rng)
    out = {}
    for name, rate in dropout_rates(graph).items():
        size = graph.vertices[name].size
        if not train or rate == 0.0:
            out[name] = np.ones((T, B, size), dtype=dtype)
        else:
            keep = 1.0 - rate
            out[name] = (rng.random((T, B, size)) < keep).astype(dtype) / np.asarray(keep, dtype=dtype)
    return out
