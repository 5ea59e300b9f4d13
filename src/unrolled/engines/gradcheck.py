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
