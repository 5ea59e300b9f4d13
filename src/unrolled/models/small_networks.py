"""Small networks around each ready cell, for checking gradients and drawing.

``unrolled gradcheck NAME`` runs :func:`check_network`; tests and the picture
examples use :func:`small_network` as a graph of every cell that is quick to run.
"""

from __future__ import annotations

import numpy as np

from unrolled.engines.gradcheck import GradcheckReport, check_gradients
from unrolled.graph.folded import Graph

from . import cells


def small_network(name: str, n_in: int = 3, hidden: int = 4, n_out: int = 3) -> Graph:
    """A small classifier around the named cell: x -> cell -> linear -> cross-entropy per step."""
    if name not in cells.CELLS:
        raise ValueError(f"unknown network '{name}'; known: {', '.join(cells.CELLS)}")
    g = Graph(name)
    x = g.input("x", n_in)
    if name == "jordan":
        _, y = cells.jordan(g, x, hidden, n_out)
    else:
        h = cells.layer(g, name, x, hidden)
        V = g.param("out.W", (n_out, hidden))
        c = g.param("out.b", (n_out,), init="normal:0.1")
        y = g.linear(V, h, c, name="y")
    g.output(y)
    g.loss("cross_entropy", y, g.index_input("target", n_out))
    return g


def check_network(name: str, seed: int = 0, T: int = 5, B: int = 3) -> GradcheckReport:
    """Finite differences on a small random instance of the named network."""
    g = small_network(name)
    rng = np.random.default_rng(seed)
    params = {k: v + rng.normal(0, 0.1, v.shape) for k, v in g.init_params(rng).items()}
    inputs = {"x": rng.normal(size=(T, B, 3)), "target": rng.integers(0, 3, (T, B))}
    return check_gradients(g, params, inputs)
