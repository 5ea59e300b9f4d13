"""Small graphs, random feeds and finite differences shared by the correctness tests.

Every graph here is tiny (a few features, a handful of steps) so that
central finite differences over all of its parameters take milliseconds.
The builders are keyed by name in :data:`GRAPHS`; each returns a fresh,
checked :class:`~unrolled.graph.Graph` whose losses are named ``xent`` (and
``mse`` where there is one), so that masks can be given by name.
"""

from __future__ import annotations

import numpy as np

from unrolled import cells
from unrolled.gradcheck import numeric_gradient
from unrolled.graph import Graph

N_IN, HIDDEN, N_OUT = 3, 4, 3


# ------------------------------------------------------------ numerics


def relative_error(a, b) -> float:
    """Norm-wise relative error ``|a - b| / max(|a|, |b|)`` (0 when both are 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar ``f()`` with respect to ``x``, nudged in place."""
    assert np.shares_memory(x.reshape(-1), x), "x must be contiguous so that nudging it reaches f"
    return numeric_gradient(f, x, eps).astype(np.float64, copy=False)


# ------------------------------------------------------------ feeds


def make_params(g: Graph, rng: np.random.Generator, dtype=np.float64) -> dict[str, np.ndarray]:
    """The graph's own initial values plus a little noise, so that no bias or initial state is all zeros."""
    return {k: (v + rng.normal(0.0, 0.2, v.shape)).astype(dtype) for k, v in g.init_params(rng).items()}


def perturbed_params(g: Graph, rng: np.random.Generator, dtype=np.float64) -> dict[str, np.ndarray]:
    """The graph's initial parameters plus N(0, 0.3) noise: no zero biases or states hiding a wrong gradient."""
    return {k: (v + rng.normal(0, 0.3, v.shape)).astype(dtype) for k, v in g.init_params(rng, dtype).items()}


def make_inputs(g: Graph, T: int, B: int, rng: np.random.Generator, dtype=np.float64) -> dict[str, np.ndarray]:
    """Random inputs for every input vertex: ``[T, B, F]`` normals, ``[T, B]`` class numbers."""
    out = {}
    for v in g.inputs:
        if v.kind == "index":
            out[v.name] = rng.integers(0, v.size, (T, B))
        else:
            out[v.name] = rng.normal(size=(T, B, v.size)).astype(dtype)
    return out


def make_init_states(g: Graph, B: int, rng: np.random.Generator, *, every: bool = False, dtype=np.float64):
    """Random initial states for the states declared ``init="given"`` (for every delayed vertex if ``every``)."""
    out = {}
    for name, D in g.delayed().items():
        v = g.vertices[name]
        if every or v.init == "given":
            shape = (B, v.size) if D == 1 else (D, B, v.size)
            out[name] = rng.normal(0.0, 0.5, shape).astype(dtype)
    return out


def history_depths(g: Graph) -> dict[str, int]:
    """Each vertex read through a delay, with its deepest delay, worked out from the vertices alone."""
    depth: dict[str, int] = {}
    for v in g.vertices.values():
        if v.kind == "delay":
            src = v.args[0].name
            depth[src] = max(depth.get(src, 0), v.attrs["depth"])
    return depth


# ------------------------------------------------------------ graphs


def _readout(g: Graph, h, *, loss: str = "cross_entropy", reduce: str = "mean", size_in=None):
    """y = V·h + c as the output, with a per-step loss on it named after its kind."""
    V = g.param("out.V", (N_OUT, size_in or h.size))
    c = g.param("out.c", (N_OUT,), init="normal:0.1")
    y = g.output(g.linear(V, h, c, name="y"))
    if loss == "cross_entropy":
        g.loss("cross_entropy", y, g.index_input("target", N_OUT), name="xent", reduce=reduce)
    else:
        g.loss("mse", y, g.input("target", N_OUT), name="mse", reduce=reduce)
    return y


def classic() -> Graph:
    """The textbook network: h = tanh(W·[x; h_prev]), y = V·h, no biases."""
    g = Graph("classic")
    x = g.input("x", N_IN)
    h = g.state("h", HIDDEN)
    W = g.param("W", (HIDDEN, N_IN + HIDDEN))
    V = g.param("V", (N_OUT, HIDDEN))
    g.tanh(g.matmul(W, g.concat(x, h.prev, name="xh"), name="a"), name="h")
    y = g.output(g.matmul(V, h, name="y"))
    g.loss("cross_entropy", y, g.index_input("target", N_OUT), name="xent")
    return g


def elman(*, init: str = "zeros", loss: str = "cross_entropy", reduce: str = "mean") -> Graph:
    g = Graph("elman")
    h = cells.elman(g, g.input("x", N_IN), HIDDEN, init=init)
    _readout(g, h, loss=loss, reduce=reduce)
    return g


