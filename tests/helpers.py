"""Small graphs, random feeds and finite differences shared by the correctness tests.

Every graph here is tiny (a few features, a handful of steps) so that
central finite differences over all of its parameters take milliseconds.
The builders are keyed by name in :data:`GRAPHS`; each returns a fresh,
checked :class:`~unrolled.graph.folded.Graph` whose losses are named ``xent`` (and
``mse`` where there is one), so that masks can be given by name.
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import numpy as np

from unrolled.engines.compiled import rowsplit, wholestep
from unrolled.engines.compiled.engine import STRATEGIES, CompiledEngine
from unrolled.engines.compiled.kernels import layouts, libraries
from unrolled.engines.compiled.stages import cut
from unrolled.engines.gradcheck import numeric_gradient
from unrolled.engines.reference import run as reference_run
from unrolled.graph.folded import Graph
from unrolled.models import cells

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


# ------------------------------------------------------------ agreement

def _close(a, b, tol, scale=0.0):
    """Relative agreement; ``scale`` is the size of the whole family of arrays ``a`` belongs to,
    so that an entry whose exact value is 0 is judged against its siblings, not against itself."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(a).max(initial=0), np.abs(b).max(initial=0), scale, 1e-30)
    return np.abs(a - b).max(initial=0) <= tol * scale


_GRADIENTS = ("grads", "input_grads", "init_grads")


def _largest(result, fields) -> float:
    return max((np.abs(a).max(initial=0) for f in fields for a in getattr(result, f).values()), default=0.0)


def assert_agree(r1, r2, tol):
    """Every field of two runs agrees to ``tol``, each array relative to its family: gradients are
    judged against all gradients (a parameter's exactly-zero gradient may be a cancellation of
    terms the size of an input's gradient, and rounding leaves ~1e-17 of it), values against their field."""
    assert _close(r1.loss, r2.loss, tol), (r1.loss, r2.loss)
    gradients = _largest(r1, _GRADIENTS)
    for field in ("grads", "input_grads", "init_grads", "final_states", "outputs", "step_losses"):
        d1, d2 = getattr(r1, field), getattr(r2, field)
        assert set(d1) == set(d2), field
        family = gradients if field in _GRADIENTS else _largest(r1, (field,))
        for k in d1:
            assert d1[k].shape == d2[k].shape, (field, k)
            assert d1[k].dtype == d2[k].dtype, (field, k)
            assert _close(d1[k], d2[k], tol, family), (field, k, np.abs(d1[k] - d2[k]).max())


# ------------------------------------------------------------ every compiled path


@contextlib.contextmanager
def _jit_env(value: str):
    """UNROLLED_JIT for the engines built inside (the tests run with "0": no Numba unless asked)."""
    with mock.patch.dict(os.environ, {"UNROLLED_JIT": value}):
        yield


