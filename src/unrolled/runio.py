"""What goes into an engine run and what comes out, shared by every engine.

Checking the caller's arrays here, once, means both engines reject the same
mistakes with the same sentence, and agree on shapes: inputs ``[T, B, F]``
(``[T, B]`` integers for index inputs), masks ``[T, B]`` (or ``[T]``),
states ``[B, F]`` for a vertex delayed by one step and ``[D, B, F]``
(oldest first) for one whose deepest delay is ``D > 1``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from .graph import Graph, Param

COMBINE = ("sum", "mean")


@dataclass
class RunResult:
    """Everything one forward/backward pass over a chunk produces.

    ``loss``: the total loss (a float). ``grads``: one array per parameter,
    its copies' contributions combined (summed, or averaged over the copies).
    ``input_grads``: ``[T, B, F]`` per dense input. ``init_grads``: the
    gradient with respect to each initial state, shaped like the state.
    ``final_states``: each delayed vertex's last ``D`` values, ready to pass
    as ``init_states`` of the next chunk. ``outputs``: ``[T, B, F]`` per
    output. ``step_losses``: ``[T, B]`` per loss, masked, before reduction.
    ``per_copy`` (reference engine, on request): for each parameter an array
    ``[copies, *shape]``, one contribution per step that uses it, the steps
    listed in ``copy_steps``.
    """

    loss: float
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    input_grads: dict[str, np.ndarray] = field(default_factory=dict)
    init_grads: dict[str, np.ndarray] = field(default_factory=dict)
    final_states: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    step_losses: dict[str, np.ndarray] = field(default_factory=dict)
    per_copy: dict[str, np.ndarray] | None = None
    copy_steps: dict[str, list[int]] | None = None


@dataclass
class Feeds:
    """The caller's arrays, checked and converted to the run's dtype."""

    T: int
    B: int
    dtype: np.dtype
    inputs: dict[str, np.ndarray]  # [T, B, F] float, or [T, B] int64
    init: dict[str, np.ndarray]  # [D, B, F] for every delayed vertex, oldest first
    masks: dict[str, np.ndarray]  # [T, B] per loss, in the run's dtype
    norms: dict[str, float]  # the divisor of each loss (1, or its mask's sum)
    final_state_grads: dict[str, np.ndarray]  # [D, B, F]
    output_grads: dict[str, np.ndarray]  # [T, B, F]
    given_init: frozenset = frozenset()  # states whose initial value the caller passed


_UNSIGNED = {n: np.dtype(f"u{n}") for n in (1, 2, 4, 8)}  # a view's dtype from a string is parsed every call


def run_dtype(params: dict[str, np.ndarray], graph: Graph) -> np.dtype:
    missing = [p for p in graph.params if p not in params]
    if missing:
        raise ValueError(f"no value for parameter(s) {', '.join(missing)}; use graph.init_params() to make them")
    dtypes = set()
    for name, p in graph.params.items():
        a = params[name]
        if not isinstance(a, np.ndarray):
            a = np.asarray(a)
        dtypes.add(a.dtype)
        if a.shape != p.shape:
            raise ValueError(f"parameter '{name}' is {list(a.shape)} but the graph says {list(p.shape)}")
    if len(dtypes) > 1:
        raise ValueError(f"parameters mix dtypes {sorted(map(str, dtypes))}; use one (float32 or float64)")
    dtype = dtypes.pop() if dtypes else np.dtype(np.float64)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"parameters are {dtype}; use float32 or float64")
    return np.dtype(dtype)


def prepare(
    graph: Graph,
    params: dict[str, np.ndarray],
    inputs: dict[str, np.ndarray],
    init_states: dict[str, np.ndarray] | None = None,
    masks: dict[str, np.ndarray] | None = None,
    *,
    steps: int | None = None,
    batch: int | None = None,
    final_state_grads: dict[str, np.ndarray] | None = None,
    output_grads: dict[str, np.ndarray] | None = None,
) -> Feeds:
    """Check and convert a run's arrays; ``steps``/``batch`` are needed only for a graph with no inputs."""
    graph.check()
    dtype = run_dtype(params, graph)
    inputs = dict(inputs or {})
    known = {v.name for v in graph.inputs}
    extra = set(inputs) - known
    if extra:
        raise ValueError(f"no input named {', '.join(sorted(extra))} in graph '{graph.name}'; its inputs are {', '.join(sorted(known)) or 'none'}")
    T, B = steps, batch
    out_inputs = {}
    for v in graph.inputs:
        if v.name not in inputs:
            raise ValueError(f"input '{v.name}' was not given: pass inputs={{'{v.name}': array}}")
        a = np.asarray(inputs[v.name])
        ndim = 2 if v.kind == "index" else 3
        if a.ndim != ndim or (v.kind == "input" and a.shape[2] != v.size):
            want = "[T, B]" if v.kind == "index" else f"[T, B, {v.size}]"
            raise ValueError(f"input '{v.name}' has shape {list(a.shape)}; it must be {want}")
        T = a.shape[0] if T is None else T
        B = a.shape[1] if B is None else B
        if a.shape[:2] != (T, B):
            raise ValueError(f"input '{v.name}' covers [T, B] = {list(a.shape[:2])} but other inputs cover {[T, B]}")
        if v.kind == "index":
            if a.dtype.kind not in "iu":  # integers (np.issubdtype costs more than the rest of the check)
                raise ValueError(f"index input '{v.name}' holds {a.dtype}; it must hold integers")
            # one pass: as unsigned, a negative index is huge, so the maximum catches both ends
            if a.size and int(a.view(_UNSIGNED[a.itemsize]).max()) >= v.size:
                bad = int(a.min()) if a.min() < 0 else int(a.max())
                raise ValueError(f"index input '{v.name}' holds {bad}, outside 0..{v.size - 1}")
            out_inputs[v.name] = a.astype(np.int64, copy=False)
        else:
            out_inputs[v.name] = np.ascontiguousarray(a, dtype=dtype)
    if T is None or B is None:
        raise ValueError(f"graph '{graph.name}' has no inputs: pass steps=T and batch=B")
    if T < 1 or B < 1:
        raise ValueError(f"a run needs at least one step and one row, got T={T}, B={B}")
    init = _initial_states(graph, params, init_states or {}, B, dtype)
    out_masks, norms = _masks(graph, masks or {}, T, B, dtype)
    fsg = {
        name: _as_history(graph, name, a, B, dtype, "final_state_grads")
        for name, a in (final_state_grads or {}).items()
    }
    ogr = {}
    outs = {v.name: v for v in graph.outputs}
    for name, a in (output_grads or {}).items():
        if name not in outs:
            raise ValueError(f"output_grads names '{name}', which is not an output of graph '{graph.name}'")
        a = np.asarray(a, dtype=dtype)
        if a.shape != (T, B, outs[name].size):
            raise ValueError(f"output_grads['{name}'] is {list(a.shape)}; it must be {[T, B, outs[name].size]}")
        ogr[name] = a
    given = frozenset(init_states or {})
    return Feeds(T, B, dtype, out_inputs, init, out_masks, norms, fsg, ogr, given)


