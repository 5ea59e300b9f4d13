"""Central finite differences against an engine's gradients.

The oracle for everything PyTorch cannot express: nudge each parameter
entry (and each dense input and initial-state entry) by ±eps in float64,
rerun the forward pass, and compare ``(L+ - L-) / 2 eps`` with the engine's
analytic gradient. Errors are measured per array, norm-wise:
``|numeric - analytic| / max(|numeric|, |analytic|)``, which stays meaningful
when single entries are near zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unrolled.graph.folded import Graph
from unrolled.models import cells

from .registry import make_engine


@dataclass
class GradcheckReport:
    errors: dict[str, float]  # array name -> relative error

    @property
    def worst(self) -> tuple[str, float]:
        name = max(self.errors, key=self.errors.get)
        return name, self.errors[name]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def check_gradients(graph: Graph, params, inputs, *, init_states=None, masks=None, engine: str = "reference",
                    eps: float = 1e-6, steps=None, batch=None) -> GradcheckReport:
    """Compare every gradient the engine returns with central differences (float64 only)."""
    params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    inputs = {k: (np.array(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v))
              for k, v in (inputs or {}).items()}
    init_states = {k: np.array(v, dtype=np.float64) for k, v in (init_states or {}).items()}
    eng = make_engine(graph, engine)
    kw = dict(masks=masks, steps=steps, batch=batch)
    result = eng.run(params, inputs, init_states=init_states, **kw)

    def loss() -> float:
        return eng.run(params, inputs, init_states=init_states, backward=False, **kw).loss

    errors = {}
    for name, arr in params.items():
        errors[name] = relative_error(numeric_gradient(loss, arr, eps), result.grads[name])
    for name, grad in result.input_grads.items():
        errors[f"input {name}"] = relative_error(numeric_gradient(loss, inputs[name], eps), grad)
    for name, grad in result.init_grads.items():
        if name in init_states:
            errors[f"initial {name}"] = relative_error(numeric_gradient(loss, init_states[name], eps), grad)
    return GradcheckReport(errors)


def numeric_gradient(loss, arr: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar ``loss()`` with respect to ``arr``, nudged in place."""
    out = np.zeros_like(arr)
    flat, grad = arr.reshape(-1), out.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        up = loss()
        flat[i] = keep - eps
        down = loss()
        flat[i] = keep
        grad[i] = (up - down) / (2 * eps)
    return out


# ------------------------------------------------ small networks to check

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