@contextlib.contextmanager
def _rows_in_halves():
    """Split every run's rows in two parts, as oneDNN's thread count would (any BLAS will do here),
    the weight gradients on NumPy's BLAS, as the parts take it where kernels/libraries.py measured
    it faster (any shape and dtype here)."""
    def halves(B, dtype, threads="auto"):
        return [(0, B // 2), (B // 2, B)] if B >= 2 else None

    with mock.patch.object(rowsplit, "parts", halves), \
            mock.patch.object(libraries, "on_numpy_blas_faster", lambda *shape: True):
        yield


@contextlib.contextmanager
def _weights_transposed():
    """Every step product reads the other layout of its weight, through a transposed view, on
    NumPy's BLAS, as the loops do where kernels/layouts.py measured that faster (any shape and
    dtype here; products this small go to NumPy's BLAS on either library's route)."""
    with mock.patch.object(layouts, "step_kernel", lambda *shape: layouts.Kernel(True, True)):
        yield


# how a configuration of PATHS runs besides its engine arguments
SETTINGS = {"rows split": _rows_in_halves, "weights transposed": _weights_transposed}


# (name, UNROLLED_JIT, engine arguments, a setting of SETTINGS or None): each a configuration a user
# can reach; together they must take every strategy in compiled.STRATEGIES (run_every_path checks)
PATHS = [
    ("whole-run function", "1", dict(whole=True), None),
    ("Numba loop", "1", dict(whole=False, jit=True), None),
    ("Numba loop, weights read transposed on NumPy's BLAS", "1", dict(whole=False, jit=True), "weights transposed"),
    ("Numba loop, chunks of 2 steps", "1", dict(whole=False, jit=True, chunk_steps=2), None),
    ("Numba loop, rows split in two, weight gradients on NumPy's BLAS", "1", dict(whole=False, jit=True), "rows split"),
    ("NumPy loop", "0", dict(jit=False), None),
    ("NumPy loop, chunks of 1 step", "0", dict(jit=False, chunk_steps=1), None),  # runs on every graph
    ("NumPy loop with fused kernels", "1", dict(jit="fuse"), None),
]


def _not_applicable(g: Graph, T: int, B: int) -> dict[str, str]:
    """The strategies no run of ``g`` over ``T`` steps of ``B`` rows can take, and why."""
    out = {}
    if T < 2:
        out["chunked"] = "one step: nothing to cut into chunks"
    if wholestep.unsupported(g):
        out["whole"] = f"the whole-run function cannot run {sorted(wholestep.unsupported(g))}"
    if len(cut(g)) < 2:
        out["stages"] = "one recurrent core: nothing to run in stages"
    if B < 2:
        out["row_split"] = "one row: nothing to split"
    with _jit_env("1"):
        cores = CompiledEngine(g, jit="fuse").loops.cores
        refused = [loops.jit_why for loops in CompiledEngine(g).loops.cores if loops.jit_why]
    if refused:  # e.g. an op the Numba loop has no rule for, inside a recurrent core
        out["numba_loop"] = refused[0]
        out["row_split"] = f"the row split runs Numba loops: {refused[0]}"
    if not any(loops.writer.kernels.functions for loops in cores):
        out["fused"] = "no run of elementwise vertices to fuse"
    return out


def run_every_path(g: Graph, params, inputs, *, tol: float = 1e-10, require=(), **run_kw) -> set[str]:
    """Run ``g`` through every configuration of :data:`PATHS` and hold each to the reference engine
    (``assert_agree`` to ``tol``). Asks each engine which strategies it took and fails if any of
    ``compiled.STRATEGIES`` never ran, unless it cannot apply to ``g`` (and is not in ``require``):
    a strategy added to the engine without a configuration here fails every caller.
    Returns the strategies that ran."""
    first = next(iter(inputs.values()))
    T, B = first.shape[:2]
    dtype = next(iter(params.values())).dtype
    want = reference_run(g, params, inputs, **run_kw)
    taken: set[str] = set()
    skip = _not_applicable(g, T, B)
    for name, jit_env, kw, setting in PATHS:
        if (kw.get("whole") is True and "whole" in skip) or (kw.get("jit") is True and "numba_loop" in skip):
            continue  # a configuration that insists on what this graph cannot take raises, as it should
        with _jit_env(jit_env), (SETTINGS[setting]() if setting else contextlib.nullcontext()):
            eng = CompiledEngine(g, **kw)
            took = eng.strategies(T, B, dtype)
            got = eng.run(params, inputs, **run_kw)
        try:
            assert_agree(want, got, tol)
        except AssertionError as e:
            raise AssertionError(f"{name} ({sorted(took)}) disagrees with the reference engine: {e}") from None
        taken |= took
    missing = set(STRATEGIES) - taken - (set(skip) - set(require))
    assert not missing, (f"strategies {sorted(missing)} never ran: add a configuration to tests/helpers.PATHS "
                         f"(not applicable here: {skip})")
    return taken


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