def _as_history(graph: Graph, name: str, a, B: int, dtype, what: str) -> np.ndarray:
    """A state array as ``[D, B, F]``, accepting ``[B, F]`` when D = 1."""
    delayed = graph.delayed()
    if name not in delayed:
        raise ValueError(
            f"{what} names '{name}', which no delay reads; states of graph '{graph.name}': "
            f"{', '.join(sorted(delayed)) or 'none'}"
        )
    D, F = delayed[name], graph.vertices[name].size
    a = np.asarray(a, dtype=dtype)
    if D == 1 and a.shape == (B, F):
        a = a[None]
    if a.shape != (D, B, F):
        want = f"[{B}, {F}]" if D == 1 else f"[{D}, {B}, {F}] (the last {D} values, oldest first)"
        raise ValueError(f"{what}['{name}'] has shape {list(a.shape)}; it must be {want}")
    return a


def as_state(a: np.ndarray) -> np.ndarray:
    """The user-facing form of a ``[D, B, F]`` history: ``[B, F]`` when D = 1."""
    return a[0] if a.shape[0] == 1 else a


def _initial_states(graph, params, given, B, dtype) -> dict[str, np.ndarray]:
    out = {}
    for name, D in graph.delayed().items():
        v = graph.vertices[name]
        if name in given:
            out[name] = _as_history(graph, name, given[name], B, dtype, "init_states")
        elif v.init == "given":
            raise ValueError(
                f"state '{name}' has init=given but no initial value was passed: "
                f"pass init_states={{'{name}': array of shape [{B}, {v.size}]}}"
            )
        elif v.init == "learned":
            h0 = params[graph.init_param_name(name)]
            out[name] = np.broadcast_to(h0, (D, B, v.size)).astype(dtype)
        else:
            out[name] = np.zeros((D, B, v.size), dtype=dtype)
    extra = set(given) - set(out)
    if extra:
        _as_history(graph, sorted(extra)[0], None, B, dtype, "init_states")
    return out


def _masks(graph, masks, T, B, dtype):
    names = {l.name for l in graph.losses}
    extra = set(masks) - names
    if extra:
        raise ValueError(f"a mask names '{sorted(extra)[0]}', which is not a loss; losses: {', '.join(sorted(names)) or 'none'}")
    out, norms = {}, {}
    for loss in graph.losses:
        m = masks.get(loss.name)
        if m is None:  # every step counts
            out[loss.name] = _ones(T, B, dtype)
            norms[loss.name] = 1.0 if loss.reduce == "sum" else float(T * B)
            continue
        m = np.asarray(m, dtype=dtype)
        if m.shape == (T,):
            m = np.broadcast_to(m[:, None], (T, B))
        if m.shape != (T, B):
            raise ValueError(f"mask of loss '{loss.name}' is {list(m.shape)}; it must be [T, B] = {[T, B]} or [T]")
        out[loss.name] = np.ascontiguousarray(m)
        total = float(m.sum())
        norms[loss.name] = 1.0 if loss.reduce == "sum" else (total if total > 0 else 1.0)
    return out, norms


@functools.lru_cache(maxsize=16)
def _ones(T: int, B: int, dtype) -> np.ndarray:
    """The mask of a loss given none: read-only, so one array serves every run of that shape."""
    m = np.ones((T, B), dtype=dtype)
    m.flags.writeable = False
    return m


def parameter_copies(graph: Graph, T: int, given_init) -> dict[str, int]:
    """How many copies of each parameter the unrolled graph has (the divisor of combine='mean'):
    T for a weight an op reads, D for a learned initial state not overridden by a given one."""
    used = set()
    for v in graph.vertices.values():
        if v.kind == "op":
            used.update(a.name for a in v.args if isinstance(a, Param))
    out = {name: T for name in used}
    for name, D in graph.delayed().items():
        if graph.vertices[name].init == "learned" and name not in given_init:
            out[graph.init_param_name(name)] = D
    return out


def check_combine(combine: str) -> None:
    if combine not in COMBINE:
        raise ValueError(f"combine={combine!r}; use 'sum' (the gradient of the total loss) or 'mean' (averaged over copies)")