def jordan() -> Graph:
    """The output y, not the hidden layer, is fed back."""
    g = Graph("jordan")
    _, y = cells.jordan(g, g.input("x", N_IN), HIDDEN, N_OUT)
    g.output(y)
    g.loss("cross_entropy", y, g.index_input("target", N_OUT), name="xent")
    return g


def coupled() -> Graph:
    """Two loops feeding each other: h1 reads h2's previous value and h2 reads h1's (different sizes)."""
    g = Graph("coupled")
    x = g.input("x", N_IN)
    h1, h2 = g.state("h1", 3), g.state("h2", 4)
    W1, b1 = g.param("W1", (3, N_IN + 4)), g.param("b1", (3,), init="normal:0.1")
    W2, b2 = g.param("W2", (4, N_IN + 3)), g.param("b2", (4,), init="normal:0.1")
    g.tanh(g.linear(W1, g.concat(x, h2.prev, name="xh2"), b1, name="a1"), name="h1")
    g.tanh(g.linear(W2, g.concat(x, h1.prev, name="xh1"), b2, name="a2"), name="h2")
    _readout(g, g.concat(h1, h2, name="hh"))
    return g


def delayed(depth: int, *, also_prev: bool = False, init: str = "zeros") -> Graph:
    """h = tanh(W·[x; h_{t-depth}] + b) (also reading h_{t-1} if ``also_prev``)."""
    g = Graph(f"delay{depth}")
    x = g.input("x", N_IN)
    h = g.state("h", HIDDEN, init=init)
    past = [h.prev] if also_prev else []
    past.append(h.delay(depth))
    W = g.param("W", (HIDDEN, N_IN + HIDDEN * len(past)))
    b = g.param("b", (HIDDEN,), init="normal:0.1")
    g.tanh(g.linear(W, g.concat(x, *past, name="xh"), b, name="a"), name="h")
    _readout(g, h)
    return g


def lstm(layers: int = 1, *, learned_init: bool = False) -> Graph:
    g = Graph(f"lstm{layers}")
    x = g.input("x", N_IN)
    h = cells.stack(g, "lstm", x, 3, layers) if layers > 1 else cells.lstm(g, x, 3)
    if learned_init:
        for name in g.delayed():
            g.set_init(name, "learned")
    _readout(g, h)
    return g


def gru() -> Graph:
    g = Graph("gru")
    _readout(g, cells.gru(g, g.input("x", N_IN), 3))
    return g


def embedded(kind: str) -> Graph:
    """Tokens through ``embedding`` (E [V, 3]) or ``one_hot`` into an Elman cell."""
    g = Graph(kind)
    tokens = g.index_input("tokens", 5)
    if kind == "embedding":
        x = g.embedding(g.param("E", (5, 3), init="normal:0.5"), tokens, name="x")
    else:
        x = g.one_hot(tokens, name="x")
    _readout(g, cells.elman(g, x, HIDDEN))
    return g


def input_delay() -> Graph:
    """A delay edge from an input: the cell reads x_t and x_{t-2} (zeros before the start)."""
    g = Graph("input_delay")
    x = g.input("x", N_IN)
    h = cells.elman(g, g.concat(x, x.delay(2), name="xx"), HIDDEN)
    _readout(g, h)
    return g


def two_losses() -> Graph:
    """Cross-entropy (mean) and MSE (sum) on the same output, each with its own mask."""
    g = Graph("two_losses")
    h = cells.elman(g, g.input("x", N_IN), HIDDEN)
    y = _readout(g, h)
    g.loss("mse", y, g.input("goal", N_OUT), name="mse", reduce="sum")
    return g


GRAPHS = {
    "classic": classic,
    "elman": elman,
    "jordan": jordan,
    "coupled": coupled,
    "delay2": lambda: delayed(2),
    "delay3_and_1": lambda: delayed(3, also_prev=True),
    "lstm": lstm,
    "lstm_stack2": lambda: lstm(2),
    "gru": gru,
    "learned_init": lambda: elman(init="learned"),
    "learned_init_delay2": lambda: delayed(2, also_prev=True, init="learned"),
    "lstm_learned_init": lambda: lstm(learned_init=True),
    "given_init": lambda: elman(init="given"),
    "given_init_delay2": lambda: delayed(2, init="given"),
    "mse": lambda: elman(loss="mse"),
    "sum": lambda: elman(reduce="sum"),
    "embedding": lambda: embedded("embedding"),
    "one_hot": lambda: embedded("one_hot"),
    "two_losses": two_losses,
    "input_delay": input_delay,
}
